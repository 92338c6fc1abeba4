"""Fused RoPE against transformers' apply_rotary_pos_emb (Llama), forward and backward, both layouts."""

import importlib.util

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from lowbit.kernels.rope import apply_rope

BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                                                       reason="Triton is not installed"))]


def _cos_sin(batch, seq, head_dim, dtype):
    cfg = LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, max_position_embeddings=64)
    x = torch.zeros(1, dtype=dtype)
    positions = torch.stack([torch.arange(seq) + 3 * b for b in range(batch)])  # different per sequence
    return LlamaRotaryEmbedding(cfg)(x, positions)  # (B, T, D) each, in x's dtype


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("unsqueeze_dim", [1, 2])
def test_rope_matches_transformers(backend, unsqueeze_dim):
    torch.manual_seed(0)
    tol = 1e-12 if backend == "torch" else 1e-6  # the kernel computes in float32 registers
    b, hq, hk, t, d = 2, 4, 2, 5, 16
    cos, sin = _cos_sin(b, t, d, torch.float64)
    shape = (lambda h: (b, h, t, d)) if unsqueeze_dim == 1 else (lambda h: (b, t, h, d))
    q = torch.randn(*shape(hq), dtype=torch.float64, requires_grad=True)
    k = torch.randn(*shape(hk), dtype=torch.float64, requires_grad=True)
    dq, dk = torch.randn_like(q), torch.randn_like(k)
    q_ref, k_ref = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
    qo_ref, ko_ref = apply_rotary_pos_emb(q_ref, k_ref, cos, sin, unsqueeze_dim)
    ((qo_ref * dq).sum() + (ko_ref * dk).sum()).backward()
    qo, ko = apply_rope(q, k, cos, sin, unsqueeze_dim, backend)
    ((qo * dq).sum() + (ko * dk).sum()).backward()
    for got, want in ((qo, qo_ref), (ko, ko_ref), (q.grad, q_ref.grad), (k.grad, k_ref.grad)):
        assert got.shape == want.shape
        assert torch.allclose(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rope_bf16_on_a_transposed_view(backend):
    """q as transformers makes it, a (B, T, H, D) projection viewed as (B, H, T, D), in bfloat16."""
    torch.manual_seed(1)
    b, h, t, d = 1, 3, 4, 8
    cos, sin = _cos_sin(b, t, d, torch.bfloat16)
    q = torch.randn(b, t, h * d).to(torch.bfloat16).view(b, t, h, d).transpose(1, 2)
    k = torch.randn(b, t, h * d).to(torch.bfloat16).view(b, t, h, d).transpose(1, 2)
    qo, ko = apply_rope(q, k, cos, sin, backend=backend)
    qo_ref, ko_ref = apply_rotary_pos_emb(q, k, cos, sin)
    # transformers rounds each product and the sum to bf16; the kernel rounds once (by truncation in Triton's
    # interpreter, to nearest on a GPU): a few bf16 ulps of the largest term apart.
    for got, want in ((qo, qo_ref), (ko, ko_ref)):
        assert (got.float() - want.float()).abs().max().item() <= 2 ** -5 * want.float().abs().max().item()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("trains", ["q", "k"])
def test_rope_gradient_of_one_input_only(backend, trains):
    """One pass rotates q and k; when only one of them needs a gradient, backward rotates that one alone."""
    torch.manual_seed(2)
    cos, sin = _cos_sin(1, 6, 8, torch.float64)
    q, k = torch.randn(1, 4, 6, 8, dtype=torch.float64), torch.randn(1, 2, 6, 8, dtype=torch.float64)
    leaf = (q if trains == "q" else k).requires_grad_()
    dq, dk = torch.randn_like(q), torch.randn_like(k)
    qo, ko = apply_rope(q, k, cos, sin, backend=backend)
    ((qo * dq).sum() + (ko * dk).sum()).backward()
    ref = leaf.detach().clone().requires_grad_()
    qr, kr = apply_rotary_pos_emb(ref, k, cos, sin) if trains == "q" else apply_rotary_pos_emb(q, ref, cos, sin)
    ((qr * dq).sum() + (kr * dk).sum()).backward()
    assert torch.allclose(leaf.grad, ref.grad, rtol=1e-6, atol=1e-6)
