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
