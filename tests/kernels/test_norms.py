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


def _saved_storages(fn, *args) -> set[int]:
    """Addresses of the storages autograd keeps for backward while `fn(*args)` runs."""
    kept = set()

    def pack(t):
        kept.add(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    return kept, out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_rms_norm_backward_from_its_output(backend, dtype):
    """save_output=True recovers x̂ = y / w: the gradient of x is LlamaRMSNorm's, and x itself is not kept."""
    torch.manual_seed(2)
    x = torch.randn(6, 40, dtype=dtype) * 2
    w = (1 + 0.5 * torch.randn(40)).to(dtype)  # both signs, |w| from ~0 to ~2.5
    dy = torch.randn(6, 40, dtype=dtype)
    xr = x.clone().requires_grad_()
    _llama_norm(w, 1e-5)(xr).backward(dy)
    xo = x.clone().requires_grad_()
    kept, y = _saved_storages(lambda: rms_norm(xo, w, 1e-5, backend, save_output=True))
    assert y.untyped_storage().data_ptr() in kept and x.untyped_storage().data_ptr() not in kept
    y.backward(dy)
    # float64: LlamaRMSNorm's float32 statistic sets the agreement; bf16: y's rounding enters x̂ (2⁻⁹)
    assert _rel(xo.grad, xr.grad) < (1e-6 if dtype == torch.float64 else 1e-2)
    xi = x.clone().requires_grad_()
    rms_norm(xi, w, 1e-5, backend).backward(dy)
    if dtype == torch.float64:  # against the path that keeps x, to rounding (the Triton kernel: float32)
        assert _rel(xo.grad, xi.grad) < (1e-13 if backend == "torch" else 1e-6)


def test_fused_norm_keeps_its_output_only_for_a_frozen_weight_without_zeros():
    torch.manual_seed(3)
    x = torch.randn(4, 32, dtype=torch.bfloat16, requires_grad=True)
    norm = FusedRMSNorm(torch.nn.Parameter(torch.rand(32).to(torch.bfloat16) + 0.5, requires_grad=False), 1e-6)

    def keeps_output():
        kept, y = _saved_storages(norm, x)
        assert (y.untyped_storage().data_ptr() in kept) != (x.untyped_storage().data_ptr() in kept)
        return y.untyped_storage().data_ptr() in kept

    assert keeps_output()
    with torch.no_grad():  # in place: the weight's version moves, so the check runs again
        norm.weight[5] = 0
    assert not keeps_output()
    with torch.no_grad():
        norm.weight[5] = 1
    assert keeps_output()
    norm.weight.requires_grad_(True)  # a training weight changes each step: keep x, exact
    assert not keeps_output()
