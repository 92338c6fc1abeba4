"""Fused SwiGLU and GeGLU activations (Shazeer 2020, "GLU Variants Improve Transformer"): y = act(gate) ⊙ up.

The Llama / Qwen2 / Mistral MLP is down(silu(gate(x)) ⊙ up(x)), Gemma's the same with GELU's tanh
approximation (GeGLU). Unfused, autograd keeps gate, act(gate) and up (three (tokens, intermediate)
tensors, the largest activations of the block) and runs the activation, its backward and two products as
separate kernels. Here the forward is one pass that saves only gate and up, and the backward one pass
recomputing the activation and its slope:

    du = dy ⊙ act(g),   dg = dy ⊙ u ⊙ act'(g),
    SiLU:  act' = σ(g)·(1 + g·(1 − σ(g)))
    GELU (tanh):  act = ½·g·(1 + t),  act' = ½·(1 + t) + ½·g·(1 − t²)·k·(1 + 3c·g²),
                  t = tanh(k·(g + c·g³)), k = √(2/π), c = 0.044715.

Numerics follow `act_fn(gate) * up` in transformers: the activation is rounded to the activation dtype
before the product.
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.kernels.dispatch import use_triton


ACTIVATIONS = ("silu", "gelu_tanh")


def _activate(g: torch.Tensor, act: str) -> torch.Tensor:
    return nn.functional.silu(g) if act == "silu" else nn.functional.gelu(g, approximate="tanh")


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor, act: str = "silu") -> torch.Tensor:
    return _activate(gate, act) * up


def swiglu_grad_reference(dy, gate, up, act: str = "silu") -> tuple[torch.Tensor, torch.Tensor]:
    compute = torch.promote_types(gate.dtype, torch.float32)
    g, u, d = gate.to(compute), up.to(compute), dy.to(compute)
    if act == "silu":
        sig = torch.sigmoid(g)
        slope = sig * (1 + g * (1 - sig))
    else:
        k, c = (2 / torch.pi) ** 0.5, 0.044715
        t = torch.tanh(k * (g + c * g**3))
        slope = 0.5 * (1 + t) + 0.5 * g * (1 - t * t) * k * (1 + 3 * c * g * g)
    return (d * u * slope).to(gate.dtype), (d * _activate(g, act)).to(up.dtype)


def check_pair(gate: torch.Tensor, up: torch.Tensor) -> None:
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"gate and up must match, got {gate.dtype} {tuple(gate.shape)} and "
                         f"{up.dtype} {tuple(up.shape)}")  # fmt: skip


def swiglu_values(gate: torch.Tensor, up: torch.Tensor, triton: bool, act: str = "silu") -> torch.Tensor:
    """act(gate) ⊙ up of contiguous tensors, without autograd: the Triton pass or the torch reference."""
    if triton:
        from lowbit.kernels import train_triton

        return train_triton.swiglu_forward(gate, up, act)
    return swiglu_reference(gate, up, act)


def swiglu_grads(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, triton: bool, act: str = "silu"):
    """(d gate, d up) for the output gradient dy; all contiguous."""
    if triton:
        from lowbit.kernels import train_triton

        return train_triton.swiglu_backward(dy, gate, up, act)
    return swiglu_grad_reference(dy, gate, up, act)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, backend: str, act: str) -> torch.Tensor:
        check_pair(gate, up)
        gate, up = gate.contiguous(), up.contiguous()
        ctx.triton, ctx.act = use_triton(gate, backend), act
        ctx.save_for_backward(gate, up)
        return swiglu_values(gate, up, ctx.triton, act)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        gate, up = ctx.saved_tensors
        return *swiglu_grads(dy.contiguous(), gate, up, ctx.triton, ctx.act), None, None


def swiglu(gate: torch.Tensor, up: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """silu(gate) ⊙ up for two tensors of one shape and dtype; `backend` as in `dispatch.use_triton`."""
    return _SwiGLU.apply(gate, up, backend, "silu")


def geglu(gate: torch.Tensor, up: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """gelu_tanh(gate) ⊙ up (GELU's tanh approximation, transformers' "gelu_pytorch_tanh"), like `swiglu`."""
    return _SwiGLU.apply(gate, up, backend, "gelu_tanh")


class SwiGLUMLP(nn.Module):
    """Drop-in for LlamaMLP / Qwen2MLP / MistralMLP (hidden_act "silu") and, with ``activation="gelu_tanh"``,
    GemmaMLP / Gemma2MLP / Gemma3MLP ("gelu_pytorch_tanh"): the same three projections, under the same names
    (state dict unchanged), with the activation and product fused.

    When the down projection is a fused QLoRA linear (`FusedLoraLinear` with one active adapter), the
    product act(gate) ⊙ up is not kept for its backward either: `lora_fused.swiglu_qlora` recomputes it
    from gate and up (one elementwise pass), which drops a (tokens, intermediate) tensor — a fifth of a
    Llama block's saved activations."""

    def __init__(self, gate_proj: nn.Module, up_proj: nn.Module, down_proj: nn.Module, backend: str = "auto",
                 activation: str = "silu"):  # fmt: skip
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj
        self.backend, self.activation = backend, activation

    @classmethod
    def from_module(cls, mlp: nn.Module, backend: str = "auto", activation: str = "silu") -> SwiGLUMLP:
        return cls(mlp.gate_proj, mlp.up_proj, mlp.down_proj, backend, activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from lowbit.kernels.lora_fused import FusedLoraLinear, swiglu_qlora  # (lora_fused imports this module)

        gate, up = self.gate_proj(x), self.up_proj(x)
        down = self.down_proj
        adapter = down.single_adapter() if isinstance(down, FusedLoraLinear) else None
        if adapter is None:
            return down(_SwiGLU.apply(gate, up, self.backend, self.activation))
        return swiglu_qlora(gate, up, down.base_layer, down.lora_A[adapter], down.lora_B[adapter],
                            down.scaling[adapter], self.backend, down.dropout_p(adapter), self.activation)  # fmt: skip
