"""Fused rotary position embedding (Su et al. 2021, RoFormer eq. 34) of queries and keys, with backward.

transformers' `apply_rotary_pos_emb(q, k, cos, sin)` computes x·cos + rotate_half(x)·sin, rotate_half
(x₁, x₂) = (−x₂, x₁) over the two halves of head_dim: a slice, a negation, a concatenation, two products
and a sum per tensor, each a kernel, and autograd keeps cos/sin products. Here it is one pass per tensor
reading x once; the map is linear in x, so the backward is the same pass with its transpose
(dx₁ = dy₁·cos₁ + dy₂·sin₂, dx₂ = dy₂·cos₂ − dy₁·sin₁) and only cos and sin are saved.

cos and sin (B or 1, T, D) are treated as constants (transformers computes them from positions under
no_grad), so no gradient flows to them.

`fuse_for_training` routes transformers' Llama / Qwen2 / Mistral attention here without patching
transformers (`fuse.route_rope`); a custom attention forward can call `apply_rope` directly. q and k go
through one kernel launch, forward and backward: an eager step pays host time per launch.
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


def _rotate(q, k, cos, sin, triton: bool, backward: bool):
    """(q, k) rotated, or their gradients rotated back; k may be None."""
    if triton:
        from lowbit.kernels import train_triton

        return train_triton.rope(q, k, cos, sin, backward)
    rotate = rope_grad_reference if backward else rope_reference
    return rotate(q, cos, sin), None if k is None else rotate(k, cos, sin)


class _RoPE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin, backend: str):
        ctx.triton = use_triton(q, backend)
        ctx.save_for_backward(cos, sin)
        return _rotate(q, k, cos, sin, ctx.triton, False)

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        dq = dq if ctx.needs_input_grad[0] else None
        dk = dk if ctx.needs_input_grad[1] else None
        if dq is None and dk is None:
            return None, None, None, None, None
        if dq is None:  # the pass needs its first tensor
            return None, _rotate(dk, None, cos, sin, ctx.triton, True)[0], None, None, None
        return *_rotate(dq, dk, cos, sin, ctx.triton, True), None, None, None


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
