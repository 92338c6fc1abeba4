"""Fused RMSNorm (Zhang & Sennrich 2019) with a hand-written backward: y = w ⊙ x / √(mean(x²) + ε).

Numerics follow transformers' LlamaRMSNorm (also Qwen2's and Mistral's): the statistic is taken in
float32, the normalised x is rounded to the input dtype, then multiplied by the weight (the output has
the promoted dtype of x and w). Unfused, that module runs ~7 kernels and autograd keeps the float32
copy of x, the normalised x and more; here the forward is one pass that saves x and one float32 rstd
per row, and the backward one pass: dx = r·(g − x̂·mean(g ⊙ x̂)), g = dy ⊙ w, x̂ = x·r.

The weight gradient (a column sum over all rows) is computed with torch only when the weight trains
(not in LoRA/QLoRA, where norms are frozen).
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.kernels.dispatch import use_triton


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, rstd) in torch, the same operations as LlamaRMSNorm. x (M, D), rstd (M,) float32 or float64."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    rstd = torch.rsqrt(xf.pow(2).mean(-1) + eps)  # (M,)
    return weight * (xf * rstd[:, None]).to(x.dtype), rstd


def rms_norm_grad_input_reference(dy, x, weight, rstd) -> torch.Tensor:
    compute = torch.promote_types(x.dtype, torch.float32)
    xh = x.to(compute) * rstd[:, None].to(compute)  # (M, D)
    g = dy.to(compute) * weight.to(compute)
    return (rstd[:, None] * (g - xh * (g * xh).mean(-1, keepdim=True))).to(x.dtype)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, backend: str) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()  # (M, D)
        triton = use_triton(x2, backend)
        if triton:
            from lowbit.kernels import train_triton

            y, rstd = train_triton.rms_norm_forward(x2, weight, eps, torch.promote_types(x.dtype, weight.dtype))
        else:
            y, rstd = rms_norm_reference(x2, weight, eps)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.triton, ctx.shape = triton, shape
        return y.reshape(*shape[:-1], -1)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, weight, rstd = ctx.saved_tensors
        dy2 = dy.reshape(x2.shape).contiguous()
        dx = dw = None
        if ctx.needs_input_grad[0]:
            if ctx.triton:
                from lowbit.kernels import train_triton

                dx = train_triton.rms_norm_backward(dy2, x2, weight, rstd)
            else:
                dx = rms_norm_grad_input_reference(dy2, x2, weight, rstd)
            dx = dx.reshape(ctx.shape)
        if ctx.needs_input_grad[1]:  # frozen in (Q)LoRA; a second pass only when the norm itself trains
            xn = (x2.to(rstd.dtype) * rstd[:, None]).to(x2.dtype)
            dw = (dy2.to(rstd.dtype) * xn.to(rstd.dtype)).sum(0).to(weight.dtype)
        return dx, dw, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, backend: str = "auto") -> torch.Tensor:
    """RMSNorm of x (…, D) with weight (D,), differentiable in both; `backend` as in `dispatch.use_triton`."""
    return _RMSNorm.apply(x, weight, eps, backend)


class FusedRMSNorm(nn.Module):
    """Drop-in for LlamaRMSNorm / Qwen2RMSNorm / MistralRMSNorm: same `weight` and `variance_epsilon`."""

    def __init__(self, weight: nn.Parameter, eps: float, backend: str = "auto") -> None:
        super().__init__()
        self.weight = weight  # the replaced module's own Parameter: state dict and optimizer unchanged
        self.variance_epsilon = eps
        self.backend = backend

    @classmethod
    def from_module(cls, norm: nn.Module, backend: str = "auto") -> FusedRMSNorm:
        return cls(norm.weight, norm.variance_epsilon, backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.variance_epsilon, self.backend)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}, backend={self.backend}"
