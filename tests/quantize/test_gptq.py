"""GPTQ against a slow float64 reference of the paper's column loop, RTN, and degenerate calibration."""

import pytest
import torch
from torch import nn

import lowbit
from lowbit.formats import WeightFormat
from lowbit.nn import ActOrderQuantLinear, QuantLinear
from lowbit.quantize.gptq import GPTQOptions, gptq_codebook_quantize, gptq_linear, gptq_quantize
from tests.tiny_models import tiny_llama


def correlated_inputs(n_tokens: int, dim: int, seed: int = 0) -> torch.Tensor:
    """Tokens whose features are correlated and of very different scales, as LLM activations are."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(dim, dim, generator=g) / dim**0.5
    scales = torch.exp(torch.randn(dim, generator=g))
    return (torch.randn(n_tokens, dim, generator=g) @ mixing + 0.3 * torch.randn(n_tokens, dim, generator=g)) * scales


def hessian64(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return 2 * x.t() @ x / x.shape[0]


def ref_params(cols: torch.Tensor, bits: int, symmetric: bool):
    """Per-row (scale, zero) of the spec (formats/scaled.py docstring), float64; scales stored as fp32."""
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = (cols.abs().amax(dim=1) / qmax).float().double().clamp(min=torch.finfo(torch.float32).tiny)
        return scale, torch.zeros_like(scale), -qmax, qmax
    qmax = 2**bits - 1
    lo, hi = cols.amin(dim=1).clamp(max=0), cols.amax(dim=1).clamp(min=0)
    scale = ((hi - lo) / qmax).float().double().clamp(min=torch.finfo(torch.float32).tiny)
    zero = torch.round(-lo / scale).clamp(0, qmax)
    return scale, zero, 0, qmax


def gptq_reference(w, h, bits, symmetric, group, damp, act_order):
    """The paper's eq. 3 column loop, float64, with the explicit Gaussian elimination of H⁻¹ (no Cholesky,
    no lazy batches). Returns (levels in the original column order, dequantized weight)."""
    w, h = w.double().clone(), h.double().clone()
    n = w.shape[1]
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1
    perm = torch.argsort(torch.diagonal(h), descending=True, stable=True) if act_order else torch.arange(n)
    w, h = w[:, perm], h[perm][:, perm]
    h += damp * torch.diagonal(h).mean() * torch.eye(n, dtype=torch.float64)
    hinv = torch.linalg.inv(h)
    levels = torch.zeros_like(w)
    if group is None:
        params = ref_params(w, bits, symmetric)
    for i in range(n):
        if group is not None and i % group == 0:
            params = ref_params(w[:, i : i + group], bits, symmetric)
        scale, zero, qmin, qmax = params
        q = (torch.round(w[:, i] / scale) + zero).clamp(qmin, qmax)
        levels[:, i] = q
        w_hat = scale * (q - zero)
        err = (w[:, i] - w_hat) / hinv[i, i]
        w[:, i:] -= err[:, None] * hinv[i, i:][None, :]  # OBS update of the remaining weights
        w[:, i] = w_hat
        hinv = hinv - hinv[:, i : i + 1] @ hinv[i : i + 1, :] / hinv[i, i]  # eliminate column i
    out_levels, out_w = torch.empty_like(levels), torch.empty_like(w)
    out_levels[:, perm], out_w[:, perm] = levels, w
    return out_levels, out_w


@pytest.mark.parametrize(
    "fmt,act_order",
    [
        (WeightFormat("int4", group_size=16, symmetric=False), False),
        (WeightFormat("int4", group_size=16, symmetric=False), True),
        (WeightFormat("int3", group_size=None, symmetric=True), True),
        (WeightFormat("int2", group_size=32, symmetric=False), False),
        (WeightFormat("int8", group_size=None, symmetric=True), False),
    ],
    ids=lambda v: f"{v.name}-g{v.group_size}-{'sym' if v.symmetric else 'aff'}" if isinstance(v, WeightFormat)
    else f"ao{int(v)}",
)
def test_matches_float64_reference_column_loop(fmt, act_order):
    torch.manual_seed(0)
    x = correlated_inputs(256, 48)
    w = torch.randn(24, 48, dtype=torch.float64) * 0.1
    h = hessian64(x)
    bits = {"int2": 2, "int3": 3, "int4": 4, "int8": 8}[fmt.name]
    ref_levels, ref_w = gptq_reference(w, h, bits, fmt.symmetric, fmt.group_size, 0.01, act_order)
    # block_size 8 < group: the lazy batch updates must not change the result
    result = gptq_quantize(w, h, fmt, GPTQOptions(damp=0.01, block_size=8, act_order=act_order))
    # statistics are stored in float32, so values agree to float32 rounding; one different level would
    # differ by a whole quantization step (≥ 1e-3 here)
    torch.testing.assert_close(result.weight.double(), ref_w, rtol=0, atol=1e-6 * ref_w.abs().max().item())
    # the stored module (float32 weights in) decodes to the same weight, columns back in their order
    module = gptq_linear(_linear(w), h, fmt, GPTQOptions(block_size=8, act_order=act_order))
    torch.testing.assert_close(module.dequantize(torch.float64), ref_w, rtol=0, atol=1e-5 * ref_w.abs().max().item())
    expected_cls = ActOrderQuantLinear if act_order and fmt.group_size is not None else QuantLinear
    assert type(module) is expected_cls
    if expected_cls is QuantLinear:  # stored in the original column order: the very levels of the reference
        stored = module.fmt.decode(module.storage(), (24, 48), torch.float64)
        torch.testing.assert_close(stored, ref_w, rtol=0, atol=1e-5 * ref_w.abs().max().item())
    # the integer levels themselves, in stored column order (act-order with groups keeps that order)
    expected_levels = ref_levels if result.perm is None else ref_levels[:, result.perm]
    assert torch.equal(result.quantized.data.double(), expected_levels)


def _linear(w: torch.Tensor) -> nn.Linear:
    linear = nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        linear.weight.copy_(w.float())
    return linear


# (format, act_order, bound on GPTQ error / RTN error). Measured on this data: 0.80–0.84 in natural
# order, 0.59–0.64 with act-order. int2 in natural order is the one case where greedy GPTQ does not win
# here (ratio 1.03: at 4 levels the error pushed onto the last columns saturates), so it is not claimed.
OUTPUT_ERROR_CASES = [
    (WeightFormat("int4", group_size=32, symmetric=False), False, 0.9),
    (WeightFormat("int4", group_size=32, symmetric=False), True, 0.7),
    (WeightFormat("int3", group_size=64), False, 0.9),
    (WeightFormat("int3", group_size=64), True, 0.7),
    (WeightFormat("int2", group_size=32, symmetric=False), True, 0.7),
    (WeightFormat("int8"), False, 0.9),
    (WeightFormat("int8"), True, 0.7),
]


@pytest.mark.parametrize("fmt,act_order,bound", OUTPUT_ERROR_CASES,
                         ids=[f"{f.name}-g{f.group_size}-ao{int(a)}" for f, a, _ in OUTPUT_ERROR_CASES])  # fmt: skip
def test_layer_output_error_below_rtn(fmt, act_order, bound):
    x = correlated_inputs(512, 128, seed=1)
    linear = _linear(torch.randn(64, 128, generator=torch.Generator().manual_seed(2)) * 0.05)
    w = linear.weight.double()
    module = gptq_linear(linear, hessian64(x), fmt, GPTQOptions(act_order=act_order))
    rtn = QuantLinear.from_linear(linear, fmt)

    def out_err(m):  # ‖XWᵀ − XŴᵀ‖ / ‖XWᵀ‖, float64
        return ((x.double() @ (w - m.dequantize(torch.float64)).t()).norm() / (x.double() @ w.t()).norm()).item()

    assert out_err(module) < bound * out_err(rtn), (out_err(module), out_err(rtn))


def test_dead_inputs_are_rounded_not_erased():
    """All-zero activations (H = 0): every channel is dead, so GPTQ is exactly round-to-nearest."""
    fmt = WeightFormat("int4", group_size=16, symmetric=False)
    linear = _linear(torch.randn(8, 32) * 0.1)
    module = gptq_linear(linear, torch.zeros(32, 32), fmt)
    rtn = QuantLinear.from_linear(linear, fmt)
    for key, t in rtn.storage().items():
        assert torch.equal(module.storage()[key], t), key


def test_singular_hessian_is_saved_by_dampening():
    x = correlated_inputs(3, 32)  # 3 tokens: rank-3 Hessian of a 32-wide layer
    x[:, 5] = x[:, 4]  # and two identical features
    linear = _linear(torch.randn(16, 32, generator=torch.Generator().manual_seed(3)) * 0.1)
    fmt = WeightFormat("int4", group_size=16, symmetric=False)
    module = gptq_linear(linear, hessian64(x), fmt)
    w_hat = module.dequantize(torch.float64)
    assert torch.isfinite(w_hat).all()
    err = (x.double() @ (linear.weight.double() - w_hat).t()).norm()
    rtn_hat = QuantLinear.from_linear(linear, fmt).dequantize(torch.float64)
    rtn_err = (x.double() @ (linear.weight.double() - rtn_hat).t()).norm()
    assert err < rtn_err


def test_invalid_inputs():
    linear = _linear(torch.randn(8, 16))
    with pytest.raises(ValueError, match="integer levels"):
        gptq_linear(linear, torch.eye(16), WeightFormat("nf4"))
    with pytest.raises(ValueError, match="does not match"):
        gptq_linear(linear, torch.eye(8), WeightFormat("int4"))
    with pytest.raises(ValueError, match="NaN"):
        gptq_linear(linear, torch.full((16, 16), float("nan")), WeightFormat("int4"))
    for bad in ({"damp": -0.1}, {"block_size": 0}, {"act_order": "yes"}):
        with pytest.raises(ValueError):
            GPTQOptions(**bad)
    model = tiny_llama()
    with pytest.raises(ValueError, match="unknown gptq option"):
        lowbit.quantize(model, lowbit.QuantConfig(method="gptq", format="int4", options={"dampening": 0.1}),
                        calibration=torch.zeros(1, 8, dtype=torch.long))  # fmt: skip
    with pytest.raises(ValueError, match="needs calibration data"):
        lowbit.quantize(model, lowbit.QuantConfig(method="gptq", format="int4"))


def _tiny_ids(n=4, t=24, seed=0):
    return torch.randint(0, 300, (n, t), generator=torch.Generator().manual_seed(seed))


def test_quantize_model_one_sample_and_progress():
    model = tiny_llama()
    seen = []

    report = lowbit.quantize(model, lowbit.QuantConfig(method="gptq", format="int4", group_size=32),
                             calibration=_tiny_ids(1), progress=False)  # fmt: skip
    assert len(report.layers) == 14 and all(isinstance(model.get_submodule(r.name), QuantLinear) for r in report.layers)
    # the progress iterator quantize() hands to the method is drawn to its end, one item per layer
    from lowbit.quantize import api

    original = api.iter_targets

    def counting(*args, **kwargs):
        for item in original(*args, **kwargs):
            seen.append(item[0])
            yield item

    api.iter_targets, restore = counting, original
    try:
        lowbit.quantize(tiny_llama(), lowbit.QuantConfig(method="gptq", format="int8"), calibration=_tiny_ids(2))
    finally:
        api.iter_targets = restore
    assert len(seen) == 14


def test_nan_in_calibration_is_a_clear_error():
    model = tiny_llama()
    with torch.no_grad():
        model.model.embed_tokens.weight[7] = float("nan")
    ids = _tiny_ids(2)
    ids[1, 3] = 7
    with pytest.raises(ValueError, match="NaN or inf"):
        lowbit.quantize(model, lowbit.QuantConfig(method="gptq", format="int4"), calibration=ids)


def test_zero_activation_layer_in_a_model():
    """A layer whose calibration inputs are all zero keeps its (rounded) weights."""
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[0].post_attention_layernorm.weight.zero_()  # gate/up of block 0 see only zeros
    dense = model.model.layers[0].mlp.gate_proj
    fmt = WeightFormat("int4", group_size=32)
    expected = QuantLinear.from_linear(dense, fmt).dequantize(torch.float32)
    lowbit.quantize(model, lowbit.QuantConfig(method="gptq", format="int4", group_size=32), calibration=_tiny_ids())
    torch.testing.assert_close(model.model.layers[0].mlp.gate_proj.dequantize(torch.float32), expected, rtol=0, atol=0)


@pytest.mark.parametrize("double_quant", [False, True])
def test_codebook_gptq_storage_decodes_to_its_sweep_and_beats_rtn(double_quant):
    # (6, 45): 270 weights, so blocks of 64 span rows and the last one is partial.
    g = torch.Generator().manual_seed(3)
    w = torch.randn(6, 45, generator=g, dtype=torch.float64) * 0.05
    x = torch.randn(400, 45, generator=g, dtype=torch.float64) @ torch.randn(45, 45, generator=g, dtype=torch.float64)
    h = 2 * x.t() @ x / 400
    fmt = WeightFormat("nf4", block_size=64, double_quant=double_quant)
    storage, w_hat = gptq_codebook_quantize(w, h, fmt)
    assert set(storage) == set(fmt.encode(w.float()))
    torch.testing.assert_close(fmt.decode(storage, (6, 45), torch.float32), w_hat, rtol=0, atol=0)
    rtn = fmt.decode(fmt.encode(w.float()), (6, 45), torch.float64)

    def loss(v):
        d = v.double() - w
        return float(torch.trace(d @ h @ d.t()))

    assert loss(w_hat) < 0.6 * loss(rtn)  # measured 0.52 (both with and without double quant)


def test_codebook_gptq_refusals():
    w, h = torch.randn(4, 16), torch.eye(16)
    with pytest.raises(ValueError, match="codebook format"):
        gptq_codebook_quantize(w, h, WeightFormat("int4"))
    with pytest.raises(ValueError, match="act_order"):
        gptq_codebook_quantize(w, h, WeightFormat("nf4"), GPTQOptions(act_order=True))
    with pytest.raises(ValueError, match="does not match"):
        gptq_codebook_quantize(w, torch.eye(8), WeightFormat("nf4"))
