"""Dequant-fused GEMM for prefill and training: y = x · Wᵀ and dX = dY · W with a LUT4 weight.

At M ≥ 64 a linear layer is compute-bound, so the aim is to keep the tensor cores (bf16 in, fp32
accumulate) busy while the weight is decoded on the side, never written to memory:

- forward (`lut4_gemm`) computes the transposed product yᵀ = W · xᵀ tile by tile ("swap AB"): the
  decoded (BN, BK) weight tile is the MMA's left operand, which Hopper's wgmma can take straight
  from registers, so the decoded weight needs no trip through shared memory; x comes in through the
  usual pipelined shared-memory tiles. Tiles are visited in groups of GROUP weight tiles so that a
  wave of programs reuses the same weight and activation tiles from L2.
- backward w.r.t. the input (`lut4_gemm_grad_input`): dX (M, K) = dY (M, N) · W (N, K), QLoRA's
  backward through the frozen 4-bit base weight, reducing over N; here the decoded tile is the right
  operand.
- `lut4_dequantize` writes the dense weight (N, K) in a float dtype in one pass: what the registered
  ops use above M = 4 (decode W for this call, then cuBLAS), and a fast stand-alone decoder.

Status, measured on an H100 (bench/RESULTS.md): the fused kernels are correct on every layout. With
the table in memory they ran at 25–90 TFLOP/s against cuBLAS's ~700: every value of a decoded tile
was a table gather, which Triton's pipeliner turned into 4-byte cp.async copies. With the register
lookup (`lut4_asm`, 16-bit inputs on CUDA) the forward reaches ~300–320 TFLOP/s (0.43–0.46× cuBLAS)
and dX ~170–210: the decode still sits on the critical path of every K step, and the decoded tile
reaches the tensor cores through shared memory. Decode + cuBLAS (0.84–0.98× of bf16 cuBLAS,
≥ bitsandbytes) is therefore what the ops run; a warp-specialised kernel (decode in one warp group,
wgmma in another) is the way past it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowbit.kernels.autotune import autotune, launch_tuned
from lowbit.kernels.lut4 import Lut4Weight
from lowbit.kernels.lut4_tile import kernel_args, load_lut4_tile

GROUP = tl.constexpr(8)  # weight tiles per L2 group (see the swizzle in the kernels)


@triton.jit
def _grouped_tile(pid, n_tiles_a, n_tiles_b, GROUP_A: tl.constexpr):
    """Program id → (tile a, tile b), GROUP_A tiles of `a` per group, `b` running fastest within it."""
    width = GROUP_A * n_tiles_b
    first_a = (pid // width) * GROUP_A
    group_a = tl.minimum(n_tiles_a - first_a, GROUP_A)
    return first_a + (pid % width) % group_a, (pid % width) // group_a


@triton.jit
def _mma(a, b, acc, IEEE: tl.constexpr):
    """acc + a·b on the tensor cores; float32 operands stay IEEE float32 (torch's matmul is not TF32)."""
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _lut4_gemm_kernel(x_ptr, y_ptr, packed_ptr, table_ptr, scale_ptr, zp_ptr, ncode_ptr, nscale_ptr, offset_ptr,
                      M, N, K, KB, G, stride_xm, stride_ym, M_BUCKET,
                      GS: tl.constexpr, SCALES: tl.constexpr, PAIRED: tl.constexpr, HAS_ZP: tl.constexpr,
                      DOUBLE_QUANT: tl.constexpr, NESTED_GS: tl.constexpr, LUT_ASM: tl.constexpr, IEEE: tl.constexpr,
                      BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SWAP: tl.constexpr):  # fmt: skip
    pid_n, pid_m = _grouped_tile(tl.program_id(0), tl.cdiv(N, BN), tl.cdiv(M, BM), GROUP)
    rows = pid_n * BN + tl.arange(0, BN)  # (BN,) output features
    ms = pid_m * BM + tl.arange(0, BM)  # (BM,) rows of x
    if SWAP:
        acc = tl.zeros((BN, BM), dtype=tl.float32)  # yᵀ tile: the decoded weight is the left operand
    else:
        acc = tl.zeros((BM, BN), dtype=tl.float32)  # y tile: the decoded weight goes through shared memory
    for k0 in range(0, K, BK):
        w = load_lut4_tile(packed_ptr, table_ptr, scale_ptr, zp_ptr, ncode_ptr, nscale_ptr, offset_ptr,
                           rows, k0, N, K, KB, G, BN, BK, GS, SCALES, PAIRED, HAS_ZP, DOUBLE_QUANT,
                           NESTED_GS, LUT_ASM)  # (BN, BK) fmt: skip
        cols = tl.max_contiguous(tl.multiple_of(k0 + tl.arange(0, BK), BK), BK)
        x_mask = (ms < M)[:, None] & (cols < K)[None, :]
        x = tl.load(x_ptr + ms[:, None] * stride_xm + cols[None, :], mask=x_mask, other=0.0)  # (BM, BK)
        w = w.to(x.dtype)
        if SWAP:
            acc = _mma(w, tl.trans(x), acc, IEEE)  # (BN, BM)
        else:
            acc = _mma(x, tl.trans(w), acc, IEEE)  # (BM, BN)
    if SWAP:
        y_mask = (rows < N)[:, None] & (ms < M)[None, :]
        tl.store(y_ptr + ms[None, :] * stride_ym + rows[:, None], acc.to(y_ptr.dtype.element_ty), mask=y_mask)
    else:
        y_mask = (ms < M)[:, None] & (rows < N)[None, :]
        tl.store(y_ptr + ms[:, None] * stride_ym + rows[None, :], acc.to(y_ptr.dtype.element_ty), mask=y_mask)


@triton.jit
def _lut4_gemm_dx_kernel(g_ptr, dx_ptr, packed_ptr, table_ptr, scale_ptr, zp_ptr, ncode_ptr, nscale_ptr, offset_ptr,
                         M, N, K, KB, G, stride_gm, stride_dm, M_BUCKET,
                         GS: tl.constexpr, SCALES: tl.constexpr, PAIRED: tl.constexpr, HAS_ZP: tl.constexpr,
                         DOUBLE_QUANT: tl.constexpr, NESTED_GS: tl.constexpr, LUT_ASM: tl.constexpr, IEEE: tl.constexpr,
                         BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):  # fmt: skip
    pid_k, pid_m = _grouped_tile(tl.program_id(0), tl.cdiv(K, BK), tl.cdiv(M, BM), GROUP)
    k0 = pid_k * BK
    ms = pid_m * BM + tl.arange(0, BM)  # (BM,) rows of dY and dX
    acc = tl.zeros((BM, BK), dtype=tl.float32)
    for n0 in range(0, N, BN):
        rows = n0 + tl.arange(0, BN)  # (BN,) the reduction runs over W's rows
        w = load_lut4_tile(packed_ptr, table_ptr, scale_ptr, zp_ptr, ncode_ptr, nscale_ptr, offset_ptr,
                           rows, k0, N, K, KB, G, BN, BK, GS, SCALES, PAIRED, HAS_ZP, DOUBLE_QUANT,
                           NESTED_GS, LUT_ASM)  # (BN, BK) fmt: skip
        g_mask = (ms < M)[:, None] & (rows < N)[None, :]
        g = tl.load(g_ptr + ms[:, None] * stride_gm + rows[None, :], mask=g_mask, other=0.0)  # (BM, BN)
        acc = _mma(g, w.to(g.dtype), acc, IEEE)  # (BM, BK)
    cols = k0 + tl.arange(0, BK)
    dx_mask = (ms < M)[:, None] & (cols < K)[None, :]
    tl.store(dx_ptr + ms[:, None] * stride_dm + cols[None, :], acc.to(dx_ptr.dtype.element_ty), mask=dx_mask)


@triton.jit
def _lut4_dequant_kernel(out_ptr, packed_ptr, table_ptr, scale_ptr, zp_ptr, ncode_ptr, nscale_ptr, offset_ptr,
                         N, K, KB, G,
                         GS: tl.constexpr, SCALES: tl.constexpr, PAIRED: tl.constexpr, HAS_ZP: tl.constexpr,
                         DOUBLE_QUANT: tl.constexpr, NESTED_GS: tl.constexpr, LUT_ASM: tl.constexpr,
                         BN: tl.constexpr, BK: tl.constexpr, TILES: tl.constexpr = 1):  # fmt: skip
    """TILES consecutive (BN, BK) tiles along K per program: with TILES > 1 the loop's loads are pipelined
    (num_stages) instead of each program waiting on one tile's dependent scale loads."""
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    for t in range(TILES):
        k0 = (tl.program_id(1) * TILES + t) * BK
        w = load_lut4_tile(packed_ptr, table_ptr, scale_ptr, zp_ptr, ncode_ptr, nscale_ptr, offset_ptr,
                           rows, k0, N, K, KB, G, BN, BK, GS, SCALES, PAIRED, HAS_ZP, DOUBLE_QUANT, NESTED_GS,
                           LUT_ASM)  # fmt: skip
        cols = k0 + tl.arange(0, BK)
        mask = (rows < N)[:, None] & (cols < K)[None, :]
        tl.store(out_ptr + rows[:, None].to(tl.int64) * K + cols[None, :], w.to(out_ptr.dtype.element_ty), mask=mask)


def _dequant_configs() -> list[triton.Config]:
    """(BN, BK, TILES, warps, stages); the first is the untuned launch (one tile a program)."""
    shapes = [(16, 256, 1, 4, 1), (16, 256, 4, 4, 3), (16, 256, 8, 4, 3), (32, 256, 4, 8, 3), (16, 512, 4, 8, 3),
              (8, 256, 8, 4, 4), (32, 128, 8, 4, 3), (64, 128, 4, 8, 3)]  # fmt: skip
    return [triton.Config({"BN": bn, "BK": bk, "TILES": t}, num_warps=w, num_stages=st) for bn, bk, t, w, st in shapes]


_lut4_dequant_tuned = autotune(_dequant_configs(), ["N", "K", "PAIRED", "SCALES"])(_lut4_dequant_kernel)


def _config(bm, bn, bk, warps, stages, swap: bool | None = True) -> triton.Config:
    tile = {"BM": bm, "BN": bn, "BK": bk} | ({} if swap is None else {"SWAP": swap})
    return triton.Config(tile, num_warps=warps, num_stages=stages)


# (BM, BN, BK, warps, stages, swap). Large tiles for prefill (M ≥ 64) in both operand orders, skinny
# ones (decoded weight as the 64/128-row left operand) for a few rows of x.
_FORWARD_CONFIGS = [
    _config(128, 128, 64, 8, 3), _config(256, 128, 64, 8, 3), _config(128, 128, 128, 8, 3),
    _config(128, 64, 64, 4, 4), _config(64, 128, 64, 4, 4), _config(256, 64, 64, 8, 3),
    _config(128, 128, 64, 8, 3, False), _config(128, 256, 64, 8, 3, False), _config(128, 128, 128, 8, 3, False),
    _config(64, 128, 64, 4, 4, False), _config(128, 64, 64, 4, 4, False),
    _config(16, 64, 128, 4, 3), _config(16, 32, 256, 4, 3), _config(32, 64, 128, 4, 3), _config(16, 128, 128, 4, 3),
]  # fmt: skip
_GRAD_INPUT_CONFIGS = [
    _config(128, 64, 128, 8, 3, None), _config(128, 128, 128, 8, 3, None), _config(64, 64, 128, 4, 4, None),
    _config(128, 64, 64, 4, 4, None), _config(16, 64, 128, 4, 3, None),
]  # fmt: skip


def _prune_by_m(configs, named_args, **kwargs):
    """Tiles as tall as M needs: skinny tiles for small M, ≥ 64 rows once M ≥ 64."""
    m = named_args.get("M", kwargs.get("M"))
    cap = max(16, triton.next_power_of_2(m))
    keep = [c for c in configs if c.kwargs["BM"] <= cap and (m < 64 or c.kwargs["BM"] >= 64)]
    return keep or configs[:1]


# M_BUCKET (M rounded up to a power of two) keys the tuning, so a model's many prompt lengths share it.
_TUNING = dict(key=["N", "K", "M_BUCKET", "PAIRED", "SCALES", "LUT_ASM"], prune_configs_by={"early_config_prune": _prune_by_m})


_lut4_gemm_tuned = autotune(_FORWARD_CONFIGS, **_TUNING)(_lut4_gemm_kernel)
_lut4_gemm_dx_tuned = autotune(_GRAD_INPUT_CONFIGS, **_TUNING)(_lut4_gemm_dx_kernel)


def _launch(tuned, plain, grid_of, args, kw, config):
    if config is None:
        tuned[lambda meta: (grid_of(meta),)](*args, **kw)
    else:
        meta = {k: v for k, v in config.items() if k in ("BM", "BN", "BK")}
        plain[(grid_of(meta),)](*args, **kw, **config)


def lut4_gemm(x: torch.Tensor, w: Lut4Weight, config: dict | None = None) -> torch.Tensor:
    """y = x · Wᵀ, x (M, K) row-major → y (M, N) in x's dtype; `config=None` autotunes (CUDA)."""
    m, k = x.shape
    if k != w.in_features or x.stride(1) != 1:
        raise ValueError(f"x must be a row-major (M, {w.in_features}) matrix, got {tuple(x.shape)}")
    n = w.out_features
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    pointers, sizes, layout = kernel_args(w, x.dtype)
    kw = dict(M=m, stride_xm=x.stride(0), stride_ym=y.stride(0), M_BUCKET=triton.next_power_of_2(m),
              IEEE=x.dtype == torch.float32, **sizes, **layout)  # fmt: skip
    grid_of = lambda meta: triton.cdiv(n, meta["BN"]) * triton.cdiv(m, meta["BM"])  # noqa: E731
    config = None if config is None else {"SWAP": True} | config
    _launch(_lut4_gemm_tuned, _lut4_gemm_kernel, grid_of, (x, y, *pointers), kw, config)
    return y


def lut4_gemm_grad_input(grad_out: torch.Tensor, w: Lut4Weight, config: dict | None = None) -> torch.Tensor:
    """dX = dY · W, dY (M, N) row-major → dX (M, K) in dY's dtype; `config=None` autotunes (CUDA)."""
    m, n = grad_out.shape
    if n != w.out_features or grad_out.stride(1) != 1:
        raise ValueError(f"grad_out must be a row-major (M, {w.out_features}) matrix, got {tuple(grad_out.shape)}")
    k = w.in_features
    dx = torch.empty((m, k), dtype=grad_out.dtype, device=grad_out.device)
    pointers, sizes, layout = kernel_args(w, grad_out.dtype)
    kw = dict(M=m, stride_gm=grad_out.stride(0), stride_dm=dx.stride(0), M_BUCKET=triton.next_power_of_2(m),
              IEEE=grad_out.dtype == torch.float32, **sizes, **layout)  # fmt: skip
    grid_of = lambda meta: triton.cdiv(k, meta["BK"]) * triton.cdiv(m, meta["BM"])  # noqa: E731
    config = None if config is None else {k: v for k, v in config.items() if k != "SWAP"}
    _launch(_lut4_gemm_dx_tuned, _lut4_gemm_dx_kernel, grid_of, (grad_out, dx, *pointers), kw, config)
    return dx


def lut4_dequantize(w: Lut4Weight, dtype: torch.dtype = torch.bfloat16, block: tuple[int, int] | None = None,
                    tiles: int = 1) -> torch.Tensor:  # fmt: skip
    """The dense (N, K) weight in `dtype`, decoded by the same tile reader as the matmuls.

    ``block=None`` autotunes the tile (and tiles per program) on CUDA, and launches (16, 256) tiles elsewhere;
    ``block=(BN, BK)`` with ``tiles`` fixes the launch."""
    n, k = w.out_features, w.in_features
    out = torch.empty((n, k), dtype=dtype, device=w.packed.device)
    pointers, sizes, layout = kernel_args(w, dtype)
    if block is None and w.packed.is_cuda:
        grid = lambda meta: (triton.cdiv(n, meta["BN"]), triton.cdiv(k, meta["BK"] * meta["TILES"]))  # noqa: E731
        launch_tuned(_lut4_dequant_tuned, grid, out, *pointers, **sizes, **layout)
        return out
    bn, bk = block or (16, 256)
    grid = (triton.cdiv(n, bn), triton.cdiv(k, bk * tiles))
    _lut4_dequant_kernel[grid](out, *pointers, **sizes, **layout, BN=bn, BK=bk, TILES=tiles)
    return out
