"""Fused RMSNorm (Zhang & Sennrich 2019) with a hand-written backward: y = w ⊙ x / √(mean(x²) + ε).

Numerics follow transformers' LlamaRMSNorm (also Qwen2's and Mistral's): the statistic is taken in
float32, the normalised x is rounded to the input dtype, then multiplied by the weight (the output has
the promoted dtype of x and w). Unfused, that module runs ~7 kernels and autograd keeps the float32
copy of x, the normalised x and more; here the forward is one pass that saves one float32 rstd per row and
either x or the output y, and the backward one pass: dx = r·(g − x̂·mean(g ⊙ x̂)), g = dy ⊙ w, with
x̂ = x·r, or x̂ = y / w from the output.

Saving the output is what `FusedRMSNorm` does whenever it can (y no wider than x, w frozen and without
zeros): the layers after a norm (the q/k/v or gate/up projections, LoRA's A needs their input) keep y
alive for their own backward anyway, so the norm then adds no tensor of its own, one (tokens × hidden)
tensor less per norm, two per transformer block. y / w carries y's rounding (2⁻⁹ relative in bf16) into
x̂, where x·r is exact in float32.

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


def normalized(saved: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, from_output: bool) -> torch.Tensor:
    """x̂ (M, D) in float32 (float64 for float64 input) from the saved x (x·r) or the saved output (y / w)."""
    compute = torch.promote_types(saved.dtype, torch.float32)
    if from_output:
        return saved.to(compute) / weight.to(compute)
    return saved.to(compute) * rstd[:, None].to(compute)


def rms_norm_grad_input_reference(dy, saved, weight, rstd, from_output: bool = False) -> torch.Tensor:
    xh = normalized(saved, weight, rstd, from_output)
    g = dy.to(xh.dtype) * weight.to(xh.dtype)
    return (rstd[:, None].to(xh.dtype) * (g - xh * (g * xh).mean(-1, keepdim=True))).to(saved.dtype)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, backend: str, save_output: bool):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()  # (M, D)
        triton = use_triton(x2, backend)
        if triton:
            from lowbit.kernels import train_triton

            y, rstd = train_triton.rms_norm_forward(x2, weight, eps, torch.promote_types(x.dtype, weight.dtype))
        else:
            y, rstd = rms_norm_reference(x2, weight, eps)
        ctx.from_output = save_output and y.dtype == x.dtype
        ctx.save_for_backward(y if ctx.from_output else x2, weight, rstd)
        ctx.triton, ctx.shape = triton, shape
        return y.reshape(*shape[:-1], -1)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        saved, weight, rstd = ctx.saved_tensors
        dy2 = dy.reshape(saved.shape).contiguous()
        dx = dw = None
        if ctx.needs_input_grad[0]:
            if ctx.triton:
                from lowbit.kernels import train_triton

                dx = train_triton.rms_norm_backward(dy2, saved, weight, rstd, ctx.from_output)
            else:
                dx = rms_norm_grad_input_reference(dy2, saved, weight, rstd, ctx.from_output)
            dx = dx.reshape(ctx.shape)
        if ctx.needs_input_grad[1]:  # frozen in (Q)LoRA; a second pass only when the norm itself trains
            xn = normalized(saved, weight, rstd, ctx.from_output)
            if not ctx.from_output:  # the forward rounded x̂ to x's dtype before the weight multiplied it
                xn = xn.to(saved.dtype).to(xn.dtype)
            dw = (dy2.to(xn.dtype) * xn).sum(0).to(weight.dtype)
        return dx, dw, None, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, backend: str = "auto",
             save_output: bool = False) -> torch.Tensor:  # fmt: skip
    """RMSNorm of x (…, D) with weight (D,), differentiable in both; `backend` as in `dispatch.use_triton`.

    ``save_output=True`` keeps the output instead of x for backward (see the module docstring); only for a
    weight without zeros, where y / w recovers x̂ (ignored when the output is wider than x)."""
    return _RMSNorm.apply(x, weight, eps, backend, save_output)


class FusedRMSNorm(nn.Module):
    """Drop-in for LlamaRMSNorm / Qwen2RMSNorm / MistralRMSNorm: same `weight` and `variance_epsilon`."""

    def __init__(self, weight: nn.Parameter, eps: float, backend: str = "auto") -> None:
        super().__init__()
        self.weight = weight  # the replaced module's own Parameter: state dict and optimizer unchanged
        self.variance_epsilon = eps
        self.backend = backend
        self._checked: tuple[int, int] | None = None  # (weight version, address) of the last zero check
        self._no_zeros = False

    @classmethod
    def from_module(cls, norm: nn.Module, backend: str = "auto") -> FusedRMSNorm:
        return cls(norm.weight, norm.variance_epsilon, backend)

    def _save_output(self) -> bool:
        """Keep y rather than x when w is frozen (as in (Q)LoRA) and has no zeros, so that y / w recovers x̂.
        The check runs again only when w changes: one host synchronisation then, none in a training step,
        nor under CUDA-graph capture. A training w keeps x (exact, and w changes every step)."""
        if self.weight.requires_grad or type(self.weight.data) is not torch.Tensor:  # e.g. an FSDP shard (DTensor)
            return False
        key = (self.weight._version, self.weight.data_ptr())
        if key != self._checked:
            self._no_zeros, self._checked = bool(self.weight.detach().ne(0).all()), key
        return self._no_zeros

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.variance_epsilon, self.backend, save_output=self._save_output())

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}, backend={self.backend}"
