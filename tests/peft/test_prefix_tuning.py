"""Prefix tuning: key/value prefixes through the KV cache, against HF peft (forward, loss, generate) on Llama
(grouped-query attention) and Qwen2, the prefix layout, the MLP reparameterisation and dropping it."""

import warnings

import peft
import pytest
import torch
from transformers import DynamicCache

from lowbit.peft.prefix_tuning import (
    PrefixEncoder,
    PrefixTuningConfig,
    apply_prefix_tuning,
    drop_prefix_encoder,
    load_prefix_tuning_state_dict,
    prefix_tuning_from_peft_dict,
    prefix_tuning_state_dict,
    prefix_tuning_to_peft_dict,
    remove_prefix_tuning,
)
from lowbit.peft.prompt_tuning import PREFIX_ATTR, prompt_source
from tests.peft.generate_check import assert_generate_matches_peft_forward
from tests.tiny_models import tiny_bert, tiny_llama, tiny_qwen2

N = 5
GEN = dict(max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)


def assert_same(a, b, exact):
    """peft runs the prefix MLP on batch-expanded tokens, lowbit once: the BLAS blocking (and so the last bit)
    can differ by CPU, so outputs behind the MLP are compared to float32 rounding, the rest bit for bit."""
    if exact:
        assert torch.equal(a, b)
    else:
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def ids_and_mask(pad=True):
    ids = torch.randint(0, 300, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    if pad:
        mask[1, :2] = 0
    return ids, mask


def peft_and_lowbit(projection: bool, build=tiny_llama):
    kwargs = dict(num_virtual_tokens=N, prefix_projection=projection, encoder_hidden_size=24)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = peft.get_peft_model(build(), peft.PrefixTuningConfig(task_type="CAUSAL_LM", **kwargs)).eval()
    model = apply_prefix_tuning(build(), PrefixTuningConfig(**kwargs)).eval()
    prompt_source(model, "default", PREFIX_ATTR).load_state_dict(reference.prompt_encoder["default"].state_dict())
    return reference, model


@pytest.mark.parametrize("kwargs", [dict(task_type="SEQ_CLS"), dict(encoder_hidden_size=0),
                                    dict(token_dim=30, num_attention_heads=4), dict(num_virtual_tokens=0)])  # fmt: skip
def test_config_rejects_bad_values(kwargs):
    with pytest.raises(ValueError):
        PrefixTuningConfig(**kwargs)


def test_needs_a_decoder_with_a_cache():
    with pytest.raises(ValueError, match="past_key_values"):
        apply_prefix_tuning(tiny_bert(), PrefixTuningConfig())


def test_prefix_shape_follows_grouped_query_attention():
    model = apply_prefix_tuning(tiny_llama(), PrefixTuningConfig(num_virtual_tokens=N))
    config = model.lowbit_adapters["default"]
    # tiny Llama: 2 layers, 2 key/value heads of 16 → d_kv = 32 (not the 64 of the hidden size)
    sizes = (config.token_dim, config.num_attention_heads, config.num_layers, config.encoder_hidden_size)
    assert sizes == (32, 2, 2, 32)
    assert prefix_tuning_state_dict(model, "default")["prompt_embeddings"].shape == (N, 2 * 2 * 32)


@pytest.mark.parametrize("build", [tiny_llama, tiny_qwen2])
@pytest.mark.parametrize("projection", [True, False])
def test_forward_equals_peft(projection, build):
    reference, model = peft_and_lowbit(projection, build)
    ids, mask = ids_and_mask()
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        a = reference(input_ids=ids, attention_mask=mask, labels=labels)
        b = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert b.logits.shape == (2, 7, 300)  # no extra output positions: the prefix lives in the cache
    assert_same(a.logits, b.logits, exact=not projection)
    assert_same(a.loss, b.loss, exact=not projection)


def test_generate_equals_peft():
    reference, model = peft_and_lowbit(True)
    ids, mask = ids_and_mask(pad=False)
    assert_generate_matches_peft_forward(reference, model, ids, mask)


def test_left_padded_generate_equals_each_row_alone():
    _, model = peft_and_lowbit(False)
    ids, mask = ids_and_mask(pad=True)
    together = model.generate(input_ids=ids, attention_mask=mask, **GEN)
    alone = model.generate(input_ids=ids[1:, 2:], attention_mask=torch.ones(1, 5, dtype=torch.long), **GEN)
    assert torch.equal(together.sequences[1, 7:], alone.sequences[0, 5:])
    for x, y in zip(together.logits, alone.logits):
        torch.testing.assert_close(x[1], y[0], atol=1e-5, rtol=1e-5)


def test_prefix_layout_per_layer_key_and_value():
    """Row layout ((layer·2 + kv)·heads + head)·head_dim + j, checked by slicing the flat prefix by hand."""
    model = apply_prefix_tuning(tiny_llama(), PrefixTuningConfig(num_virtual_tokens=N, prefix_projection=False))
    source = prompt_source(model, "default", PREFIX_ATTR)
    flat = prefix_tuning_state_dict(model, "default")["prompt_embeddings"]  # (N, 2 layers · 2 · 2 heads · 16)
    pairs = source.key_values(batch=3, dtype=torch.float32)
    for layer, (key, value) in enumerate(pairs):
        for kv, got in ((0, key), (1, value)):
            for head in range(2):
                start = ((layer * 2 + kv) * 2 + head) * 16
                for row in range(3):
                    assert torch.equal(got[row, head], flat[:, start : start + 16])  # (N, head_dim)


def test_prefix_reaches_every_layer_and_trains_through_the_mlp():
    model = apply_prefix_tuning(tiny_llama(), PrefixTuningConfig(num_virtual_tokens=N))
    ids, _ = ids_and_mask(pad=False)
    out = model(input_ids=ids, labels=ids, use_cache=False)
    assert out.past_key_values.get_seq_length() == N + 7
    out.loss.backward()
    source = prompt_source(model, "default", PREFIX_ATTR)
    grads = {n: p.grad for n, p in source.named_parameters()}
    assert set(grads) == {"embedding.weight", "transform.0.weight", "transform.0.bias", "transform.2.weight",
                          "transform.2.bias"}  # fmt: skip
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())
    # every layer's key and value slices of P_θ get a gradient: each attention layer reads its own prefix
    model = apply_prefix_tuning(tiny_llama(), PrefixTuningConfig(num_virtual_tokens=N, prefix_projection=False))
    model(input_ids=ids, labels=ids).loss.backward()
    g = prompt_source(model, "default", PREFIX_ATTR).embedding.weight.grad  # (N, 2 layers · 2 · 32)
    assert all(g[:, i * 32 : (i + 1) * 32].abs().sum() > 0 for i in range(4))


def test_a_user_cache_is_filled_and_decoding_continues_from_it():
    _, model = peft_and_lowbit(True)
    ids, _ = ids_and_mask(pad=False)
    with torch.no_grad():
        full = model(input_ids=ids).logits[:, -1]
        cache = DynamicCache(config=model.config)
        model(input_ids=ids[:, :-1], past_key_values=cache)
        assert cache.get_seq_length() == N + 6
        step = model(input_ids=ids[:, -1:], past_key_values=cache, attention_mask=torch.ones_like(ids)).logits[:, -1]
    torch.testing.assert_close(step, full, atol=1e-5, rtol=1e-5)


def test_dropping_the_mlp_keeps_logits_and_only_the_prefix():
    _, model = peft_and_lowbit(True)
    ids, mask = ids_and_mask()
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
    saved = prefix_tuning_state_dict(model, "default")["prompt_embeddings"]
    drop_prefix_encoder(model)
    source = prompt_source(model, "default", PREFIX_ATTR)
    assert [n for n, _ in source.named_parameters()] == ["embedding.weight"]
    assert torch.equal(source.embedding.weight, saved)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, before)


def test_loading_peft_prefixes_drops_the_mlp():
    reference, _ = peft_and_lowbit(True)
    state = peft.get_peft_model_state_dict(reference)
    model = apply_prefix_tuning(tiny_llama(), PrefixTuningConfig(num_virtual_tokens=N, encoder_hidden_size=24)).eval()
    load_prefix_tuning_state_dict(model, state, "default")
    assert not prompt_source(model, "default", PREFIX_ATTR).has_encoder
    ids, mask = ids_and_mask()
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask).logits
        assert_same(ours, reference(input_ids=ids, attention_mask=mask).logits, exact=False)


def test_peft_dict_has_only_peft_fields_and_round_trips():
    model = apply_prefix_tuning(tiny_llama(), PrefixTuningConfig(num_virtual_tokens=N))
    config = model.lowbit_adapters["default"]
    d = prefix_tuning_to_peft_dict(config)
    assert set(d) <= set(peft.PrefixTuningConfig.__dataclass_fields__)
    assert (d["token_dim"], d["num_attention_heads"], d["prefix_projection"]) == (32, 2, True)
    peft.PrefixTuningConfig(**d)
    assert prefix_tuning_from_peft_dict(d) == config


def test_remove_restores_the_base_model():
    model = apply_prefix_tuning(tiny_llama(), PrefixTuningConfig(num_virtual_tokens=N))
    remove_prefix_tuning(model)
    ids, _ = ids_and_mask()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, tiny_llama()(input_ids=ids).logits)
    assert not model._forward_pre_hooks and model.lowbit_adapters == {}
    assert not any(isinstance(m, PrefixEncoder) for m in model.modules())
