"""Chunked linear cross-entropy: the LM-head matmul and the loss without the (tokens, vocab) logits.

A causal LM's loss is CE(h·Wᵀ, labels) with h (N, d) the final hidden states and W (V, d) the LM head.
With Llama-3's V = 128,256, a batch of 16K tokens makes 16K × 128K logits: 4 GiB in bf16, 8 GiB more for
the float32 upcast transformers' loss does, and as much again for their gradient — the largest tensors
of a QLoRA step. Here rows are processed `chunk_size` at a time (the trick of Liger-Kernel's
FusedLinearCrossEntropy and Wijmans et al. 2024, "Cut Your Losses"): for each chunk,

    z = h_c·Wᵀ                               (c, V) in h's dtype, the only vocab-sized buffer
    loss_c = logsumexp(z) − z[label]         one pass over z (Triton) or the float32 torch reference
    z ← s·(softmax(z) − onehot(label))       d loss / d z, written over z (s: 1/#tokens for the mean)
    dh_c = z·W,  dW += zᵀ·h_c                 the gradients, finished in the forward

so peak memory is O(chunk_size × V), and only dh (N, d) (and dW, if the head trains) is kept for the
backward, which merely scales them by the incoming gradient of the loss. Labels equal to
`ignore_index` (−100) contribute neither loss nor gradient; numerics match transformers'
ForCausalLMLoss (bf16 logits, loss in float32).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lowbit.kernels.dispatch import autocast_dtype, use_triton

IGNORE_INDEX = -100
REDUCTIONS = ("mean", "sum")


def cross_entropy_chunk_reference(logits: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor,
                                  ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(per-row loss (c,), scale·(softmax − onehot) (c, V) in logits' dtype) in float32 (float64 for float64)."""
    x = logits.to(torch.promote_types(logits.dtype, torch.float32))
    lse = torch.logsumexp(x, dim=-1)  # (c,)
    valid = labels != ignore_index
    target = labels.where(valid, 0)
    rows = torch.arange(x.shape[0], device=x.device)
    loss = torch.where(valid, lse - x[rows, target], 0.0)
    grad = torch.exp(x - lse[:, None])
    grad[rows, target] -= 1.0
    grad *= (scale.to(x.dtype) * valid)[:, None]
    return loss, grad.to(logits.dtype)


CHUNK_BYTES = 256 * 2**20  # the (chunk, V) logits buffer's budget


def default_chunk_size(n: int, vocab: int, itemsize: int) -> int:
    """The most rows (a power of two, ≤ what n needs) whose logits fit in CHUNK_BYTES.

    Every chunk reads all of W: with Liger's choice of about V/d chunks (64 rows for Llama-3 at 2,048 tokens)
    each (64, d)·(d, V) product is bound by reading W's 1 GiB, and the loss took 40 % of an 8-block QLoRA
    step on an H100 (bench/RESULTS.md). 1,024 rows of a 128k vocabulary (256 MiB in bf16) are compute-bound.
    """
    rows = max(1, CHUNK_BYTES // (vocab * itemsize))
    rows = 2 ** int(math.log2(rows))
    return min(rows, 2 ** math.ceil(math.log2(max(1, n))))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, labels, ignore_index: int, reduction: str, chunk_size: int | None, backend: str,
                grad_enabled: bool):  # fmt: skip
        n = h.shape[0]
        # needs_input_grad is set even under torch.no_grad(): the caller's grad mode decides.
        need_h, need_w = grad_enabled and ctx.needs_input_grad[0], grad_enabled and ctx.needs_input_grad[1]
        valid = labels != ignore_index
        count = valid.sum()
        # The gradient's scale is known before the first chunk: 1/#tokens for the mean, kept on the device
        # (no host sync). float64 for float64 inputs, so the reference test is exact.
        acc = torch.promote_types(h.dtype, torch.float32)
        ones = torch.ones((), dtype=acc, device=h.device)
        scale = 1.0 / count.clamp(min=1).to(acc) if reduction == "mean" else ones
        triton = use_triton(h, backend)
        dtype = autocast_dtype(h.device, h.dtype)  # the logits' dtype (bf16 under bf16 autocast)
        chunk = chunk_size or default_chunk_size(n, weight.shape[0], dtype.itemsize)
        w_c = weight.to(dtype)  # a no-op without autocast
        loss = torch.zeros((), dtype=acc, device=h.device)
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=h.device) if need_w else None
        for start in range(0, n, chunk):
            h_c, y_c = h[start : start + chunk], labels[start : start + chunk]
            with torch.autocast(h.device.type, enabled=False):
                logits = h_c.to(dtype) @ w_c.t()  # (c, V), the only vocab-sized buffer
            if triton:
                from lowbit.kernels import train_triton

                row_loss = train_triton.cross_entropy_rows(logits, y_c, scale.float(), ignore_index, need_h or need_w)
                grad = logits  # overwritten in place with the gradient
            else:
                row_loss, grad = cross_entropy_chunk_reference(logits, y_c, scale, ignore_index)
            loss += row_loss.sum()
            with torch.autocast(h.device.type, enabled=False):
                if need_h:
                    grad_h[start : start + chunk] = grad @ w_c  # (c, V) @ (V, d)
                if need_w:
                    grad_w += (grad.t() @ h_c.to(dtype)).to(acc)  # (V, c) @ (c, d)
            del logits, grad
        ctx.save_for_backward(grad_h, None if grad_w is None else grad_w.to(weight.dtype))
        return loss * scale

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        grad_h = None if grad_h is None else grad_h * grad_loss.to(grad_h.dtype)
        grad_w = None if grad_w is None else grad_w * grad_loss.to(grad_w.dtype)
        return grad_h, grad_w, None, None, None, None, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                         reduction: str = "mean", chunk_size: int | None = None,
                         backend: str = "auto") -> torch.Tensor:  # fmt: skip
    """CE(h·Wᵀ, labels) for h (N, d), W (V, d), labels (N,), never holding more than chunk_size × V logits.

    reduction "mean" (over labels ≠ ignore_index, 0 when there are none) or "sum". Differentiable in h and
    W; the gradients are computed during the forward (the backward only scales them), so call it where a
    backward will follow, or under torch.no_grad() for the loss alone.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if h.dim() != 2 or weight.dim() != 2 or h.shape[1] != weight.shape[1] or labels.shape != h.shape[:1]:
        raise ValueError(f"need h (N, d), weight (V, d), labels (N,); got {tuple(h.shape)}, {tuple(weight.shape)}, "
                         f"{tuple(labels.shape)}")  # fmt: skip
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be ≥ 1, got {chunk_size}")
    return _LinearCrossEntropy.apply(h, weight, labels, ignore_index, reduction, chunk_size, backend,
                                     torch.is_grad_enabled())


def causal_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                   num_items_in_batch: int | torch.Tensor | None = None, chunk_size: int | None = None,
                   backend: str = "auto") -> torch.Tensor:  # fmt: skip
    """transformers' ForCausalLMLoss over hidden states: position t predicts labels[t + 1].

    hidden (B, T, d), labels (B, T). Mean over predicted tokens, or the sum divided by
    `num_items_in_batch` when given (transformers' gradient-accumulation convention).
    """
    shifted = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]  # (B, T): the last position predicts nothing
    h = hidden.reshape(-1, hidden.shape[-1])
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = linear_cross_entropy(h, weight, shifted.reshape(-1).to(h.device), ignore_index, reduction, chunk_size,
                                backend)  # fmt: skip
    if num_items_in_batch is not None:
        items = num_items_in_batch
        loss = loss / (items.to(loss.device) if torch.is_tensor(items) else items)
    return loss
