"""QLoRA's fused layer (`qlora_linear` / FusedLoraLinear) against the unfused LoraLinear over QuantLinear.

The reference is the unfused module path itself (QuantLinear's dequantize-matmul + LoraLinear's LoRA
path, autograd through both), forward and backward in x, A, B; in float32 compute on the CPU with the
"dequant" kernel and with the registered `lowbit::lut4_linear` ops ("fused", their torch reference here).
"""

import copy

import pytest
import torch
from torch import nn

from lowbit.formats import WeightFormat
from lowbit.kernels.lora_fused import FusedLoraLinear, qlora_linear
from lowbit.nn import QuantLinear
from lowbit.peft.lora import LoraLinear


def _layer(kernel: str, compute_dtype=torch.float32, bias=False, seed=0) -> LoraLinear:
    torch.manual_seed(seed)
    dense = nn.Linear(64, 48, bias=bias)
    base = QuantLinear.from_linear(dense, WeightFormat("nf4", block_size=64, double_quant=True), compute_dtype)
    base.kernel = kernel
    layer = LoraLinear(base)
    layer.add_adapter("default", r=4, scaling=2.0, dropout=0.0, init=False, dtype=torch.float32)  # B ≠ 0
    layer.active_adapters = ["default"]
    return layer


def _run(layer, x, dy):
    x = x.detach().clone().requires_grad_()
    y = layer(x)
    y.backward(dy)
    return y.detach(), x.grad, layer.lora_A["default"].grad, layer.lora_B["default"].grad


@pytest.mark.parametrize("kernel", ["dequant", "fused"])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_matches_unfused_forward_and_backward(kernel, bias):
    unfused = _layer(kernel, bias=bias)
    fused = FusedLoraLinear.from_lora(copy.deepcopy(unfused))
    x, dy = torch.randn(2, 5, 64), torch.randn(2, 5, 48)
    for got, want in zip(_run(fused, x, dy), _run(unfused, x, dy)):
        assert got.shape == want.shape and got.dtype == want.dtype
        assert ((got - want).norm() / want.norm()).item() < 1e-6  # float32 reassociation only


def test_bf16_compute_dtype_casts_once():
    """bf16 compute with fp32 x and fp32 A/B (the paper's setup): outputs and grads in their own dtypes."""
    unfused = _layer("dequant", torch.bfloat16)
    fused = FusedLoraLinear.from_lora(copy.deepcopy(unfused))
    x, dy = torch.randn(6, 64), torch.randn(6, 48)
    for got, want in zip(_run(fused, x, dy), _run(unfused, x, dy)):
        assert got.dtype == want.dtype
        # unfused rounds base and LoRA outputs to bf16 separately; fused adds them in one bf16 addmm
        assert ((got.float() - want.float()).norm() / want.float().norm()).item() < 1e-2


def test_only_x_and_xa_are_saved():
    layer = FusedLoraLinear.from_lora(_layer("dequant"))
    x = torch.randn(7, 64, requires_grad=True)
    shapes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
        layer(x).sum().backward()
    # x (M, K), x·Aᵀ (M, r), and the parameters A (r, K), B (N, r) themselves; never a dense W (48, 64)
    assert sorted(shapes) == sorted([(7, 64), (7, 4), (4, 64), (48, 4)])


def test_other_lora_states_fall_back_to_lora_linear():
    layer = _layer("dequant")
    fused = FusedLoraLinear.from_lora(copy.deepcopy(layer))
    x = torch.randn(3, 64)
    fused.disabled = layer.disabled = True  # e.g. disabled adapters: the base alone, through LoraLinear.forward
    assert torch.equal(fused(x), layer(x))
    assert fused.state_dict().keys() == layer.state_dict().keys()
    assert isinstance(fused, LoraLinear)


def test_qlora_linear_without_input_grad():
    layer = _layer("dequant")
    x = torch.randn(3, 64)  # e.g. the first layer's input under frozen embeddings
    y = qlora_linear(x, layer.base_layer, layer.lora_A["default"], layer.lora_B["default"], 2.0)
    y.sum().backward()
    assert layer.lora_A["default"].grad is not None and layer.lora_B["default"].grad is not None


def test_under_bf16_autocast_like_unfused():
    """Autocast picks the matmul dtype as it does for the unfused layer; the backward runs outside autocast."""
    unfused = _layer("dequant")
    fused = FusedLoraLinear.from_lora(copy.deepcopy(unfused))
    x, dy = torch.randn(6, 64), torch.randn(6, 48)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = _run(fused, x, dy), _run(unfused, x, dy)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype
        assert ((g.float() - w.float()).norm() / w.float().norm()).item() < 2e-2  # bf16 rounding, differently placed


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_swiglu_into_the_qlora_down_projection_matches_unfused_and_keeps_no_product(backend):
    """swiglu_qlora(gate, up, …) = LoraLinear(silu(gate) ⊙ up) in value and in every gradient, while autograd
    keeps gate and up (and x·Aᵀ) but not the (tokens, intermediate) product."""
    if backend == "triton":
        pytest.importorskip("triton")
    from lowbit.kernels.lora_fused import swiglu_qlora
    from lowbit.kernels.swiglu import swiglu_reference

    layer = _layer("dequant")  # in 64 (the "intermediate"), out 48
    torch.manual_seed(3)
    gate, up, dy = torch.randn(2, 5, 64), torch.randn(2, 5, 64), torch.randn(2, 5, 48)
    results = []
    for fused in (False, True):
        g, u = gate.clone().requires_grad_(), up.clone().requires_grad_()
        layer.zero_grad()
        shapes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
            if fused:
                y = swiglu_qlora(g, u, layer.base_layer, layer.lora_A["default"], layer.lora_B["default"],
                                 layer.scaling["default"], backend)  # fmt: skip
            else:
                y = layer(swiglu_reference(g, u))
        y.backward(dy)
        results.append((y.detach(), g.grad, u.grad, layer.lora_A["default"].grad.clone(),
                        layer.lora_B["default"].grad.clone()))  # fmt: skip
        if fused:
            assert sorted(shapes) == sorted([(2, 5, 64), (2, 5, 64), (10, 4), (4, 64), (48, 4)])
    for got, want in zip(*reversed(results)):
        assert ((got - want).norm() / want.norm()).item() < 1e-6


def _dropout_reference(layer, x, p, seed, backend="auto"):
    """y = base(x) + s·((x ⊙ keep / (1 - p))·Aᵀ)·Bᵀ with plain autograd, keep drawn from the same seed."""
    from lowbit.kernels.lora_fused import dropped

    a, b = layer.lora_A["default"], layer.lora_B["default"]
    x2 = x.reshape(-1, x.shape[-1])
    keep = dropped(torch.ones(x2.shape), p, seed, backend)  # the mask (0 or 1 / (1 - p)) alone
    base = x2 @ layer.base_layer.dequantize(torch.float32).t()
    return (base + layer.scaling["default"] * ((x2 * keep) @ a.t()) @ b.t()).reshape(*x.shape[:-1], -1), keep


def test_lora_dropout_is_fused_with_its_mask_drawn_again_in_backward():
    """With dropout the fused layer still runs (no fallback), equals the formula with the mask drawn from its seed
    in value and every gradient, and keeps only x and x·Aᵀ (the mask is drawn again, not saved)."""
    from lowbit.kernels.lora_fused import dropout_seed

    layer = _layer("dequant")
    layer.lora_dropout["default"] = nn.Dropout(0.3)
    fused = FusedLoraLinear.from_lora(copy.deepcopy(layer)).train()
    assert fused.single_adapter() == "default" and fused.dropout_p("default") == 0.3
    x, dy = torch.randn(2, 50, 64), torch.randn(2, 50, 48)
    torch.manual_seed(9)
    seed = dropout_seed(0.3)  # what the fused call will draw, from the same generator state
    torch.manual_seed(9)
    xf = x.clone().requires_grad_()
    shapes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
        y = fused(xf)
    y.backward(dy)
    assert sorted(shapes) == sorted([(100, 64), (100, 4), (4, 64), (48, 4)])
    ref = copy.deepcopy(layer)
    xr = x.clone().requires_grad_()
    y_ref, keep = _dropout_reference(ref, xr, 0.3, seed)
    y_ref.backward(dy)
    assert 0.6 < (keep > 0).float().mean().item() < 0.8  # ≈ 1 − p of the inputs reach the LoRA path
    assert torch.equal(keep.unique(), torch.tensor([0.0, 1 / 0.7]))
    for got, want in ((y, y_ref), (xf.grad, xr.grad), (fused.lora_A["default"].grad, ref.lora_A["default"].grad),
                      (fused.lora_B["default"].grad, ref.lora_B["default"].grad)):  # fmt: skip
        assert ((got - want).norm() / want.norm()).item() < 1e-6
    fused.eval()  # no dropout in eval mode: the plain layer's output
    assert torch.allclose(fused(x), layer.eval()(x), atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_swiglu_down_projection_with_dropout_matches_the_formula(backend):
    """Also with the Triton dropout kernel: its mask drawn again in backward is the forward's."""
    if backend == "triton":
        pytest.importorskip("triton")
    from lowbit.kernels.lora_fused import dropout_seed, swiglu_qlora
    from lowbit.kernels.swiglu import swiglu_reference

    layer = _layer("dequant")
    gate, up, dy = torch.randn(10, 64), torch.randn(10, 64), torch.randn(10, 48)
    torch.manual_seed(4)
    seed = dropout_seed(0.25)
    torch.manual_seed(4)
    g, u = gate.clone().requires_grad_(), up.clone().requires_grad_()
    y = swiglu_qlora(g, u, layer.base_layer, layer.lora_A["default"], layer.lora_B["default"], 2.0, backend, 0.25)
    y.backward(dy)
    got = (y.detach(), g.grad, u.grad, layer.lora_A["default"].grad.clone())
    layer.zero_grad()
    g2, u2 = gate.clone().requires_grad_(), up.clone().requires_grad_()
    y_ref, keep = _dropout_reference(layer, swiglu_reference(g2, u2), 0.25, seed, backend)
    assert 0 < (keep == 0).sum() < keep.numel() / 2
    y_ref.backward(dy)
    for a, b in zip(got, (y_ref.detach(), g2.grad, u2.grad, layer.lora_A["default"].grad)):
        assert ((a - b).norm() / b.norm()).item() < 1e-6
    with pytest.raises(ValueError, match="dropout"):
        swiglu_qlora(g, u, layer.base_layer, layer.lora_A["default"], layer.lora_B["default"], 2.0, "torch", 1.0)


def test_the_dropout_kernel_draws_a_fair_repeatable_mask():
    """train_triton.dropout (interpreted): the same seed gives the same mask, another seed another; kept values
    are x / (1 - p); the kept share is 1 - p within 5 binomial standard deviations; neighbouring
    elements are uncorrelated."""
    pytest.importorskip("triton")
    from lowbit.kernels.lora_fused import dropped

    torch.manual_seed(0)
    x = torch.randn(64, 1024) + 3.0  # no zeros of its own
    p = 0.1
    y = dropped(x, p, 123, "triton")
    assert torch.equal(y, dropped(x, p, 123, "triton"))
    other = dropped(x, p, 124, "triton")
    kept = y != 0
    assert not torch.equal(kept, other != 0)
    assert torch.allclose(y[kept], x[kept] / (1 - p), rtol=1e-6, atol=0)
    n = x.numel()
    share = kept.float().mean().item()
    assert abs(share - (1 - p)) < 5 * (p * (1 - p) / n) ** 0.5
    k = kept.flatten().float() - (1 - p)
    assert abs((k[1:] * k[:-1]).mean().item()) / (p * (1 - p)) < 0.03
    yb = dropped(x.to(torch.bfloat16), p, 123, "triton")
    assert torch.equal(yb != 0, kept)  # the mask depends on the seed and the position only, not the dtype


def test_a_captured_dropout_seed_lives_on_the_device_and_gives_the_numbers_mask(monkeypatch):
    """Inside a CUDA graph capture the seed is drawn by the device's generator into a one-element tensor (each
    replay draws anew); the kernel reads it and draws the mask that number gives. Simulated on the CPU."""
    pytest.importorskip("triton")
    from lowbit.kernels.lora_fused import dropout_seed, dropped

    x = torch.randn(8, 256) + 3.0
    assert isinstance(dropout_seed(0.1, x.device), int) and dropout_seed(0.0, x.device) is None
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert isinstance(dropout_seed(0.1, x.device), int)  # a CPU tensor is never captured
    cuda_like = torch.device("cuda")
    drawn = []
    monkeypatch.setattr(torch, "randint", lambda low, high, size, device=None: drawn.append(device) or
                        torch.full(size, 123, dtype=torch.int64))  # fmt: skip
    seed = dropout_seed(0.1, cuda_like)
    assert drawn == [cuda_like] and torch.is_tensor(seed) and seed.shape == (1,)
    assert torch.equal(dropped(x, 0.1, seed, "triton"), dropped(x, 0.1, 123, "triton"))
    with pytest.raises(RuntimeError, match="Triton dropout kernel"):
        dropped(x, 0.1, seed, "torch")
