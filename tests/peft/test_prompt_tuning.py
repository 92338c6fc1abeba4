"""Prompt tuning: config checks, initialisation, the prepending hook (mask, labels, positions, generate)
against HF peft and against hand-built inputs_embeds, removal."""

import copy
import warnings

import peft
import pytest
import torch
import torch.nn.functional as F

from lowbit.peft.prefix_tuning import PrefixTuningConfig, apply_prefix_tuning
from lowbit.peft.prompt_tuning import (
    PromptTuningConfig,
    apply_prompt_tuning,
    load_prompt_tuning_state_dict,
    prompt_tuning_from_peft_dict,
    prompt_tuning_state_dict,
    prompt_tuning_to_peft_dict,
    remove_prompt_tuning,
)
from tests.peft.generate_check import assert_generate_matches_peft_forward
from tests.tiny_models import tiny_bert, tiny_llama

N = 5


def ids_and_mask(pad=True, seed=0):
    ids = torch.randint(0, 300, (2, 7), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    if pad:
        mask[1, :2] = 0
    return ids, mask


def peft_prompt_model(seed=0):
    """HF peft's prompt tuning on the tiny Llama, with a non-trivial prompt."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(tiny_llama(), peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N))
    with torch.no_grad():
        model.prompt_encoder["default"].embedding.weight.copy_(
            torch.randn(N, 64, generator=torch.Generator().manual_seed(seed)) * 0.5)  # fmt: skip
    return model.eval()


def lowbit_like(peft_model):
    model = apply_prompt_tuning(tiny_llama(), PromptTuningConfig(num_virtual_tokens=N)).eval()
    load_prompt_tuning_state_dict(model, peft.get_peft_model_state_dict(peft_model), "default")
    return model


class FakeTokenizer:
    name_or_path = "fake-tokenizer"

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [int(w) for w in text.split()]}


# --- config ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [dict(num_virtual_tokens=0), dict(init="zeros"), dict(init="text"),
                                    dict(task_type="SEQ_2_SEQ_LM"), dict(version=2), dict(token_dim=-1)])  # fmt: skip
def test_config_rejects_bad_values(kwargs):
    with pytest.raises(ValueError):
        PromptTuningConfig(**kwargs)


def test_config_sizes_must_match_the_model():
    with pytest.raises(ValueError, match="token_dim=32 but the model has 64"):
        apply_prompt_tuning(tiny_llama(), PromptTuningConfig(token_dim=32))


def test_peft_dict_has_only_peft_fields_and_round_trips():
    model = apply_prompt_tuning(tiny_llama(), PromptTuningConfig(num_virtual_tokens=N, init="text", init_text="1 2"),
                                tokenizer=FakeTokenizer())  # fmt: skip
    config = model.lowbit_adapters["default"]
    d = prompt_tuning_to_peft_dict(config)
    assert set(d) <= set(peft.PromptTuningConfig.__dataclass_fields__)
    assert d["prompt_tuning_init"] == "TEXT" and d["tokenizer_name_or_path"] == "fake-tokenizer"
    assert (d["token_dim"], d["num_layers"], d["num_attention_heads"]) == (64, 2, 4)
    peft.PromptTuningConfig(**d)  # peft accepts it
    assert prompt_tuning_from_peft_dict(d) == config
    # without a tokenizer path peft would refuse TEXT; the start value no longer matters once trained
    assert prompt_tuning_to_peft_dict(config.__class__(**{**config.__dict__, "tokenizer_name_or_path": None}))[
        "prompt_tuning_init"] == "RANDOM"  # fmt: skip


# --- initialisation -------------------------------------------------------------------------------------


def test_text_init_cycles_and_cuts_the_texts_token_embeddings():
    table = tiny_llama().get_input_embeddings().weight
    model = apply_prompt_tuning(tiny_llama(), PromptTuningConfig(num_virtual_tokens=7, init="text", init_text="5 7 9"),
                                tokenizer=FakeTokenizer())  # fmt: skip
    assert torch.equal(prompt_tuning_state_dict(model, "default")["prompt_embeddings"], table[[5, 7, 9, 5, 7, 9, 5]])
    model = apply_prompt_tuning(tiny_llama(), PromptTuningConfig(num_virtual_tokens=2, init="text", init_text="5 7 9"),
                                tokenizer=FakeTokenizer())  # fmt: skip
    assert torch.equal(prompt_tuning_state_dict(model, "default")["prompt_embeddings"], table[[5, 7]])
    with pytest.raises(ValueError, match="needs a tokenizer"):
        apply_prompt_tuning(tiny_llama(), PromptTuningConfig(init="text", init_text="5"))


def test_sample_vocab_and_random_init():
    table = tiny_llama().get_input_embeddings().weight
    model = apply_prompt_tuning(tiny_llama(), PromptTuningConfig(num_virtual_tokens=6, init="sample_vocab"))
    prompt = prompt_tuning_state_dict(model, "default")["prompt_embeddings"]
    assert all((table == row).all(dim=1).any() for row in prompt)  # every row is a vocabulary embedding
    model = apply_prompt_tuning(tiny_llama(), PromptTuningConfig(num_virtual_tokens=400))
    prompt = prompt_tuning_state_dict(model, "default")["prompt_embeddings"]
    assert prompt.std().item() == pytest.approx(table.std().item(), rel=0.1)  # a token's scale, not N(0, 1)


# --- the hook: against HF peft and against a hand-built reference ---------------------------------------


def test_forward_equals_peft_with_mask_and_labels():
    reference = peft_prompt_model()
    model = lowbit_like(reference)
    ids, mask = ids_and_mask()
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        a = reference(input_ids=ids, attention_mask=mask, labels=labels)
        b = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert a.logits.shape == (2, N + 7, 300)
    assert torch.equal(a.logits, b.logits)
    assert torch.equal(a.loss, b.loss)


def test_forward_equals_hand_built_inputs_embeds():
    model = apply_prompt_tuning(tiny_llama(), PromptTuningConfig(num_virtual_tokens=N, init="sample_vocab")).eval()
    base = tiny_llama().eval()
    prompt = prompt_tuning_state_dict(model, "default")["prompt_embeddings"]
    ids, mask = ids_and_mask()
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, labels=labels)  # input_ids given positionally
        embeds = torch.cat([prompt.expand(2, -1, -1), base.get_input_embeddings()(ids)], dim=1)
        full_mask = torch.cat([torch.ones(2, N, dtype=mask.dtype), mask], dim=1)
        expected = base(inputs_embeds=embeds, attention_mask=full_mask).logits
    assert torch.equal(out.logits, expected)
    # loss only on real tokens, each predicted from everything before it (the first from the prompt), float64
    logits = expected[:, N - 1 : -1].double().reshape(-1, 300)
    target = labels.reshape(-1)
    expected_loss = F.cross_entropy(logits, target, ignore_index=-100).item()
    assert out.loss.double().item() == pytest.approx(expected_loss, rel=1e-5)


def _generate(model, ids, mask=None):
    mask = mask if mask is not None else torch.ones_like(ids)
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, output_logits=True,
                          return_dict_in_generate=True)  # fmt: skip


@pytest.mark.filterwarnings("ignore:Position ids are not supported")
def test_generate_equals_peft():
    reference = peft_prompt_model()
    model = lowbit_like(reference)
    ids, _ = ids_and_mask(pad=False)
    assert_generate_matches_peft_forward(reference, model, ids, torch.ones_like(ids))


def test_left_padded_generate_equals_each_row_alone():
    """lowbit shifts generate's position ids by N, so a padded row decodes like the same row alone (peft
    0.21 drops position ids while generating and is off by the padding there; the forward pass agrees)."""
    model = lowbit_like(peft_prompt_model())
    ids, mask = ids_and_mask(pad=True)
    together = _generate(model, ids, mask)
    alone = _generate(model, ids[1:, 2:])
    assert torch.equal(together.sequences[1, 7:], alone.sequences[0, 5:])
    for x, y in zip(together.logits, alone.logits):
        torch.testing.assert_close(x[1], y[0], atol=1e-5, rtol=1e-5)


def test_bert_sequence_classification_gets_the_prompt_and_token_types():
    model = apply_prompt_tuning(tiny_bert(), PromptTuningConfig(num_virtual_tokens=3, task_type="SEQ_CLS")).eval()
    base = tiny_bert().eval()
    prompt = prompt_tuning_state_dict(model, "default")["prompt_embeddings"]
    ids, mask = ids_and_mask()
    types = torch.ones_like(ids)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=torch.tensor([0, 2]))
        embeds = torch.cat([prompt.expand(2, -1, -1), base.get_input_embeddings()(ids)], dim=1)
        expected = base(inputs_embeds=embeds, attention_mask=torch.cat([torch.ones(2, 3, dtype=mask.dtype), mask], 1),
                        token_type_ids=torch.cat([torch.zeros(2, 3, dtype=types.dtype), types], 1)).logits  # fmt: skip
    assert torch.equal(out.logits, expected)
    assert out.loss is not None  # (B,) class labels are not padded


# --- lifecycle ------------------------------------------------------------------------------------------


def test_remove_restores_the_base_model():
    model = apply_prompt_tuning(tiny_llama(), PromptTuningConfig(num_virtual_tokens=N))
    remove_prompt_tuning(model)
    ids, mask = ids_and_mask()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits,
                           tiny_llama()(input_ids=ids, attention_mask=mask).logits)  # fmt: skip
    assert not model._forward_pre_hooks and not hasattr(model, "lowbit_virtual_tokens")
    assert model.lowbit_adapters == {}
    with pytest.raises(ValueError, match="no PromptTuning adapter"):
        remove_prompt_tuning(model)


def test_only_one_prompt_learning_adapter_at_a_time():
    model = apply_prompt_tuning(tiny_llama(), PromptTuningConfig(num_virtual_tokens=N))
    with pytest.raises(ValueError, match="only one prompt"):
        apply_prompt_tuning(model, PromptTuningConfig(), adapter_name="other")
    with pytest.raises(ValueError, match="only one prompt"):
        apply_prefix_tuning(model, PrefixTuningConfig(), adapter_name="other")
    with pytest.raises(ValueError, match="already on this model"):
        apply_prompt_tuning(model, PromptTuningConfig())
    assert list(model.lowbit_adapters) == ["default"] and len(model._forward_pre_hooks) == 1


def test_inputs_embeds_and_a_deepcopy():
    model = apply_prompt_tuning(tiny_llama(), PromptTuningConfig(num_virtual_tokens=N)).eval()
    ids, mask = ids_and_mask()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        embeds = model.get_input_embeddings()(ids)
        assert torch.equal(model(inputs_embeds=embeds, attention_mask=mask).logits, expected)
        twin = copy.deepcopy(model)
        assert torch.equal(twin(input_ids=ids, attention_mask=mask).logits, expected)
        remove_prompt_tuning(twin)  # the copy's hook goes, the original's stays
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, expected)
        assert twin(input_ids=ids, attention_mask=mask).logits.shape == (2, 7, 300)
