"""Decode GEMV (M ≤ 8) with the 4-bit table in shared memory and the products in packed half2 arithmetic.

Why another GEMV: compiled for sm_90 and disassembled (`bench/sass_count.py`), the register-table GEMV
(`lut4_gemv`) spends 16–17 instructions per packed byte — 7 on the `prmt` table lookup, 2 converting the
looked-up float16 values to float32, 2 converting x from bfloat16, 3 multiply-adds and the scale —
which is what holds it near 30–38 % of an H100's copy bandwidth: it is bound by instruction issue, not by
memory. Here each packed byte costs 8–9:

- its two nibbles are looked up at once, as one byte, in a 256-entry table of float16 pairs
  (table[high nibble], table[low nibble]) that `tl.gather` keeps in shared memory: one shared load;
  ``mode="nibble"`` looks each nibble up in a 16-entry table instead (two loads, no bank conflicts);
- x arrives as float16 pairs (x[2j], x[2j+1]) — one 32-bit word per packed byte — prepared once per call by
  `_prepare_x_kernel`, scaled by a power of two so that |x| < 1 (bfloat16 activations can exceed float16's
  range; the power of two is undone exactly at the end); with zero points (GPTQ-style int4 groups) it also
  sums each group of x, since Σ(t - z)·x = Σ t·x - z·Σ x;
- the pair of products is one `mul.rn.f16x2`, and a group's products are summed in float16 pairs (a
  group's GS values, |w·x| ≤ max|table| each, far from float16's range), then converted to float32 once per
  group, scaled and accumulated in float32.

Precision: float16 products and group sums carry ~2⁻¹¹ relative rounding, the same order as the
bfloat16 inputs themselves (2⁻⁹); the tests bound it against float64.

Checked on the CPU (Triton's interpreter, which runs the float16 pair arithmetic as float16 numpy instead
of PTX) and compiled for sm_90 in CI. Measured on an H100 (bench/RESULTS.md, session 15) it is 1.45–1.56× the
register GEMV at M = 4 and 1.1–1.4× decode + cuBLAS at M = 8, and level with the register GEMV at M = 1
(25.4 µs on 14336×4096, 38 % of copy bandwidth: not the 2× its instruction count promised). At M = 1 both
GEMVs take ~1 µs per K step, whatever the step's work: each step waits a memory latency for its loads and
then for the double-quant code's value. ``AHEAD`` (autotuned both ways; not yet timed) issues the next
step's loads before this step computes. The ops run it for 2–8 rows of 16-bit x (`ops.SHARED_GEMV_M`).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from lowbit.kernels.autotune import autotune, launch_tuned
from lowbit.kernels.lut4 import Lut4Weight
from lowbit.kernels.lut4_tile import (
    SCALES_GROUPED,
    finish_scales,
    kernel_args,
    load_pair_bytes,
    load_scale_parts,
    pair_scale_index,
)

MODES = ("byte", "nibble")


@triton.jit
def _unpack(a):
    """int32 bits of a float16 pair → (low half, high half) as float16."""
    return (a & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True), (a >> 16).to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def _pack(lo, hi):
    return (lo.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF) | (hi.to(tl.int16, bitcast=True).to(tl.int32) << 16)


@triton.jit
def _mul2(a, b, PTX: tl.constexpr):
    """Float16 pairs a·b, lane by lane (int32 bits in and out)."""
    if PTX:
        return tl.inline_asm_elementwise("mul.rn.f16x2 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.int32,
                                         is_pure=True, pack=1)  # fmt: skip
    else:
        a0, a1 = _unpack(a)
        b0, b1 = _unpack(b)
        return _pack(a0 * b0, a1 * b1)


@triton.jit
def _add2_ptx(a, b):
    """Float16 pairs a + b (the PTX path's group sums; the interpreter sums the unpacked lanes instead)."""
    return tl.inline_asm_elementwise("add.rn.f16x2 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.int32, is_pure=True,
                                     pack=1)  # fmt: skip


@triton.jit
def _prepare_x_kernel(x_ptr, out_ptr, inv_ptr, sums_ptr, K, KB, G, stride_xm,
                      GS: tl.constexpr, SUMS: tl.constexpr, BLOCK: tl.constexpr, WORDS: tl.constexpr):  # fmt: skip
    """Row m of x → float16 pairs of x·2^e (|x·2^e| < 1) as int32 words, and 2^-e; with SUMS, also the sum of
    each group of GS (rounded, scaled) values, which zero points multiply. Pair j is (x[2j], x[2j + 1]), or
    with WORDS (x[2j + 1], x[2j]), as `lut4_asm.dot_asm` meets a byte's codes, stored as four planes of K/8 (pair
    q of the 8-column word v at q·K/8 + v), so that a kernel reads each plane's run of words with vector loads
    (a permutation within 8 columns: groups of GS ≥ 8 keep their pairs together)."""
    m = tl.program_id(0)
    x_ptr += m.to(tl.int64) * stride_xm
    amax = tl.zeros((BLOCK,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        k = k0 + tl.arange(0, BLOCK)
        amax = tl.maximum(amax, tl.abs(tl.load(x_ptr + k, mask=k < K, other=0.0).to(tl.float32)))
    biased = (tl.max(amax, axis=0).to(tl.int32, bitcast=True) >> 23) & 0xFF  # amax < 2^(biased - 126)
    biased = tl.where(biased == 0xFF, 127, biased)  # inf / nan: scale 1, let them through
    scale = ((253 - biased) << 23).to(tl.float32, bitcast=True)  # 2^(126 - biased)
    tl.store(inv_ptr + m, ((biased + 1) << 23).to(tl.float32, bitcast=True))  # 2^(biased - 126)
    for j0 in range(0, KB, BLOCK // 2):
        j = j0 + tl.arange(0, BLOCK // 2)
        col = 2 * j + 1 if WORDS else 2 * j
        step = -1 if WORDS else 1
        even = (tl.load(x_ptr + col, mask=j < KB, other=0.0).to(tl.float32) * scale).to(tl.float16)
        odd = (tl.load(x_ptr + col + step, mask=j < KB, other=0.0).to(tl.float32) * scale).to(tl.float16)
        dest = (j % 4) * (KB // 4) + j // 4 if WORDS else j
        tl.store(out_ptr + m.to(tl.int64) * KB + dest, _pack(even, odd), mask=j < KB)
        if SUMS:  # (BLOCK is a multiple of GS, so a block holds whole groups)
            pair = even.to(tl.float32) + odd.to(tl.float32)
            g = j0 * 2 // GS + tl.arange(0, BLOCK // GS)
            tl.store(sums_ptr + m.to(tl.int64) * G + g, tl.sum(tl.reshape(pair, (BLOCK // GS, GS // 2)), 1),
                     mask=g < G)  # fmt: skip


@triton.jit
def _step_loads(x2_ptr, sums_ptr, packed_ptr, scale_ptr, zp_ptr, nscale_ptr, rows, ms, k0, M, N, K, KB, G,
                GS: tl.constexpr, HAS_ZP: tl.constexpr, DOUBLE_QUANT: tl.constexpr, NESTED_GS: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):  # fmt: skip
    """Every global load of one K step (zeros past K): the packed bytes (BN, BK/2), x's pairs (BM, BK/2), the
    groups' scales (BN, BK/GS) — double-quant codes and their nested scales, else the scales themselves —
    and with zero points the zero points (BN, BK/GS) and x's group sums (BM, BK/GS). As loaded, unconverted:
    an instruction that reads a loaded value waits for it, so conversions belong where the values are used."""
    b = load_pair_bytes(packed_ptr, rows, k0, N, KB, BN, BK)
    j = tl.max_contiguous(tl.multiple_of(k0 // 2 + tl.arange(0, BK // 2), BK // 2), BK // 2)
    x2 = tl.load(x2_ptr + ms[:, None].to(tl.int64) * KB + j[None, :], mask=(ms < M)[:, None] & (j < KB)[None, :],
                 other=0)  # (BM, BK/2) fmt: skip
    idx, ok = pair_scale_index(rows, k0, N, K, G, BK, GS, 1)  # (BN, BK/GS); 1: SCALES_GROUPED
    raw, nested = load_scale_parts(scale_ptr, nscale_ptr, idx, ok, DOUBLE_QUANT, NESTED_GS)
    z = nested
    sums = tl.zeros((BM, BK // GS), dtype=tl.float32)
    if HAS_ZP:
        z = tl.load(zp_ptr + idx, mask=ok, other=0)
        g = k0 // GS + tl.arange(0, BK // GS)
        sums = tl.load(sums_ptr + ms[:, None] * G + g[None, :], mask=(ms < M)[:, None] & (g < G)[None, :], other=0.0)
    return b, x2, raw, nested, z, sums


@triton.jit
def _gemv_shared_kernel(x2_ptr, inv_ptr, sums_ptr, y_ptr, packed_ptr, pairs_ptr, scale_ptr, zp_ptr, ncode_ptr,
                        nscale_ptr, offset_ptr, M, N, K, KB, G, stride_ym, center,
                        GS: tl.constexpr, HAS_ZP: tl.constexpr, DOUBLE_QUANT: tl.constexpr, NESTED_GS: tl.constexpr,
                        TABLE: tl.constexpr, PTX: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                        BK: tl.constexpr, AHEAD: tl.constexpr, STAGES: tl.constexpr):  # fmt: skip
    """With zero points a group's value is (table[c] - z)·s: the kernel's table holds table[c] - center (small
    float16 values, so the dot product does not carry a large constant) and subtracts (z - center)·Σx.

    With AHEAD the loads of step k + 1 are issued before step k computes (carried in registers): a step's
    loads otherwise wait a whole memory latency each, which is what bounds a GEMV of so little arithmetic."""
    rows = tl.program_id(0) * BN + tl.arange(0, BN)  # output features
    ms = tl.arange(0, BM)  # rows of x, all in this program: each packed byte is read and looked up once
    table = tl.load(pairs_ptr + tl.arange(0, TABLE))  # (TABLE,) int32: float16 pairs (byte) or values (nibble)
    acc = tl.zeros((BM, BN, BK // GS), dtype=tl.float32)
    if AHEAD:
        nb, nx2, nraw, nnested, nz, nsums = _step_loads(x2_ptr, sums_ptr, packed_ptr, scale_ptr, zp_ptr, nscale_ptr,
                                                        rows, ms, 0, M, N, K, KB, G, GS, HAS_ZP, DOUBLE_QUANT,
                                                        NESTED_GS, BM, BN, BK)  # fmt: skip
    for k0 in tl.range(0, K, BK, num_stages=STAGES):  # STAGES > 1: Triton's pipeliner (see lut4_gemv)
        if AHEAD:
            b, x2, raw, nested, z, sums = nb, nx2, nraw, nnested, nz, nsums
            nb, nx2, nraw, nnested, nz, nsums = _step_loads(x2_ptr, sums_ptr, packed_ptr, scale_ptr, zp_ptr,
                                                            nscale_ptr, rows, ms, k0 + BK, M, N, K, KB, G, GS, HAS_ZP,
                                                            DOUBLE_QUANT, NESTED_GS, BM, BN, BK)  # fmt: skip
        else:
            b, x2, raw, nested, z, sums = _step_loads(x2_ptr, sums_ptr, packed_ptr, scale_ptr, zp_ptr, nscale_ptr,
                                                      rows, ms, k0, M, N, K, KB, G, GS, HAS_ZP, DOUBLE_QUANT,
                                                      NESTED_GS, BM, BN, BK)  # fmt: skip
        b = tl.reshape(b.to(tl.int32), (BN * BK // 2,))
        if TABLE == 256:
            w = tl.gather(table, b, 0)  # (table[high nibble], table[low nibble]): columns 2j, 2j + 1
        else:
            w = (tl.gather(table, b >> 4, 0) & 0xFFFF) | (tl.gather(table, b & 15, 0) << 16)
        p = _mul2(tl.reshape(w, (1, BN, BK // 2)), x2[:, None, :], PTX)  # (BM, BN, BK/2)
        p = tl.reshape(p, (BM, BN, BK // GS, GS // 2))
        if PTX:  # a group's products summed as float16 pairs
            lo, hi = _unpack(tl.reduce(p, 3, _add2_ptx))  # (BM, BN, BK/GS) each
        else:  # (the interpreter runs a custom reduction element by element: sum the float16 lanes instead)
            lo, hi = _unpack(p)
            lo, hi = tl.sum(lo, axis=3), tl.sum(hi, axis=3)
        # with AHEAD the double-quant code arrived a step ago, so the lookup of its value is an L1 hit on the
        # 1 KB code table (a tl.gather of it from registers would add 4 barriers a step)
        s = finish_scales(raw, nested, ncode_ptr, offset_ptr, DOUBLE_QUANT)
        dot = lo.to(tl.float32) + hi.to(tl.float32)  # (BM, BN, BK/GS)
        if HAS_ZP:
            dot -= (z.to(tl.float32) - center)[None, :, :] * sums[:, None, :]
        acc += dot * s[None, :, :]
    y = tl.sum(acc, axis=2) * tl.load(inv_ptr + ms, mask=ms < M, other=1.0)[:, None]  # (BM, BN)
    mask = (ms < M)[:, None] & (rows < N)[None, :]
    tl.store(y_ptr + ms[:, None] * stride_ym + rows[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


def _configs() -> list[triton.Config]:
    shapes = [(8, 512, 4, 3), (16, 256, 4, 3), (16, 512, 4, 3), (16, 512, 8, 3), (32, 256, 8, 3), (32, 128, 4, 3),
              (16, 256, 4, 4), (64, 128, 8, 3), (8, 1024, 8, 3)]  # fmt: skip
    return [triton.Config({"BN": bn, "BK": bk, "AHEAD": ahead, "STAGES": 1}, num_warps=w, num_stages=s)
            for bn, bk, w, s in shapes for ahead in (False, True)]


def _prune(configs, named_args, **kwargs):
    """A tile covers whole groups; the (BM, BN, BK/2) products stay in registers (≤ 64 words a thread)."""
    gs, bm = named_args.get("GS", kwargs.get("GS")), named_args.get("BM", kwargs.get("BM", 1))
    keep = [c for c in configs if c.kwargs["BK"] >= gs and bm * c.kwargs["BN"] * c.kwargs["BK"] // 2 <= 64 * 32 * c.num_warps]
    return keep or [c for c in configs if c.kwargs["BK"] >= gs][:1] or configs[:1]


_gemv_shared_tuned = autotune(_configs(), ["N", "K", "BM", "TABLE"],
                              prune_configs_by={"early_config_prune": _prune})(_gemv_shared_kernel)


MAX_M = 8  # rows of x at once (decode batches; the products of all rows share each byte's lookup)


def supports(x: torch.Tensor, w: Lut4Weight) -> bool:
    """Up to MAX_M rows of x; grouped scales (NF4, FP4, E2M1, int4 groups with or without zero points)."""
    if x.dim() != 2 or not 1 <= x.shape[0] <= MAX_M or w.in_features % 2:
        return False
    _, _, layout = kernel_args(w)
    gs = layout["GS"]
    return layout["SCALES"] == SCALES_GROUPED and layout["PAIRED"] and 2 <= gs <= 1024


_TABLES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # (table address, mode, center) → (table, kernel's)


def half_tables(table: torch.Tensor, mode: str, center: float = 0.0) -> torch.Tensor:
    """The kernel's table for a (16,) float32 format table minus ``center``: 256 float16 pairs (byte mode) or
    16 float16 values."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    key = (table.data_ptr(), mode, center)
    hit = _TABLES.get(key)
    if hit is not None:
        return hit[1]
    if table.is_cuda and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("the shared-table GEMV builds its table outside a CUDA graph capture: call it once first")
    half = (table.detach().float() - center).to(torch.float16)
    if not torch.isfinite(half).all():
        raise ValueError("the format's table does not fit float16")
    bits = half.view(torch.int16).to(torch.int32) & 0xFFFF  # (16,)
    if mode == "byte":
        byte = torch.arange(256, device=table.device)
        out = bits[byte >> 4] | (bits[byte & 15] << 16)  # high nibble (even column) in the low half, like x
    else:
        out = bits
    if len(_TABLES) > 64:
        _TABLES.clear()
    _TABLES[key] = (table, out.to(torch.int32).contiguous())
    return _TABLES[key][1]



def _prepare_launch(k: int) -> tuple[int, int]:
    """(values per step, warps) of the preparation: the whole row in one step up to 32k values, so that a row
    costs two dependent loads (for the maximum, then for the conversion) instead of two per 1k values; a power
    of two ≥ 1024, hence a multiple of every supported group size."""
    block = min(max(triton.next_power_of_2(k), 1024), 32768)
    return block, 4 if block <= 2048 else 8 if block <= 8192 else 16


def prepare_x(x: torch.Tensor, group_size: int | None = None, words: bool = False
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """x (M, K) → (M, K/2) int32 float16 pairs of each row times its 2^e, (M,) float32 2^-e, and with a
    ``group_size`` the (M, ceil(K / group_size)) float32 sums of each group of those scaled values.
    ``words``: the pairs in `lut4_asm.dot_asm`'s order (K a multiple of 8)."""
    if words and x.shape[1] % 8:
        raise ValueError(f"pairs in word order need K divisible by 8, got {x.shape[1]}")
    m, k = x.shape
    x2 = torch.empty((m, k // 2), dtype=torch.int32, device=x.device)
    inv = torch.empty(m, dtype=torch.float32, device=x.device)
    groups = -(-k // group_size) if group_size else 1
    sums = torch.empty((m, groups), dtype=torch.float32, device=x.device)
    block, warps = _prepare_launch(k)
    _prepare_x_kernel[(m,)](x, x2, inv, sums, k, k // 2, groups, x.stride(0), GS=group_size or 2,
                            SUMS=group_size is not None, BLOCK=block, WORDS=words, num_warps=warps)  # fmt: skip
    return x2, inv, sums


def lut4_gemv_shared(x: torch.Tensor, w: Lut4Weight, mode: str = "byte", config: dict | None = None) -> torch.Tensor:
    """y = x · Wᵀ for x (M, K), M ≤ MAX_M, y (M, N) in x's dtype; see `supports` for the weights it takes.

    `config=None` autotunes (CUDA); a dict {BN, BK, num_warps, num_stages[, AHEAD]} fixes the launch.
    """
    if not supports(x, w):
        raise ValueError(f"lut4_gemv_shared takes 1 to {MAX_M} rows of x and a weight with grouped scales")
    if x.shape[1] != w.in_features:
        raise ValueError(f"x must be (M, {w.in_features}), got {tuple(x.shape)}")
    if config is not None and config["BK"] < kernel_args(w)[2]["GS"]:
        raise ValueError(f"config BK={config['BK']} must cover a whole group ({kernel_args(w)[2]['GS']})")
    x = x if x.stride(1) == 1 else x.contiguous()
    pointers, sizes, layout = kernel_args(w)
    has_zp = layout["HAS_ZP"]
    x2, inv, sums = prepare_x(x, layout["GS"] if has_zp else None)
    m = x.shape[0]
    y = torch.empty((m, w.out_features), dtype=x.dtype, device=x.device)
    center = _center(w.table) if has_zp else 0.0
    pointers[1] = half_tables(w.table, mode, center)
    kw = dict(M=m, **sizes, stride_ym=y.stride(0), center=center, GS=layout["GS"], HAS_ZP=has_zp,
              DOUBLE_QUANT=layout["DOUBLE_QUANT"], NESTED_GS=layout["NESTED_GS"], TABLE=256 if mode == "byte" else 16,
              PTX=x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1", BM=triton.next_power_of_2(m))  # fmt: skip
    args = (x2, inv, sums, y, *pointers)
    if config is None:
        launch_tuned(_gemv_shared_tuned, lambda meta: (triton.cdiv(w.out_features, meta["BN"]),), *args, **kw)
    else:
        config = {"AHEAD": False, "STAGES": 1} | config
        _gemv_shared_kernel[(triton.cdiv(w.out_features, config["BN"]),)](*args, **kw, **config)
    return y


_CENTERS: dict[int, tuple[torch.Tensor, float]] = {}


def _center(table: torch.Tensor) -> float:
    """The middle of a table's range (7.5 for int4's 0…15), read once per table (a host sync)."""
    hit = _CENTERS.get(table.data_ptr())
    if hit is None:
        if table.is_cuda and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("the shared-table GEMV reads its table outside a CUDA graph capture: call it once first")
        hit = _CENTERS[table.data_ptr()] = (table, float(table.max() + table.min()) / 2)
    return hit[1]
