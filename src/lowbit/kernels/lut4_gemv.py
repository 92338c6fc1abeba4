"""Dequant-fused GEMV for decode: y = x · Wᵀ with a LUT4 weight and a handful of rows in x (M ≤ 8).

At batch 1 a linear layer is a pass over its weight: 2·N·K flops against N·K/2 bytes, a quarter of a
flop per byte, far under the ~250 flop/byte an H100 needs to be compute-bound, so the goal is to
stream the packed bytes at copy bandwidth. Each program owns BN output rows and walks along K: every
packed byte is loaded once (16-byte loads), its two nibbles are looked up in the 16-entry table
(`lut4_tile`), x is read as 32-bit words so each word holds the pair of activations that meets a
byte, and s·(hi·x_even + lo·x_odd) is added into a float32 accumulator with one lane per byte,
reduced over K once at the end (no cross-thread reduction in the loop). No tensor cores.

The table lookup decides the speed: from a table in memory each 4-bit value costs a 64-bit address
and an L1 load (Triton has no shared-memory table), ~300 instructions per 16 packed bytes a thread,
which held the loop to ~20–25 % of copy bandwidth on an H100. On CUDA with 16-bit x the table lives in
registers instead (`lut4_asm`: byte permutes, 3.5 instructions a value), 1.4–1.6× faster, on par with
bitsandbytes' CUDA GEMV (bench/RESULTS.md). Since session 19 the ops run `lut4_gemv_half2` for 16-bit x
(half the instructions); this kernel serves float32 x and the layouts that one does not take (K not a
multiple of 8, one scale per row, groups under 8 values), up to `ops.GEMV_MAX_M` rows: the accumulator grows
with M, and at M = 8 decode + cuBLAS is faster. Loads issued a step ahead (by hand, or by Triton's pipeliner)
were measured and did not help (RESULTS, sessions 16 and 19): the loop is bound by its integer work.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowbit.kernels.autotune import autotune, launch_tuned
from lowbit.kernels.lut4 import Lut4Weight
from lowbit.kernels.lut4_tile import (
    kernel_args,
    load_lut4_pairs,
    load_lut4_tile,
    load_pair_scales,
    load_pair_values,
    scale_pairs,
)

MAX_M = 8  # rows of x the kernel takes at once (its accumulator grows with M)


@triton.jit
def _load_x_raw(x_ptr, ms, kb0, M, KB, stride_xm, BM: tl.constexpr, BK: tl.constexpr):
    """x[:, k0 + 2j] and x[:, k0 + 2j + 1] as loaded: (BM, BK/2) each, or (BK/2,) each when BM == 1.

    16-bit x is read as 32-bit words, one per pair of columns, indexed like the packed bytes (both
    returned values are those words), and `_widen_x` widens them to float32 with bit operations
    (little-endian: column 2j is the low half). At BM == 1
    the vectors are 1-D, so the compiler moves these (not the much larger weight tile) into the
    weight's register layout.
    """
    j = tl.max_contiguous(tl.multiple_of(kb0 + tl.arange(0, BK // 2), BK // 2), BK // 2)
    if BM == 1:
        offs = 0 * kb0 + j  # (BK/2,)
        mask = j < KB
        stride_words = 0
    else:
        offs = ms[:, None] * 0 + j[None, :]  # (BM, BK/2)
        mask = (ms < M)[:, None] & (j < KB)[None, :]
        stride_words = stride_xm // 2
    if x_ptr.dtype.element_ty == tl.float32:
        if BM == 1:
            base = x_ptr + 2 * offs
        else:
            base = x_ptr + ms[:, None] * stride_xm + 2 * offs
        even = tl.load(base, mask=mask, other=0.0)
        odd = tl.load(base + 1, mask=mask, other=0.0)
    else:
        words_ptr = x_ptr.to(tl.pointer_type(tl.int32), bitcast=True) + offs
        if BM > 1:
            words_ptr += ms[:, None] * stride_words
        even = tl.load(words_ptr, mask=mask, other=0)
        odd = even
    return even, odd


@triton.jit
def _widen_x(even, odd, X_DTYPE: tl.constexpr):
    """`_load_x_raw`'s values → x's even and odd columns in float32."""
    if X_DTYPE == tl.float32:
        lo, hi = even, odd
    elif X_DTYPE == tl.bfloat16:  # bf16 is the top half of a float32
        lo, hi = (even << 16).to(tl.float32, bitcast=True), (even & -65536).to(tl.float32, bitcast=True)
    else:
        lo = (even & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        hi = (even >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return lo, hi


@triton.jit
def _load_x_pairs(x_ptr, ms, kb0, M, KB, stride_xm, BM: tl.constexpr, BK: tl.constexpr):
    even, odd = _load_x_raw(x_ptr, ms, kb0, M, KB, stride_xm, BM, BK)
    return _widen_x(even, odd, x_ptr.dtype.element_ty)


@triton.jit
def _gemv_paired(x_ptr, packed_ptr, table_ptr, scale_ptr, zp_ptr, ncode_ptr, nscale_ptr, offset_ptr,
                 rows, ms, M, N, K, KB, G, stride_xm,
                 GS: tl.constexpr, SCALES: tl.constexpr, HAS_ZP: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
                 NESTED_GS: tl.constexpr, LUT_ASM: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                 BK: tl.constexpr):  # fmt: skip
    """Fast path: one accumulator lane per packed byte, reduced over K once at the end."""
    if BM == 1:
        acc = tl.zeros((BN, BK // 2), dtype=tl.float32)
    else:
        acc = tl.zeros((BM, BN, BK // 2), dtype=tl.float32)
    for k0 in range(0, K, BK):
        xe, xo = _load_x_pairs(x_ptr, ms, k0 // 2, M, KB, stride_xm, BM, BK)  # (BK/2,) or (BM, BK/2) each
        if BM == 1:
            if HAS_ZP:
                hi, lo = load_lut4_pairs(packed_ptr, table_ptr, scale_ptr, zp_ptr, ncode_ptr, nscale_ptr, offset_ptr,
                                         rows, k0, N, K, KB, G, BN, BK, GS, SCALES, HAS_ZP, DOUBLE_QUANT,
                                         NESTED_GS, LUT_ASM)  # (BN, BK/2) each fmt: skip
                acc += hi * xe[None, :] + lo * xo[None, :]
            else:  # scale once per byte pair: s·(hi·x_even + lo·x_odd)
                hi, lo = load_pair_values(packed_ptr, table_ptr, rows, k0, N, KB, BN, BK, LUT_ASM)  # (BN, BK/2) each
                s, z = load_pair_scales(scale_ptr, zp_ptr, ncode_ptr, nscale_ptr, offset_ptr, rows, k0, N, K, G,
                                        BK, GS, SCALES, HAS_ZP, DOUBLE_QUANT, NESTED_GS)  # fmt: skip
                acc += scale_pairs(hi * xe[None, :] + lo * xo[None, :], s, z, BN, BK, GS, SCALES, HAS_ZP)
        else:
            hi, lo = load_lut4_pairs(packed_ptr, table_ptr, scale_ptr, zp_ptr, ncode_ptr, nscale_ptr, offset_ptr,
                                     rows, k0, N, K, KB, G, BN, BK, GS, SCALES, HAS_ZP, DOUBLE_QUANT,
                                     NESTED_GS, LUT_ASM)  # fmt: skip
            acc += xe[:, None, :] * hi[None, :, :] + xo[:, None, :] * lo[None, :, :]  # (BM, BN, BK/2)
    if BM == 1:  # (if/else, not an early return: Triton compiles the code after a return too)
        y = tl.sum(acc, axis=1)[None, :]  # (1, BN)
    else:
        y = tl.sum(acc, axis=2)  # (BM, BN)
    return y


@triton.jit
def _gemv_generic(x_ptr, packed_ptr, table_ptr, scale_ptr, zp_ptr, ncode_ptr, nscale_ptr, offset_ptr,
                  rows, ms, M, N, K, KB, G, stride_xm,
                  GS: tl.constexpr, SCALES: tl.constexpr, HAS_ZP: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
                  NESTED_GS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):  # fmt: skip
    """Any K and grouping, one element at a time (odd K, flat blocks spanning rows)."""
    acc = tl.zeros((BM, BN, BK), dtype=tl.float32)
    for k0 in range(0, K, BK):
        w = load_lut4_tile(packed_ptr, table_ptr, scale_ptr, zp_ptr, ncode_ptr, nscale_ptr, offset_ptr,
                           rows, k0, N, K, KB, G, BN, BK, GS, SCALES, False, HAS_ZP, DOUBLE_QUANT,
                           NESTED_GS, "")  # (BN, BK) fmt: skip
        cols = k0 + tl.arange(0, BK)
        x_mask = (ms < M)[:, None] & (cols < K)[None, :]
        x = tl.load(x_ptr + ms[:, None] * stride_xm + cols[None, :], mask=x_mask, other=0.0)  # (BM, BK)
        acc += x.to(tl.float32)[:, None, :] * w[None, :, :]
    return tl.sum(acc, axis=2)  # (BM, BN)


@triton.jit
def _lut4_gemv_kernel(x_ptr, y_ptr, packed_ptr, table_ptr, scale_ptr, zp_ptr, ncode_ptr, nscale_ptr, offset_ptr,
                      M, N, K, KB, G, stride_xm, stride_ym,
                      GS: tl.constexpr, SCALES: tl.constexpr, PAIRED: tl.constexpr, HAS_ZP: tl.constexpr,
                      DOUBLE_QUANT: tl.constexpr, NESTED_GS: tl.constexpr, LUT_ASM: tl.constexpr,
                      BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):  # fmt: skip
    rows = tl.program_id(0) * BN + tl.arange(0, BN)  # (BN,) output features of this program
    ms = tl.arange(0, BM)  # (BM,) rows of x
    args = (x_ptr, packed_ptr, table_ptr, scale_ptr, zp_ptr, ncode_ptr, nscale_ptr, offset_ptr,
            rows, ms, M, N, K, KB, G, stride_xm)  # fmt: skip
    if PAIRED:
        y = _gemv_paired(*args, GS, SCALES, HAS_ZP, DOUBLE_QUANT, NESTED_GS, LUT_ASM, BM, BN, BK)
    else:
        y = _gemv_generic(*args, GS, SCALES, HAS_ZP, DOUBLE_QUANT, NESTED_GS, BM, BN, BK)
    y_mask = (ms < M)[:, None] & (rows < N)[None, :]
    tl.store(y_ptr + ms[:, None] * stride_ym + rows[None, :], y.to(y_ptr.dtype.element_ty), mask=y_mask)


def _configs() -> list[triton.Config]:
    """(BN, BK, warps): 1–64 rows a program, 0.5–8 KiB of packed weight a step. (The loop has no dot, so
    Triton's num_stages does not pipeline it; loads a step ahead were measured not to help, RESULTS.)"""
    shapes = [(2, 1024, 4), (4, 512, 4), (4, 1024, 4), (4, 1024, 8), (8, 256, 4), (8, 512, 4), (8, 512, 8),
              (8, 1024, 8), (16, 128, 4), (16, 256, 4), (16, 256, 8), (16, 512, 8), (1, 1024, 4), (2, 512, 4),
              (4, 256, 4), (32, 128, 4), (32, 256, 8), (64, 128, 8)]  # fmt: skip
    return [triton.Config({"BN": bn, "BK": bk}, num_warps=w, num_stages=1) for bn, bk, w in shapes]


def _prune(configs, named_args, **kwargs):
    """Keep the accumulator in registers (≤ 64 floats a thread) and ≥ 8 packed bytes a thread per step."""
    bm = named_args.get("BM", kwargs.get("BM", 1))

    def fits(c):
        threads = 32 * c.num_warps
        tile = c.kwargs["BN"] * c.kwargs["BK"]
        return bm * tile <= 64 * threads and tile // 2 >= 8 * threads

    keep = [c for c in configs if fits(c)]
    return keep or [min(configs, key=lambda c: (c.kwargs["BN"] * c.kwargs["BK"], c.num_warps))]


_lut4_gemv_tuned = autotune(_configs(), ["N", "K", "BM", "PAIRED", "SCALES", "LUT_ASM"],
                            prune_configs_by={"early_config_prune": _prune})(_lut4_gemv_kernel)


def lut4_gemv(x: torch.Tensor, w: Lut4Weight, config: dict | None = None) -> torch.Tensor:
    """y = x · Wᵀ for x (M, K) with M ≤ 8, y (M, N) in x's dtype.

    `config=None` autotunes (CUDA); a dict {BN, BK, num_warps, num_stages} fixes the launch (tests, the Triton
    interpreter).
    """
    m, k = x.shape
    if m > MAX_M:
        raise ValueError(f"lut4_gemv takes at most {MAX_M} rows of x, got {m}; use lut4_gemm")
    if k != w.in_features or x.stride(1) != 1:
        raise ValueError(f"x must be a row-major (M, {w.in_features}) matrix, got {tuple(x.shape)}")
    if x.data_ptr() % 16 or x.stride(0) % 2:  # 16-bit x is read as aligned 32-bit words
        x = x.clone(memory_format=torch.contiguous_format)
    y = torch.empty((m, w.out_features), dtype=x.dtype, device=x.device)
    pointers, sizes, layout = kernel_args(w, x.dtype)
    bm = max(1, triton.next_power_of_2(m))
    args = (x, y, *pointers)
    kw = dict(M=m, stride_xm=x.stride(0), stride_ym=y.stride(0), BM=bm, **sizes, **layout)
    if config is None:
        grid = lambda meta: (triton.cdiv(w.out_features, meta["BN"]),)  # noqa: E731
        launch_tuned(_lut4_gemv_tuned, grid, *args, **kw)
    else:
        _lut4_gemv_kernel[(triton.cdiv(w.out_features, config["BN"]),)](*args, **kw, **config)
    return y
