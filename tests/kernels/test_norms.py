"""Fused RMSNorm against transformers' LlamaRMSNorm itself: forward and backward (x and weight).

float64 for the exact check (torch reference and the Triton kernel under TRITON_INTERPRET=1 on the CPU),
bfloat16 for the rounding transformers does (normalised x rounded to the input dtype before the weight).
"""

import importlib.util

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from lowbit.kernels.norms import FusedRMSNorm, rms_norm

BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                                                       reason="Triton is not installed"))]


def _llama_norm(weight: torch.Tensor, eps: float) -> LlamaRMSNorm:
    norm = LlamaRMSNorm(weight.shape[0], eps).to(weight.dtype)
    norm.weight.data.copy_(weight)
    return norm


def _grads(fn, x, w, dy):
    x, w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    y = fn(x, w)
    y.backward(dy)
    return y.detach(), x.grad, w.grad


def _rel(got, want):
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_rms_norm_matches_llama_forward_and_backward(backend, dtype):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 48, dtype=dtype) * 3  # D = 48: not a power of two
    w = 1 + 0.3 * torch.randn(48, dtype=dtype)
    dy = torch.randn(2, 5, 48, dtype=dtype)

    def llama(x, w):
        norm = LlamaRMSNorm(48, 1e-5).to(dtype)
        del norm.weight
        norm.weight = w  # a plain tensor attribute: the gradient reaches our leaf w
        return norm(x)

    got = _grads(lambda x, w: rms_norm(x, w, 1e-5, backend), x, w, dy)
    # LlamaRMSNorm takes its statistic in float32 even for float64 input: agreement to float32 precision.
    for g, want in zip(got, _grads(llama, x, w, dy)):
        assert g.dtype == want.dtype and _rel(g, want) < 1e-6
    if dtype == torch.float64 and backend == "torch":  # and exact against the formula in float64
        formula = _grads(lambda x, w: w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5), x, w, dy)
        for g, want in zip(got, formula):
            assert _rel(g, want) < 1e-13


@pytest.mark.parametrize("backend", BACKENDS)
def test_rms_norm_bf16_rounds_like_transformers(backend):
    torch.manual_seed(1)
    x = torch.randn(7, 64, dtype=torch.bfloat16)
    w = (1 + 0.1 * torch.randn(64)).to(torch.bfloat16)
    y = FusedRMSNorm(torch.nn.Parameter(w), 1e-6, backend)(x)
    want = _llama_norm(w, 1e-6)(x)
    # One bf16 rounding of x̂ and one of x̂·w on both sides; rsqrt may differ in the last float32 bit. Triton's
    # interpreter casts to bf16 by truncation (the GPU rounds to nearest): two ulps apart at most there.
    ulps = 2 if backend == "triton" else 1
    assert ((y.float() - want.float()).abs() <= ulps * 2 ** -7 * want.float().abs()).all()
    dy = torch.randn(7, 64, dtype=torch.bfloat16)
    xr = x.clone().requires_grad_()
    _llama_norm(w, 1e-6)(xr).backward(dy)
    xf = x.clone().requires_grad_()
    rms_norm(xf, w, 1e-6, backend).backward(dy)
    assert ((xf.grad.float() - xr.grad.float()).norm() / xr.grad.float().norm()).item() < 1e-2
