"""Fused SwiGLU activation (Shazeer 2020, "GLU Variants Improve Transformer"): y = silu(gate) ⊙ up.

The Llama / Qwen2 / Mistral MLP is down(silu(gate(x)) ⊙ up(x)). Unfused, autograd keeps gate, silu(gate)
and up (three (tokens, intermediate) tensors, the largest activations of the block) and runs silu, its
backward and two products as separate kernels. Here the forward is one pass that saves only gate and
up, and the backward one pass recomputing σ(gate):

    du = dy ⊙ silu(g),   dg = dy ⊙ u ⊙ σ(g)·(1 + g·(1 − σ(g))).

Numerics follow `act_fn(gate) * up` in transformers: silu is rounded to the activation dtype before
the product.
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.kernels.dispatch import use_triton


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return nn.functional.silu(gate) * up


def swiglu_grad_reference(dy, gate, up) -> tuple[torch.Tensor, torch.Tensor]:
    compute = torch.promote_types(gate.dtype, torch.float32)
    g, u, d = gate.to(compute), up.to(compute), dy.to(compute)
    sig = torch.sigmoid(g)
    return (d * u * sig * (1 + g * (1 - sig))).to(gate.dtype), (d * g * sig).to(up.dtype)


def check_pair(gate: torch.Tensor, up: torch.Tensor) -> None:
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"gate and up must match, got {gate.dtype} {tuple(gate.shape)} and "
                         f"{up.dtype} {tuple(up.shape)}")  # fmt: skip


def swiglu_values(gate: torch.Tensor, up: torch.Tensor, triton: bool) -> torch.Tensor:
    """silu(gate) ⊙ up of contiguous tensors, without autograd: the Triton pass or the torch reference."""
    if triton:
        from lowbit.kernels import train_triton

        return train_triton.swiglu_forward(gate, up)
    return swiglu_reference(gate, up)


def swiglu_grads(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, triton: bool):
    """(d gate, d up) for the output gradient dy; all contiguous."""
    if triton:
        from lowbit.kernels import train_triton

        return train_triton.swiglu_backward(dy, gate, up)
    return swiglu_grad_reference(dy, gate, up)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, backend: str) -> torch.Tensor:
        check_pair(gate, up)
        gate, up = gate.contiguous(), up.contiguous()
        ctx.triton = use_triton(gate, backend)
        ctx.save_for_backward(gate, up)
        return swiglu_values(gate, up, ctx.triton)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        gate, up = ctx.saved_tensors
        return *swiglu_grads(dy.contiguous(), gate, up, ctx.triton), None


def swiglu(gate: torch.Tensor, up: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """silu(gate) ⊙ up for two tensors of one shape and dtype; `backend` as in `dispatch.use_triton`."""
    return _SwiGLU.apply(gate, up, backend)


class SwiGLUMLP(nn.Module):
    """Drop-in for LlamaMLP / Qwen2MLP / MistralMLP (hidden_act "silu"): the same three projections,
    under the same names (state dict unchanged), with the activation and product fused.

    When the down projection is a fused QLoRA linear (`FusedLoraLinear` with one active adapter), the
    product silu(gate) ⊙ up is not kept for its backward either: `lora_fused.swiglu_qlora` recomputes it
    from gate and up (one elementwise pass), which drops a (tokens, intermediate) tensor — a fifth of a
    Llama block's saved activations."""

    def __init__(self, gate_proj: nn.Module, up_proj: nn.Module, down_proj: nn.Module, backend: str = "auto"):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj
        self.backend = backend

    @classmethod
    def from_module(cls, mlp: nn.Module, backend: str = "auto") -> SwiGLUMLP:
        return cls(mlp.gate_proj, mlp.up_proj, mlp.down_proj, backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from lowbit.kernels.lora_fused import FusedLoraLinear, swiglu_qlora  # (lora_fused imports this module)

        gate, up = self.gate_proj(x), self.up_proj(x)
        down = self.down_proj
        adapter = down.single_adapter() if isinstance(down, FusedLoraLinear) else None
        if adapter is None:
            return down(swiglu(gate, up, self.backend))
        return swiglu_qlora(gate, up, down.base_layer, down.lora_A[adapter], down.lora_B[adapter],
                            down.scaling[adapter], self.backend, down.dropout_p(adapter))  # fmt: skip
