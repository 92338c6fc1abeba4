"""Fused rotary position embedding (Su et al. 2021, RoFormer eq. 34) of queries and keys, with backward.

transformers' `apply_rotary_pos_emb(q, k, cos, sin)` computes x·cos + rotate_half(x)·sin, rotate_half
(x₁, x₂) = (−x₂, x₁) over the two halves of head_dim: a slice, a negation, a concatenation, two products
and a sum per tensor, each a kernel, and autograd keeps cos/sin products. Here it is one pass per tensor
reading x once; the map is linear in x, so the backward is the same pass with its transpose
(dx₁ = dy₁·cos₁ + dy₂·sin₂, dx₂ = dy₂·cos₂ − dy₁·sin₁) and only cos and sin are saved.

cos and sin (B or 1, T, D) are treated as constants (transformers computes them from positions under
no_grad), so no gradient flows to them.

transformers' attention modules call `apply_rotary_pos_emb` as a module-level function, so
`fuse_for_training` does not route them here (that would mean patching transformers' module globals);
use `apply_rope` from a custom attention forward.
"""

from __future__ import annotations

import torch

from lowbit.kernels.dispatch import use_triton


def rotate_half_reference(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D), cos/sin (B, T, D)."""
    return x * cos[:, None] + rotate_half_reference(x) * sin[:, None]


def rope_grad_reference(dy: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The transpose of rope_reference: dx = dy·cos + rotate_halfᵀ(dy·sin), rotate_halfᵀ(v₁, v₂) = (v₂, −v₁)."""
    v1, v2 = (dy * sin[:, None]).chunk(2, dim=-1)
    return dy * cos[:, None] + torch.cat((v2, -v1), dim=-1)


def _rotate(x, cos, sin, triton: bool, backward: bool) -> torch.Tensor:
    if triton:
        from lowbit.kernels import train_triton

        return train_triton.rope(x, cos, sin, backward)
    return rope_grad_reference(x, cos, sin) if backward else rope_reference(x, cos, sin)


class _RoPE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin, backend: str):
        ctx.triton = use_triton(q, backend)
        ctx.save_for_backward(cos, sin)
        return _rotate(q, cos, sin, ctx.triton, False), _rotate(k, cos, sin, ctx.triton, False)

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        dq = None if dq is None or not ctx.needs_input_grad[0] else _rotate(dq, cos, sin, ctx.triton, True)
        dk = None if dk is None or not ctx.needs_input_grad[1] else _rotate(dk, cos, sin, ctx.triton, True)
        return dq, dk, None, None, None


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1,
               backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Same contract as transformers' apply_rotary_pos_emb: q (B, Hq, T, D), k (B, Hk, T, D) and
    cos/sin (B, T, D) with unsqueeze_dim=1; or q/k (B, T, H, D) with unsqueeze_dim=2."""
    if unsqueeze_dim not in (1, 2):
        raise ValueError(f"unsqueeze_dim must be 1 (B, H, T, D) or 2 (B, T, H, D), got {unsqueeze_dim}")
    if cos.dim() == 2:  # (T, D): one set of positions for every sequence
        cos, sin = cos[None], sin[None]
    if unsqueeze_dim == 2:  # views, not copies: the kernel reads any strides
        q_out, k_out = _RoPE.apply(q.transpose(1, 2), k.transpose(1, 2), cos, sin, backend)
        return q_out.transpose(1, 2), k_out.transpose(1, 2)
    return _RoPE.apply(q, k, cos, sin, backend)
