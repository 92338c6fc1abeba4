"""lowbit's kernels as registered PyTorch operators (`torch.library`): schema, fake, reference, CUDA.

Each op has one schema; its default implementation is the pure-PyTorch reference (CPU and any
device without a kernel), its fake implementation gives torch.compile / meta tensors the output
shape, and on CUDA it runs the Triton kernels. `torch.library.opcheck` checks the registration.

- `lowbit::lut4_linear(x, <LUT4 weight>)` → y = x · Wᵀ, x (M, K) → (M, N), differentiable in x
  (its backward is `lowbit::lut4_linear_grad_input`, dX = dY · W, decoded from the 4-bit storage
  again, so autograd keeps only the packed weight alive, as QLoRA needs).
- `lowbit::int8_scaled_mm(a, b, a_scale, b_scale, out_dtype)` → (a · bᵀ) ⊙ (a_scale ⊗ b_scale).

The LUT4 weight travels as its tensors plus (out or in features, group_size, flat); see `lut4.py`.
On CUDA the forward picks the kernel by M: at decode sizes a dequant-fused GEMV (`HALF2_GEMV_M` rows of
16-bit x: the half2 word GEMV, `lut4_gemv_half2`; otherwise up to GEMV_MAX_M rows the register-table one,
`lut4_gemv`); above them, one Triton pass decodes W to the compute dtype and cuBLAS multiplies. The dequant-fused
Triton GEMM (`lut4_gemm`, `lut4_gemm_grad_input`) is correct but measured far slower than that on
an H100 (bench/RESULTS.md), so the ops do not choose it; call it directly to use it.
"""

# No `from __future__ import annotations`: torch.library reads the schema from real annotations.
import contextlib
from typing import Optional

import torch
from torch import Tensor

from lowbit.kernels.lut4 import Lut4Weight, check_weight, linear_grad_input_reference, linear_reference

# Rows of 16-bit x for which the half2 word GEMV (`lut4_gemv_half2`) runs, where it applies (K divisible by 8,
# groups ≥ 8). On an H100 (bench/RESULTS.md, session 19) it beats the register-table GEMV at M = 1 (20.0 vs
# 26.4 µs on 14336×4096) and the shared-table GEMV it replaced at M = 2–8 (57.9 vs 73.6 µs at M = 8). It takes
# two launches (x's preparation, the GEMV) where the register GEMV takes one, and eager decoding at batch 1 is
# bound by host time, not by the GPU: transformers' generate on a 4-block Llama-3-8B shape took 21.3 ms a token
# with it against 16.5 with the register GEMV. So one row of x goes to it only for steps made to be replayed as
# a CUDA graph (`for_graph_replay`: lowbit's static decoder), where launches cost no host time.
HALF2_GEMV_M = range(1, 9)
_FOR_GRAPHS = [0]  # depth of `for_graph_replay` blocks
# Rows of x up to which the other inputs (float32 x, odd layouts) take the register-table GEMV rather than
# decode + cuBLAS: at M = 8 its (M, N, K/2) accumulator spills and decode + cuBLAS wins (RESULTS, run 4).
GEMV_MAX_M = 4


@contextlib.contextmanager
def for_graph_replay():
    """Within the block, pick kernels for GPU time rather than host time: for a step that is warmed up (kernel
    autotuning happens outside the capture) and captured as a CUDA graph inside it."""
    _FOR_GRAPHS[0] += 1
    try:
        yield
    finally:
        _FOR_GRAPHS[0] -= 1


def _lut4(packed, table, scale, zero_point, nested_code, nested_scale, offset, n, k, group_size, flat) -> Lut4Weight:
    w = Lut4Weight(packed, table, scale, zero_point, nested_code, nested_scale, offset, n, k, group_size, flat)
    check_weight(w)
    return w


@torch.library.custom_op("lowbit::lut4_linear", mutates_args=())
def lut4_linear(
    x: Tensor, packed: Tensor, table: Tensor, scale: Tensor, zero_point: Optional[Tensor],
    nested_code: Optional[Tensor], nested_scale: Optional[Tensor], offset: Optional[Tensor],
    out_features: int, group_size: int, flat: bool,
) -> Tensor:  # fmt: skip
    """y = x · Wᵀ for x (M, K) and a LUT4 weight W (N, K); reference implementation."""
    w = _lut4(packed, table, scale, zero_point, nested_code, nested_scale, offset, out_features, x.shape[1],
              group_size, flat)  # fmt: skip
    return linear_reference(x, w)


@lut4_linear.register_fake
def _(x, packed, table, scale, zero_point, nested_code, nested_scale, offset, out_features, group_size, flat):
    return x.new_empty((x.shape[0], out_features))


def linear_cuda(x: Tensor, w: Lut4Weight, gemv_config: dict | None = None, add: Tensor | None = None,
                beta: float = 1.0) -> Tensor:  # fmt: skip
    """The CUDA forward on a checked weight, plus ``beta·add`` (M, N) when given. Callers already inside their
    own autograd Function (the fused QLoRA linear) and inference calls (`dispatch.fused_linear` without
    gradients) call it directly: the custom op's dispatch costs ~100 µs of host time a call. Above the GEMV sizes ``add`` enters cuBLAS's epilogue (read while the tensor cores work)
    instead of costing a pass of its own. ``gemv_config`` fixes the GEMV's launch instead of autotuning it (the
    Triton interpreter)."""
    from lowbit.kernels import lut4_gemv_half2
    from lowbit.kernels.lut4_gemm import lut4_dequantize
    from lowbit.kernels.lut4_gemv import lut4_gemv

    x = x.contiguous()
    m = x.shape[0]
    if m == 0:
        y = x.new_empty((0, w.out_features))
    elif m in HALF2_GEMV_M and x.dtype != torch.float32 and (m > 1 or _FOR_GRAPHS[0]) and lut4_gemv_half2.supports(x, w):
        y = lut4_gemv_half2.lut4_gemv_half2(x, w, config=gemv_config)
    elif m <= GEMV_MAX_M:
        y = lut4_gemv(x, w, gemv_config)
    else:  # (M, K) @ (K, N); the dense W lives for this call only
        return mm_add(x, lut4_dequantize(w, x.dtype).t(), add, beta)
    return y if add is None else y.add_(add, alpha=beta)


def linear_grad_input_cuda(grad_out: Tensor, w: Lut4Weight, add: Tensor | None = None, beta: float = 1.0) -> Tensor:
    """dY · W (+ beta·add), (M, N) → (M, K), W decoded again rather than saved."""
    from lowbit.kernels.lut4_gemm import lut4_dequantize

    return mm_add(grad_out, lut4_dequantize(w, grad_out.dtype), add, beta)


def mm_add(a: Tensor, b: Tensor, add: Tensor | None = None, beta: float = 1.0) -> Tensor:
    """a · b, plus beta·add when given (one addmm: the add rides in the matmul's epilogue)."""
    return a @ b if add is None else torch.addmm(add, a, b, beta=beta)


@lut4_linear.register_kernel("cuda")
def _(x, packed, table, scale, zero_point, nested_code, nested_scale, offset, out_features, group_size, flat):
    w = _lut4(packed, table, scale, zero_point, nested_code, nested_scale, offset, out_features, x.shape[1],
              group_size, flat)  # fmt: skip
    return linear_cuda(x, w)


@torch.library.custom_op("lowbit::lut4_linear_grad_input", mutates_args=())
def lut4_linear_grad_input(
    grad_out: Tensor, packed: Tensor, table: Tensor, scale: Tensor, zero_point: Optional[Tensor],
    nested_code: Optional[Tensor], nested_scale: Optional[Tensor], offset: Optional[Tensor],
    in_features: int, group_size: int, flat: bool,
) -> Tensor:  # fmt: skip
    """dX = dY · W for dY (M, N) and a LUT4 weight W (N, K); reference implementation."""
    w = _lut4(packed, table, scale, zero_point, nested_code, nested_scale, offset, grad_out.shape[1], in_features,
              group_size, flat)  # fmt: skip
    return linear_grad_input_reference(grad_out, w)


@lut4_linear_grad_input.register_fake
def _(grad_out, packed, table, scale, zero_point, nested_code, nested_scale, offset, in_features, group_size, flat):
    return grad_out.new_empty((grad_out.shape[0], in_features))


@lut4_linear_grad_input.register_kernel("cuda")
def _(grad_out, packed, table, scale, zero_point, nested_code, nested_scale, offset, in_features, group_size, flat):
    w = _lut4(packed, table, scale, zero_point, nested_code, nested_scale, offset, grad_out.shape[1], in_features,
              group_size, flat)  # fmt: skip
    return linear_grad_input_cuda(grad_out, w)


def _setup_context(ctx, inputs, output):
    x, packed, table, scale, zero_point, nested_code, nested_scale, offset, _, group_size, flat = inputs
    # Only the 4-bit storage is saved: the backward decodes W again instead of keeping it dense.
    ctx.save_for_backward(packed, table, scale, zero_point, nested_code, nested_scale, offset)
    ctx.layout = (x.shape[1], group_size, flat)


def _backward(ctx, grad_out):
    grad_x = None
    if ctx.needs_input_grad[0]:
        in_features, group_size, flat = ctx.layout
        grad_x = lut4_linear_grad_input(grad_out, *ctx.saved_tensors, in_features, group_size, flat)
    return (grad_x,) + (None,) * 10


lut4_linear.register_autograd(_backward, setup_context=_setup_context)


def check_int8_operands(a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor) -> None:
    if a.dtype != torch.int8 or b.dtype != torch.int8 or a.dim() != 2 or b.dim() != 2:
        raise TypeError(f"int8_scaled_mm takes 2-D int8 a (M, K) and b (N, K), got {a.dtype} {tuple(a.shape)} "
                        f"and {b.dtype} {tuple(b.shape)}")  # fmt: skip
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"inner sizes differ: a is {tuple(a.shape)}, b is {tuple(b.shape)} (both (·, K))")
    if a_scale.shape != (a.shape[0],) or b_scale.shape != (b.shape[0],):
        raise ValueError(f"scales must be (M,) = ({a.shape[0]},) and (N,) = ({b.shape[0]},), got "
                         f"{tuple(a_scale.shape)} and {tuple(b_scale.shape)}")  # fmt: skip


def int8_scaled_mm_reference(a, b, a_scale, b_scale, out_dtype: torch.dtype) -> torch.Tensor:
    """Torch reference: the integer product in float64 (exact below 2⁵³), then the two scales in float32."""
    acc = a.double() @ b.double().t()
    return (acc.float() * a_scale.float()[:, None] * b_scale.float()[None, :]).to(out_dtype)


@torch.library.custom_op("lowbit::int8_scaled_mm", mutates_args=())
def int8_scaled_mm(a: Tensor, b: Tensor, a_scale: Tensor, b_scale: Tensor, out_dtype: torch.dtype) -> Tensor:
    """y = (a · bᵀ) ⊙ (a_scale ⊗ b_scale), a (M, K) and b (N, K) int8, scales float32; reference."""
    check_int8_operands(a, b, a_scale, b_scale)
    return int8_scaled_mm_reference(a, b, a_scale, b_scale, out_dtype)


@int8_scaled_mm.register_fake
def _(a, b, a_scale, b_scale, out_dtype):
    return a.new_empty((a.shape[0], b.shape[0]), dtype=out_dtype)


@int8_scaled_mm.register_kernel("cuda")
def _(a, b, a_scale, b_scale, out_dtype):
    from lowbit.kernels.int8_gemm import int8_scaled_mm as triton_int8_scaled_mm

    return triton_int8_scaled_mm(a, b, a_scale, b_scale, out_dtype)
