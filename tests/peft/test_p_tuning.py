"""P-tuning: the prompt encoder (MLP / LSTM) against HF peft's and a float64 hand computation, dropping the
encoder, the saved prompt, generate."""

import warnings

import peft
import pytest
import torch

from lowbit.peft.p_tuning import (
    PromptEncoder,
    PTuningConfig,
    apply_p_tuning,
    drop_prompt_encoder,
    load_p_tuning_state_dict,
    p_tuning_from_peft_dict,
    p_tuning_state_dict,
    p_tuning_to_peft_dict,
    remove_p_tuning,
)
from lowbit.peft.prompt_tuning import prompt_source
from tests.peft.generate_check import assert_generate_matches_peft_forward
from tests.tiny_models import tiny_llama

N = 5


def ids_and_mask(pad=True):
    ids = torch.randint(0, 300, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    if pad:
        mask[1, :2] = 0
    return ids, mask


def peft_and_lowbit(encoder: str):
    """HF peft's P-tuning model (training mode, encoder present) and lowbit's with the same weights."""
    kwargs = dict(num_virtual_tokens=N, encoder_hidden_size=24, encoder_num_layers=1 if encoder == "lstm" else 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = peft.get_peft_model(tiny_llama(), peft.PromptEncoderConfig(
            task_type="CAUSAL_LM", encoder_reparameterization_type=encoder.upper(), **kwargs)).eval()  # fmt: skip
    model = apply_p_tuning(tiny_llama(), PTuningConfig(encoder=encoder, **kwargs)).eval()
    prompt_source(model, "default").load_state_dict(reference.prompt_encoder["default"].state_dict())
    return reference, model


@pytest.mark.parametrize("kwargs", [dict(encoder="gru"), dict(encoder_hidden_size=0), dict(encoder_num_layers=0),
                                    dict(encoder_dropout=1.0), dict(num_virtual_tokens=-1),
                                    dict(encoder="mlp", encoder_num_layers=3)])  # fmt: skip
def test_config_rejects_bad_values(kwargs):
    with pytest.raises(ValueError):
        PTuningConfig(**kwargs)


@pytest.mark.parametrize("encoder", ["mlp", "lstm"])
def test_forward_with_encoder_equals_peft(encoder):
    reference, model = peft_and_lowbit(encoder)
    ids, mask = ids_and_mask()
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        a = reference(input_ids=ids, attention_mask=mask, labels=labels)
        b = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.loss, b.loss)


@pytest.mark.filterwarnings("ignore:Position ids are not supported")
def test_generate_equals_peft():
    reference, model = peft_and_lowbit("mlp")
    ids, mask = ids_and_mask(pad=False)
    assert_generate_matches_peft_forward(reference, model, ids, mask)


def test_mlp_encoder_output_matches_float64_hand_computation():
    model = apply_p_tuning(tiny_llama(), PTuningConfig(num_virtual_tokens=N, encoder_hidden_size=24))
    enc = prompt_source(model, "default")
    h = enc.embedding.weight.double()  # (N, C)
    w = [(m.weight.double(), m.bias.double()) for m in enc.mlp_head if isinstance(m, torch.nn.Linear)]
    x = torch.relu(h @ w[0][0].T + w[0][1])
    x = torch.relu(x @ w[1][0].T + w[1][1])
    expected = x @ w[2][0].T + w[2][1]  # (N, C)
    saved = p_tuning_state_dict(model, "default")["prompt_embeddings"]
    assert saved.shape == (N, 64)
    torch.testing.assert_close(saved.double(), expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("encoder", ["mlp", "lstm"])
def test_dropping_the_encoder_keeps_logits_and_leaves_only_the_prompt(encoder):
    _, model = peft_and_lowbit(encoder)
    ids, mask = ids_and_mask()
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
    saved = p_tuning_state_dict(model, "default")["prompt_embeddings"]
    drop_prompt_encoder(model)
    enc = prompt_source(model, "default")
    assert [n for n, _ in enc.named_parameters()] == ["prompt"] and not enc.prompt.requires_grad
    assert torch.equal(enc.prompt, saved)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, before)
    assert torch.equal(p_tuning_state_dict(model, "default")["prompt_embeddings"], saved)


@pytest.mark.parametrize("encoder", ["mlp", "lstm"])
def test_loading_peft_embeddings_gives_the_fixed_prompt(encoder):
    """PEFT's P_TUNING file holds the encoder output; loading it drops lowbit's encoder and uses it as is."""
    reference, _ = peft_and_lowbit(encoder)
    state = peft.get_peft_model_state_dict(reference)  # computed with autograd on
    config = PTuningConfig(num_virtual_tokens=N, encoder=encoder, encoder_hidden_size=24,
                           encoder_num_layers=1 if encoder == "lstm" else 2)  # fmt: skip
    model = apply_p_tuning(tiny_llama(), config).eval()
    load_p_tuning_state_dict(model, state, "default")
    assert not prompt_source(model, "default").has_encoder
    ids, mask = ids_and_mask()
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask).logits
        b = reference(input_ids=ids, attention_mask=mask).logits
    if encoder == "mlp":
        assert torch.equal(a, b)
    else:  # torch's CPU LSTM rounds differently with and without autograd (1 ulp): the saved prompt differs so
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_peft_dict_has_only_peft_fields_and_round_trips():
    model = apply_p_tuning(tiny_llama(), PTuningConfig(encoder="lstm"))
    config = model.lowbit_adapters["default"]
    assert config.encoder_hidden_size == 64  # None → the model's hidden size, as in PEFT
    d = p_tuning_to_peft_dict(config)
    assert set(d) <= set(peft.PromptEncoderConfig.__dataclass_fields__)
    assert d["encoder_reparameterization_type"] == "LSTM"
    peft.PromptEncoderConfig(**d)
    assert p_tuning_from_peft_dict(d) == config


def test_remove_restores_the_base_model():
    model = apply_p_tuning(tiny_llama(), PTuningConfig(num_virtual_tokens=N))
    remove_p_tuning(model)
    ids, _ = ids_and_mask()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, tiny_llama()(input_ids=ids).logits)
    assert not model._forward_pre_hooks and model.lowbit_adapters == {}
    assert not any(isinstance(m, PromptEncoder) for m in model.modules())
