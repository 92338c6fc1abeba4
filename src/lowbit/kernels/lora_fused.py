"""QLoRA's linear layer as one autograd Function: the 4-bit base and the LoRA update together.

    y  = x·Wᵀ + s·(x·Aᵀ)·Bᵀ (+ b)               W (N, K) 4-bit, A (r, K), B (N, r), s = alpha/r
    dX = dY·W + s·(dY·B)·A
    dB = s·dYᵀ·(x·Aᵀ),   dA = s·(dY·B)ᵀ·x

Unfused (`LoraLinear` over `QuantLinear`), autograd sees ~8 nodes per layer: casts of x, A and B to the
compute dtype (and of y back), the base op, two matmuls, a scale, an add, each saving its inputs. Here
the Function saves only x (in the compute dtype) and x·Aᵀ (tokens × r); W is decoded from its 4-bit
storage in the forward and again in the backward (never saved), through the base's own kernel choice:
`lowbit::lut4_linear` / `lut4_linear_grad_input` when `QuantLinear.kernel` resolves to "fused" (CUDA),
the format's dequantize + matmul otherwise (CPU). The LoRA product (x·Aᵀ)·Bᵀ is computed first and the
base matmul adds it in its epilogue (cuBLAS's β·C, read while the tensor cores work; s·(dY·B)·A into dX
likewise), everything in the layer's compute dtype, with one cast of the result to x's dtype. `swiglu_qlora` is the same layer fed by silu(gate) ⊙ up (the MLP's down projection):
it keeps gate and up instead of their product and recomputes the product in the backward.

LoRA dropout (peft's `lora_dropout`, on the LoRA path's input only) is drawn from a seed taken from torch's
global generator (inside a CUDA graph capture: from the CUDA generator, on the device, so that each replay
draws anew), and drawn again from it in the backward instead of saving the mask: the same distribution as
`nn.Dropout`, other random numbers (on CUDA one Triton pass of Philox numbers). `FusedLoraLinear` runs these
Functions when a layer
has exactly one active, unmerged adapter; any other state runs `LoraLinear.forward` unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.kernels import ops
from lowbit.kernels.dispatch import autocast_dtype, direct_cuda, select, use_triton
from lowbit.kernels.lut4 import lut4_weight
from lowbit.kernels.swiglu import check_pair, swiglu_grads, swiglu_values
from lowbit.nn.quant_linear import QuantLinear
from lowbit.peft.lora import LoraLinear


def _lut4_args(base: QuantLinear):
    w = lut4_weight(base.fmt, base.storage(), (base.out_features, base.in_features))
    return (w.packed, w.table, w.scale, w.zero_point, w.nested_code, w.nested_scale, w.offset), w


def base_matmul(x: torch.Tensor, base: QuantLinear, fused: bool, add: torch.Tensor | None = None,
                beta: float = 1.0) -> torch.Tensor:  # fmt: skip
    """x (M, K) · Wᵀ (+ beta·add (M, N)) → (M, N) in x's dtype, W decoded for this call only."""
    if fused:
        tensors, w = _lut4_args(base)
        if direct_cuda(x):  # (this Function is the autograd node already)
            return ops.linear_cuda(x, w, add=add, beta=beta)
        y = ops.lut4_linear(x, *tensors, w.out_features, w.group_size, w.flat)
        return y if add is None else y.add_(add, alpha=beta)
    return ops.mm_add(x, base.dequantize(x.dtype).t(), add, beta)


def base_grad_input(dy: torch.Tensor, base: QuantLinear, fused: bool, add: torch.Tensor | None = None,
                    beta: float = 1.0) -> torch.Tensor:  # fmt: skip
    """dY (M, N) · W (+ beta·add (M, K)) → (M, K), W decoded again rather than saved."""
    if fused:
        tensors, w = _lut4_args(base)
        if direct_cuda(dy):
            return ops.linear_grad_input_cuda(dy, w, add=add, beta=beta)
        dx = ops.lut4_linear_grad_input(dy, *tensors, w.in_features, w.group_size, w.flat)
        return dx if add is None else dx.add_(add, alpha=beta)
    return ops.mm_add(dy, base.dequantize(dy.dtype), add, beta)


def dropout_seed(p: float, device: torch.device | None = None) -> int | torch.Tensor | None:
    """A seed for one call's LoRA dropout mask (None: no dropout), from torch's global CPU generator; while a
    CUDA graph is captured, a one-element tensor drawn on the device by torch's CUDA generator instead, which
    each replay draws anew (a host number would repeat one mask on every replay)."""
    if not p > 0:
        return None
    if device is not None and device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return torch.randint(0, 2**31 - 1, (1,), device=device)
    return int(torch.randint(0, 2**62, (1,)))


def dropped(t: torch.Tensor, p: float, seed: int | torch.Tensor | None, backend: str = "auto") -> torch.Tensor:
    """t ⊙ keep / (1 - p), keep the mask drawn from ``seed`` for t's shape (probability 1 - p each), the same
    mask on every call with the same seed, shape and device; t itself without dropout (``seed`` None).
    With the Triton kernel (``backend`` as in `use_triton`) one pass of Philox numbers, nothing materialised
    but the result, the seed a number or read from a one-element tensor; otherwise torch's generator (other
    numbers, the same distribution; a number seed only)."""
    if seed is None:
        return t
    t = t.contiguous()
    if use_triton(t, backend):
        from lowbit.kernels.train_triton import dropout

        return dropout(t, p, seed)
    if torch.is_tensor(seed):
        raise RuntimeError("LoRA dropout inside a CUDA graph needs lowbit's Triton dropout kernel (Triton is not "
                           "available here): train the graphed step with dropout 0")  # fmt: skip
    gen = torch.Generator(device=t.device)
    gen.manual_seed(seed)
    keep = torch.rand(t.shape, generator=gen, device=t.device) >= p
    return t * keep.to(t.dtype) * (1.0 / (1.0 - p))


class _QLoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lora_a, lora_b, bias, base: QuantLinear, scaling: float, dropout: float):
        dtype = autocast_dtype(x.device, base.compute_dtype)
        ctx.dropout = (dropout, dropout_seed(dropout, x.device), "auto")
        with torch.autocast(x.device.type, enabled=False):
            y, x2, xa, fused = _QLoraLinear._forward(x, lora_a, lora_b, bias, base, scaling, dtype, ctx.dropout)
        ctx.save_for_backward(x2, xa, lora_a, lora_b, bias)
        ctx.base, ctx.scaling, ctx.fused, ctx.x_meta = base, scaling, fused, (x.shape, x.dtype)
        return y.reshape(*x.shape[:-1], -1).to(x.dtype)

    @staticmethod
    def _forward(x, lora_a, lora_b, bias, base, scaling, dtype, dropout=(0.0, None, "auto")):
        fused = select(base.kernel, base.fmt, x.device) == "fused"
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)  # (M, K); a no-op when x is already in the compute dtype
        a, b = lora_a.to(dtype), lora_b.to(dtype)  # (r, K), (N, r): small
        xa = dropped(x2, *dropout) @ a.t()  # (M, r)
        # The LoRA product first, then the base matmul adds it in its epilogue: one pass over (M, N) fewer
        y = base_matmul(x2, base, fused, add=xa @ b.t(), beta=scaling)  # (M, N)
        if bias is not None:
            y += bias.to(dtype)
        return y, x2, xa, fused

    @staticmethod
    @torch.autocast("cuda", enabled=False)
    @torch.autocast("cpu", enabled=False)
    def backward(ctx, dy):
        x2, xa, lora_a, lora_b, bias = ctx.saved_tensors
        shape, x_dtype = ctx.x_meta
        dx, da, db, dbias = _backward(ctx, dy, x2, xa, lora_a, lora_b, bias, ctx.needs_input_grad[:4])
        return None if dx is None else dx.reshape(shape).to(x_dtype), da, db, dbias, None, None, None


def _backward(ctx, dy, x2, xa, lora_a, lora_b, bias, needs) -> tuple:
    """(dX (M, K) in the compute dtype, dA, dB, dbias) of y = x·Wᵀ + s·(d(x)·Aᵀ)·Bᵀ + b, d the LoRA dropout
    of ``ctx.dropout`` (its mask drawn again); ``needs`` says which."""
    s, dtype, (p, seed, backend) = ctx.scaling, x2.dtype, ctx.dropout
    dy2 = dy.reshape(-1, dy.shape[-1]).to(dtype)  # (M, N)
    dyb = dy2 @ lora_b.to(dtype)  # (M, r)
    dx = da = db = dbias = None
    if needs[0]:  # the LoRA part (through x's dropout mask, drawn again) enters the base matmul's epilogue
        lora_dx = dropped(dyb @ lora_a.to(dtype), p, seed, backend)  # (M, K)
        dx = base_grad_input(dy2, ctx.base, ctx.fused, add=lora_dx, beta=s)
    if needs[1]:
        da = (dyb.t() @ dropped(x2, p, seed, backend)).mul_(s).to(lora_a.dtype)  # (r, K)
    if needs[2]:
        db = (dy2.t() @ xa).mul_(s).to(lora_b.dtype)  # (N, r)
    if bias is not None and needs[3]:
        dbias = dy2.sum(0).to(bias.dtype)
    return dx, da, db, dbias


class _SwiGLUQLora(torch.autograd.Function):
    """down(silu(gate) ⊙ up) with a QLoRA down projection: saves gate and up (which the SwiGLU backward
    needs anyway) and recomputes their product for the LoRA gradient dA = s·(dY·B)ᵀ·act, instead of
    keeping it."""

    @staticmethod
    def forward(ctx, gate, up, lora_a, lora_b, bias, base: QuantLinear, scaling: float, dropout: float, backend: str,
                activation: str):  # fmt: skip
        check_pair(gate, up)
        gate, up = gate.contiguous(), up.contiguous()
        ctx.triton, ctx.activation = use_triton(gate, backend), activation
        act = swiglu_values(gate, up, ctx.triton, activation)
        dtype = autocast_dtype(act.device, base.compute_dtype)
        ctx.dropout = (dropout, dropout_seed(dropout, gate.device), backend)
        with torch.autocast(act.device.type, enabled=False):
            y, _, xa, fused = _QLoraLinear._forward(act, lora_a, lora_b, bias, base, scaling, dtype, ctx.dropout)
        ctx.save_for_backward(gate, up, xa, lora_a, lora_b, bias)
        ctx.base, ctx.scaling, ctx.fused, ctx.dtype = base, scaling, fused, dtype
        return y.reshape(*act.shape[:-1], -1).to(act.dtype)

    @staticmethod
    @torch.autocast("cuda", enabled=False)
    @torch.autocast("cpu", enabled=False)
    def backward(ctx, dy):
        gate, up, xa, lora_a, lora_b, bias = ctx.saved_tensors
        act = swiglu_values(gate, up, ctx.triton, ctx.activation)  # recomputed: one elementwise pass
        x2 = act.reshape(-1, act.shape[-1]).to(ctx.dtype)
        needs = (any(ctx.needs_input_grad[:2]),) + ctx.needs_input_grad[2:5]
        dact, da, db, dbias = _backward(ctx, dy, x2, xa, lora_a, lora_b, bias, needs)
        dgate = dup = None
        if dact is not None:
            dgate, dup = swiglu_grads(dact.reshape(gate.shape).to(gate.dtype).contiguous(), gate, up, ctx.triton,
                                      ctx.activation)  # fmt: skip
        return dgate, dup, da, db, dbias, None, None, None, None, None


def swiglu_qlora(gate: torch.Tensor, up: torch.Tensor, base: QuantLinear, lora_a: torch.Tensor,
                 lora_b: torch.Tensor, scaling: float, backend: str = "auto", dropout: float = 0.0,
                 activation: str = "silu") -> torch.Tensor:  # fmt: skip
    """qlora_linear(act(gate) ⊙ up, …) without keeping the product for backward: gate, up (…, K) → (…, N);
    ``activation`` "silu" (SwiGLU) or "gelu_tanh" (GeGLU)."""
    if gate.shape[-1] != base.in_features:
        raise ValueError(f"expected gate and up (…, {base.in_features}), got {tuple(gate.shape)}")
    return _SwiGLUQLora.apply(gate, up, lora_a, lora_b, base.bias, base, scaling, _check_p(dropout), backend,
                              activation)  # fmt: skip


def qlora_linear(x: torch.Tensor, base: QuantLinear, lora_a: torch.Tensor, lora_b: torch.Tensor,
                 scaling: float, dropout: float = 0.0) -> torch.Tensor:  # fmt: skip
    """base(x) + scaling·(d(x)·Aᵀ)·Bᵀ for a QuantLinear base, d the LoRA dropout of probability ``dropout``:
    x (…, K) → (…, N) in x's dtype."""
    if x.shape[-1] != base.in_features:
        raise ValueError(f"expected input (…, {base.in_features}), got {tuple(x.shape)}")
    return _QLoraLinear.apply(x, lora_a, lora_b, base.bias, base, scaling, _check_p(dropout))


def _check_p(p: float) -> float:
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {p}")
    return float(p)


class FusedLoraLinear(LoraLinear):
    """A `LoraLinear` over a `QuantLinear` whose single-adapter forward is `qlora_linear`.

    Built from an existing layer by `from_lora` (same parameters, adapters and state dict keys); every
    LoRA feature (several adapters, merging, dropout, mixed batches) falls back to `LoraLinear.forward`.
    """

    @classmethod
    def from_lora(cls, layer: LoraLinear) -> FusedLoraLinear:
        if not isinstance(layer.base_layer, QuantLinear):
            raise TypeError(f"FusedLoraLinear fuses LoRA over a QuantLinear, not {type(layer.base_layer).__name__}")
        fused = cls.__new__(cls)
        fused.__dict__.update(layer.__dict__)  # the same submodules, parameters and adapter bookkeeping
        return fused

    def single_adapter(self) -> str | None:
        """The one adapter the fused forward runs (None: a state only `LoraLinear.forward` handles)."""
        if not isinstance(self.base_layer, QuantLinear):
            return None
        if self.disabled or self.row_adapters is not None or self.merged_adapters or len(self.active_adapters) != 1:
            return None
        return self.active_adapters[0]

    def dropout_p(self, name: str) -> float:
        """The LoRA dropout probability this call applies (0 in eval mode)."""
        dropout = self.lora_dropout[name]
        return dropout.p if isinstance(dropout, nn.Dropout) and self.training else 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        name = self.single_adapter()
        if name is None:
            return super().forward(x)
        return qlora_linear(x, self.base_layer, self.lora_A[name], self.lora_B[name], self.scaling[name],
                            self.dropout_p(name))  # fmt: skip
