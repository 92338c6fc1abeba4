"""SmoothQuant: the smoothed float model equals the original (float64), factors by hand, W8A8 by hand."""

import warnings

import pytest
import torch
from torch import nn
from transformers import Gemma2Config, Gemma2ForCausalLM, OPTConfig, OPTForCausalLM

import lowbit
from lowbit.nn import W8A8Linear
from lowbit.quantize.smoothquant import smooth_model, smoothing_factors
from tests.tiny_models import tiny_llama, tiny_qwen2


def _ids(n=3, t=16, seed=0):
    return torch.randint(0, 300, (n, t), generator=torch.Generator().manual_seed(seed))


def tiny_opt():
    torch.manual_seed(0)
    cfg = OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=300,
                    max_position_embeddings=64, word_embed_proj_dim=64)  # fmt: skip
    return OPTForCausalLM(cfg).eval()


def with_outlier_channels(model, factor=30.0):
    """Make a few hidden channels large everywhere they enter a block, as in real LLMs."""
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in ("input_layernorm", "post_attention_layernorm"):
                getattr(layer, norm).weight[[3, 17]] *= factor
    return model


@pytest.mark.parametrize("build", [tiny_llama, tiny_qwen2, tiny_opt], ids=["llama", "qwen2", "opt"])
def test_smoothed_model_equals_original_in_float64(build):
    model = with_outlier_channels(build()) if build is not tiny_opt else build()
    model = model.double()
    ids = _ids()
    before = model(ids).logits
    norms_before = {n: p.clone() for n, p in model.named_parameters() if "norm" in n}
    factors = smooth_model(model, ids, alpha=0.5)
    assert factors and all(not torch.allclose(s, torch.ones_like(s)) for s in factors.values())
    assert any(not torch.equal(p, norms_before[n]) for n, p in model.named_parameters() if "norm" in n)
    torch.testing.assert_close(model(ids).logits, before, rtol=1e-9, atol=1e-9)
    expected = {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"} if build is not tiny_opt else {
        "q_proj", "k_proj", "v_proj", "fc1"}  # fmt: skip
    assert {n.rsplit(".", 1)[-1] for n in factors} == expected


def test_wrongly_wired_architecture_is_left_unsmoothed():
    """Gemma-2's `post_attention_layernorm` is a post-norm and its RMSNorm scales by (1 + γ): folding by
    name alone would change the model; the per-block check restores it and warns."""
    torch.manual_seed(0)
    cfg = Gemma2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, vocab_size=300, max_position_embeddings=64)  # fmt: skip
    model = Gemma2ForCausalLM(cfg).eval().double()
    ids = _ids()
    before = model(ids).logits
    with pytest.warns(UserWarning, match="left unsmoothed"):
        factors = smooth_model(model, ids)
    assert factors == {}
    torch.testing.assert_close(model(ids).logits, before, rtol=1e-9, atol=1e-9)


def test_smoothing_factors_by_hand():
    x_absmax = torch.tensor([4.0, 0.25, 1.0, 0.0])
    w1 = torch.tensor([[0.5, 2.0, -1.0, 0.1]])
    w2 = torch.tensor([[-1.0, 0.5, 0.25, 0.2], [0.1, 0.1, 0.1, -0.3]])
    w_max = torch.tensor([1.0, 2.0, 1.0, 0.3])  # column absmax over both consumers
    for alpha in (0.5, 0.8):
        expected = (x_absmax.clamp(min=1e-5) ** alpha / w_max ** (1 - alpha)).clamp(min=1e-5)
        torch.testing.assert_close(smoothing_factors(x_absmax, [w1, w2], alpha), expected)


def hand_w8a8(x, w, b, static_absmax=None):
    x, w = x.double(), w.double()
    s_w = w.abs().amax(dim=1) / 127
    w_q = torch.round(w / s_w[:, None]).clamp(-127, 127)
    if static_absmax is None:
        s_x = (x.abs().amax(dim=1, keepdim=True) / 127).clamp(min=torch.finfo(torch.float32).tiny)
    else:
        s_x = torch.tensor(static_absmax / 127, dtype=torch.float64)
    x_q = torch.round(x / s_x).clamp(-127, 127)
    return (x_q @ w_q.t()) * s_x * s_w[None, :] + b.double()


def test_w8a8_linear_by_hand():
    torch.manual_seed(0)
    linear = nn.Linear(48, 24)
    x = torch.randn(2, 7, 48)
    dynamic = W8A8Linear.from_linear(linear, act_scheme="per_token")
    torch.testing.assert_close(dynamic(x).double(), hand_w8a8(x.reshape(-1, 48), linear.weight.detach(),
                               linear.bias.detach()).reshape(2, 7, 24), rtol=1e-5, atol=1e-5)  # fmt: skip
    static = W8A8Linear.from_linear(linear, act_scheme="per_tensor", input_absmax=1.5)  # values beyond ±1.5 saturate
    torch.testing.assert_close(static(x).double(), hand_w8a8(x.reshape(-1, 48), linear.weight.detach(),
                               linear.bias.detach(), 1.5).reshape(2, 7, 24), rtol=1e-5, atol=1e-5)  # fmt: skip
    with pytest.raises(ValueError, match="input_absmax"):
        W8A8Linear.from_linear(linear, act_scheme="per_tensor")
    x.requires_grad_(True)
    dynamic(x).sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(2, 7, 24) @ dynamic.dequantize(torch.float32))


@pytest.mark.parametrize("scheme", ["per_token", "per_tensor"])
def test_smoothing_reduces_w8a8_error_with_outlier_channels(scheme):
    ids = _ids(4, 24)
    base = with_outlier_channels(tiny_llama(), factor=60.0)
    reference = base(ids).logits
    errors = {}
    for smooth in (True, False):
        model = with_outlier_channels(tiny_llama(), factor=60.0)
        options = {"act_scheme": scheme, "smooth": smooth}
        config = lowbit.QuantConfig(method="smoothquant", format="int8", options=options)
        report = lowbit.quantize(model, config, calibration=ids)
        assert len(report.layers) == 14
        assert all(isinstance(model.get_submodule(r.name), W8A8Linear) for r in report.layers)
        errors[smooth] = ((model(ids).logits - reference).norm() / reference.norm()).item()
    # measured: smoothing cuts the logits error to 0.31× (per token) and 0.44× (per tensor) here
    assert errors[True] < 0.6 * errors[False], errors


def test_options_and_format_validation():
    for bad in ({"alpha": 1.5}, {"act_scheme": "per_channel"}, {"smooth": 1}, {"beta": 0.5}):
        with pytest.raises(ValueError):
            lowbit.quantize(tiny_llama(), lowbit.QuantConfig(method="smoothquant", format="int8", options=bad),
                            calibration=_ids())  # fmt: skip
    with pytest.raises(ValueError, match="W8A8"):
        lowbit.quantize(tiny_llama(), lowbit.QuantConfig(method="smoothquant", format="nf4"), calibration=_ids())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a one-sample calibration set works and warns about nothing
        lowbit.quantize(tiny_llama(), lowbit.QuantConfig(method="smoothquant", format="int8"), calibration=_ids(1))
