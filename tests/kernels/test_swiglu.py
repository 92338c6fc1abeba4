"""Fused SwiGLU / GeGLU against transformers' own MLP activations (ACT2FN[act](gate) * up), forward and backward."""

import importlib.util

import pytest
import torch
from transformers.activations import ACT2FN

from lowbit.kernels.swiglu import SwiGLUMLP, geglu, swiglu

BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                                                       reason="Triton is not installed"))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("act, op", [("silu", swiglu), ("gelu_pytorch_tanh", geglu)])  # SwiGLU; GeGLU (Gemma)
def test_gated_activation_matches_transformers_act(backend, dtype, tol, act, op):
    """Forward and the hand-written backward against transformers' ACT2FN[act](gate) * up."""
    torch.manual_seed(0)
    gate = (torch.randn(3, 5, 70) * 4).to(dtype).requires_grad_()  # 1,050 elements: two ragged blocks
    up = torch.randn(3, 5, 70).to(dtype).requires_grad_()
    dy = torch.randn(3, 5, 70).to(dtype)
    g_ref, u_ref = gate.detach().clone().requires_grad_(), up.detach().clone().requires_grad_()
    y_ref = ACT2FN[act](g_ref) * u_ref
    y_ref.backward(dy)
    y = op(gate, up, backend)
    y.backward(dy)
    assert y.dtype == dtype
    if dtype == torch.bfloat16 and backend == "torch":  # act rounded to bf16 before the product: bit-identical
        assert torch.equal(y, y_ref)  # (Triton's interpreter truncates to bf16 where the GPU rounds to nearest)
    tol = max(tol, 1e-6) if backend == "triton" else tol  # the kernel computes in float32 registers
    for got, want in ((y, y_ref), (gate.grad, g_ref.grad), (up.grad, u_ref.grad)):
        assert ((got.double() - want.double()).norm() / want.double().norm()).item() < tol


def test_swiglu_mlp_is_the_llama_mlp():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    torch.manual_seed(0)
    mlp = LlamaMLP(LlamaConfig(hidden_size=16, intermediate_size=40, num_attention_heads=4)).double()
    fused = SwiGLUMLP.from_module(mlp, "torch")
    x = torch.randn(2, 3, 16, dtype=torch.float64)
    assert torch.allclose(fused(x), mlp(x), rtol=1e-12, atol=1e-12)
    assert fused.state_dict().keys() == mlp.state_dict().keys()

