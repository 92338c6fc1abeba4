"""LLM.int8(): Int8Linear against the decomposition computed by hand in float64; the method's report."""

import math

import pytest
import torch
from torch import nn

import lowbit
from lowbit.nn import Int8Linear, int8_matmul
from lowbit.quantize.calibration import activation_absmax
from tests.tiny_models import tiny_llama


def hand_decomposition(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, threshold: float) -> torch.Tensor:
    """Eq. (5)–(7) of the paper, float64, written out: vector-wise int8 + fp outlier columns."""
    x, w = x.double(), w.double()
    s_w = w.abs().amax(dim=1) / 127  # (N,) per output row
    w_q = torch.round(w / s_w[:, None]).clamp(-127, 127)
    outlier = (x.abs() >= threshold).any(dim=0)  # (K,)
    x_reg = torch.where(outlier, torch.zeros_like(x), x)
    s_x = (x_reg.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)  # (M,) per token
    x_q = torch.round(x_reg / s_x[:, None]).clamp(-127, 127)
    y = (x_q @ w_q.t()) * s_x[:, None] * s_w[None, :]
    y = y + x[:, outlier] @ (w_q[:, outlier] * s_w[:, None]).t()
    return y + (b.double() if b is not None else 0)


def _inputs(seed=0, m=24, k=96, outlier_cols=(3, 40, 77)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    for j in outlier_cols:
        x[torch.randint(0, m, (2,), generator=g), j] = 9.0 * (1 + torch.rand(2, generator=g))  # emergent features
    return x


@pytest.mark.parametrize("bias", [True, False])
def test_equals_exact_decomposition(bias):
    torch.manual_seed(0)
    linear = nn.Linear(96, 40, bias=bias)
    x = _inputs()
    module = Int8Linear.from_linear(linear, threshold=6.0)
    y = module(x)
    expected = hand_decomposition(x, linear.weight.detach(), linear.bias.detach() if bias else None, 6.0)
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)
    # and it is closer to the float result than int8 without the decomposition (measured: 0.55×)
    exact = x.double() @ linear.weight.double().t() + (linear.bias.double() if bias else 0)
    plain = Int8Linear.from_linear(linear, threshold=math.inf)(x)
    torch.testing.assert_close(plain.double(), hand_decomposition(x, linear.weight.detach(),
                               linear.bias.detach() if bias else None, math.inf), rtol=1e-5, atol=1e-5)  # fmt: skip
    assert (y.double() - exact).norm() < 0.7 * (plain.double() - exact).norm()


def test_batched_input_and_all_outlier_columns():
    linear = nn.Linear(32, 16)
    x = torch.randn(2, 5, 32)
    module = Int8Linear.from_linear(linear, threshold=1e-9)  # every column is an outlier: pure float path
    w_hat = module.dequantize(torch.float64)
    torch.testing.assert_close(module(x).double(), x.double() @ w_hat.t() + linear.bias.double(), rtol=1e-5, atol=1e-6)


def test_gradient_reaches_the_input():
    linear = nn.Linear(32, 16)
    module = Int8Linear.from_linear(linear)
    x = (torch.randn(4, 32) * 3).requires_grad_(True)
    module(x).sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(4, 16) @ module.dequantize(torch.float32))


@pytest.mark.parametrize("shape", [(1, 8, 8), (5, 60, 7), (33, 2100, 40)])
def test_int8_matmul_exact_on_every_backend(shape, monkeypatch):
    m, k, n = shape
    g = torch.Generator().manual_seed(m)
    a = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
    b = torch.randint(-127, 128, (k, n), generator=g, dtype=torch.int8)
    a[0], b[:, 0] = 127, 127  # the largest possible dot product (127² · K > 2^24 for K = 2100)
    expected = a.long() @ b.long()
    for backend in (None, "int_mm", "float32", "float64"):
        out = int8_matmul(a, b, backend)
        assert out.dtype == torch.int32 and torch.equal(out.long(), expected), backend
    monkeypatch.delattr(torch, "_int_mm")  # torch builds without it fall back to float64
    assert torch.equal(int8_matmul(a, b, "int_mm").long(), expected)
    with pytest.raises(TypeError):
        int8_matmul(a.float(), b)
    with pytest.raises(ValueError, match="backend"):
        int8_matmul(a, b, "int4")


def test_quantize_model_and_outlier_share():
    model = tiny_llama()
    with torch.no_grad():  # plant an outlier feature: channel 5 of every q/k/v input is ~40× larger
        model.model.layers[0].input_layernorm.weight[5] = 40.0
    ids = torch.randint(0, 300, (3, 16), generator=torch.Generator().manual_seed(0))
    reference = model(ids).logits
    absmax = activation_absmax(model, ids)  # the unquantized model's inputs (block 0 sees exactly these)
    report = lowbit.quantize(model, lowbit.QuantConfig(method="llm_int8", format="int8"), calibration=ids)
    assert all(isinstance(model.get_submodule(r.name), Int8Linear) for r in report.layers) and len(report.layers) == 14
    for r in report.layers:
        if r.name.startswith("model.layers.0.self_attn."):  # inputs before any quantized layer
            assert r.outlier_share == pytest.approx(float((absmax[r.name] >= 6.0).float().mean()))
    q = report.layers[0]
    assert q.name == "model.layers.0.self_attn.q_proj" and q.outlier_share >= 1 / 64
    assert "outliers" in report.to_markdown()
    err = (model(ids).logits - reference).norm() / reference.norm()
    assert err < 0.02
    # no calibration: no share reported, same modules
    plain = lowbit.quantize(tiny_llama(), lowbit.QuantConfig(method="llm_int8", format="int8"))
    assert all(r.outlier_share is None for r in plain.layers)


def test_options_validation():
    for bad in ({"threshold": 0}, {"threshold": -1.0}, {"threshold": "6"}, {"thresh": 6.0}):
        with pytest.raises(ValueError):
            lowbit.quantize(tiny_llama(), lowbit.QuantConfig(method="llm_int8", format="int8", options=bad))
    with pytest.raises(ValueError, match="format='int8'"):
        lowbit.quantize(tiny_llama(), lowbit.QuantConfig(method="llm_int8", format="int4"))
