"""Chunked linear cross-entropy: loss and gradients equal F.cross_entropy(h·Wᵀ) (float64), and no
(tokens, vocab) tensor is ever kept for the backward (checked with saved-tensor hooks; on a GPU also
with the allocator's peak)."""

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from lowbit.kernels.cross_entropy import CHUNK_BYTES, causal_lm_loss, linear_cross_entropy

BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                                                       reason="Triton is not installed"))]


def _data(n=37, d=16, v=300, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    h = torch.randn(n, d, dtype=dtype, requires_grad=True)
    w = (torch.randn(v, d, dtype=dtype) / 4).requires_grad_()
    labels = torch.randint(0, v, (n,))
    labels[::5] = -100  # some ignored positions
    return h, w, labels


def _reference(h, w, labels, reduction="mean"):
    h, w = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    loss = F.cross_entropy(h @ w.t(), labels, ignore_index=-100, reduction=reduction)
    loss.backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction, chunk", [("mean", 8), ("sum", 5), ("mean", None)])
def test_loss_and_grads_match_cross_entropy_float64(backend, reduction, chunk):
    h, w, labels = _data()
    loss = linear_cross_entropy(h, w, labels, reduction=reduction, chunk_size=chunk, backend=backend)
    (2.5 * loss).backward()  # a non-unit incoming gradient reaches both
    want_loss, want_h, want_w = _reference(h, w, labels, reduction)
    tol = 1e-12 if backend == "torch" else 1e-6  # the Triton kernel computes in float32 registers
    assert abs(loss.item() - want_loss.item()) <= tol * abs(want_loss.item())
    for got, want in ((h.grad, 2.5 * want_h), (w.grad, 2.5 * want_w)):
        assert ((got - want).norm() / want.norm()).item() < tol


def test_bf16_follows_transformers_numerics():
    """bf16 logits and a float32 loss, like ForCausalLMLoss's logits.float(): the same to float32 precision."""
    h, w, labels = _data(dtype=torch.bfloat16)
    loss = linear_cross_entropy(h, w, labels, chunk_size=8)
    loss.backward()
    want_loss, want_h, _ = _reference(h, w, labels)
    want = F.cross_entropy((h.detach() @ w.detach().t()).float(), labels)
    assert loss.dtype == torch.float32 and abs(loss.item() - want.item()) < 1e-5
    assert ((h.grad.float() - want_h.float()).norm() / want_h.float().norm()).item() < 2e-2


def test_all_ignored_and_no_grad():
    h, w, labels = _data(n=6)
    loss = linear_cross_entropy(h, w, torch.full((6,), -100), chunk_size=4)
    assert loss.item() == 0.0
    loss.backward()
    assert h.grad.abs().max().item() == 0.0
    want = _reference(h, w, labels)[0]
    with torch.no_grad():  # the loss alone: no gradient work, a result without grad_fn
        loss = linear_cross_entropy(h, w, labels, chunk_size=4)
    assert loss.grad_fn is None and torch.allclose(loss, want, rtol=1e-12)


def test_nothing_vocab_sized_per_token_is_saved_for_backward():
    n, d, v = 64, 8, 500
    h, w, labels = _data(n, d, v, dtype=torch.float32)
    w.requires_grad_(False)  # the QLoRA case: a frozen head, only dh is kept

    def saved_numels(fn) -> list[int]:
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            fn().backward()
        return sizes

    fused = saved_numels(lambda: linear_cross_entropy(h, w, labels, chunk_size=16))
    unfused = saved_numels(lambda: F.cross_entropy(h @ w.t(), labels))
    assert max(unfused) >= n * v  # the hooks do see the full logits of the plain path
    assert max(fused) <= n * d  # only dh (N, d): nothing of size N·V, nor chunk·V


@pytest.mark.skipif(not torch.cuda.is_available(), reason="peak-memory measurement needs CUDA")
def test_peak_memory_below_full_logits_on_gpu():
    n, d, v = 16384, 1024, 32000  # bf16 logits: 1,000 MiB, four times the chunk budget
    h = torch.randn(n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(v, d, device="cuda", dtype=torch.bfloat16) / 32
    labels = torch.randint(0, v, (n,), device="cuda")

    def peak(fn) -> int:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        fn().backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start

    fused = peak(lambda: linear_cross_entropy(h, w, labels))
    plain = peak(lambda: F.cross_entropy((h @ w.t()).float(), labels))
    assert fused < CHUNK_BYTES + 4 * n * d * 2 < n * v * 2 < plain  # one chunk's logits, dh, h's copies


def test_causal_lm_loss_is_transformers_for_causal_lm_loss():
    from transformers.loss.loss_utils import ForCausalLMLoss

    torch.manual_seed(0)
    hidden = torch.randn(2, 9, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, dtype=torch.float64)
    labels = torch.randint(0, 50, (2, 9))
    labels[0, :3] = -100
    # ForCausalLMLoss upcasts logits with .float(): agreement to float32 precision.
    got = causal_lm_loss(hidden, w, labels, chunk_size=4)
    assert abs(got.item() - ForCausalLMLoss(hidden @ w.t(), labels, vocab_size=50).item()) < 1e-5
    got = causal_lm_loss(hidden, w, labels, num_items_in_batch=7, chunk_size=4)
    want = ForCausalLMLoss(hidden @ w.t(), labels, vocab_size=50, num_items_in_batch=7)
    assert abs(got.item() - want.item()) < 1e-5


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_triton_bf16_logits_gradient_written_in_place():
    """bf16 logits chunk: the kernel's float32 loss and its in-place bf16 gradient match the torch reference."""
    h, w, labels = _data(n=20, d=32, v=5000, dtype=torch.bfloat16)  # V > the kernel's 4096-wide block
    got = [linear_cross_entropy(h, w, labels, chunk_size=8, backend="triton")]
    got[0].backward()
    got.append(h.grad.clone())
    h.grad = None
    want = [linear_cross_entropy(h, w, labels, chunk_size=8, backend="torch")]
    want[0].backward()
    want.append(h.grad)
    assert abs(got[0].item() - want[0].item()) < 1e-5 * want[0].item()
    # bf16 gradient rows: Triton's interpreter truncates to bf16 where torch rounds to nearest
    assert ((got[1].float() - want[1].float()).norm() / want[1].float().norm()).item() < 2e-2


def test_default_chunk_fills_the_byte_budget():
    from lowbit.kernels.cross_entropy import default_chunk_size

    assert default_chunk_size(2048, 128256, 2) == 1024  # Llama-3 in bf16: 1,024 × 128,256 × 2 B ≤ 256 MiB
    assert default_chunk_size(2048, 128256, 4) == 512
    assert default_chunk_size(100, 128256, 2) == 128  # never more rows than the next power of two of n
    assert default_chunk_size(1, 10**9, 4) == 1
