"""Decode GEMV (M ≤ 8) that decodes and multiplies a packed 32-bit word of codes in one PTX program.

The batch-1 GEMVs before this one ran at ~39 % of an H100's copy bandwidth, whatever their launch: a
read-only kernel over the same 30 MB streams at 88 % (bench/gemv_sweep.py, bench/RESULTS.md session 19), and
neither deeper pipelining, more bytes in flight nor any tile moved them. They are bound by instruction
issue: the register-table GEMV (`lut4_gemv`) spends ~17 instructions per packed byte, two of them
re-materialising the table's constants at every lookup, four converting values and activations to
float32, three on float32 multiply-adds.

Here each packed 32-bit word (eight codes) is one call of `lut4_asm.dot_asm`: the register lookup of the
eight values, then their products with eight activations as one `mul` and three `fma.rn.f16x2`,
returning a float16 pair. The table's eight registers are loaded once per program and handed to every
call, and the activations come prepared once per call (`lut4_gemv_shared.prepare_x` with ``words``:
float16 pairs, scaled by a power of two into float16's range, in the order the program meets the
codes). A group's words are summed as float16 pairs, then scaled and accumulated in float32, as in the
shared-table GEMV (whose precision analysis applies: products and group sums to ~2⁻¹¹, the order of the
16-bit inputs' own rounding). About 8 instructions per packed byte instead of 17.

On the CPU (Triton's interpreter, no PTX) the same arithmetic runs from the 16-entry table in memory.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from lowbit.kernels.autotune import autotune, launch_tuned
from lowbit.kernels.lut4 import Lut4Weight
from lowbit.kernels.lut4_asm import dot_asm, fp16_bits, table_words
from lowbit.kernels.lut4_gemv_shared import _add2_ptx, _center, _unpack, half_tables, prepare_x
from lowbit.kernels.lut4_tile import SCALES_GROUPED, finish_scales, kernel_args, load_scale_parts, pair_scale_index

MAX_M = 8

_DOT = tl.constexpr(dot_asm())


@triton.jit
def _dot_words(word, x0, x1, x2, x3, lo0, lo1, lo2, lo3, hi0, hi1, hi2, hi3, nib_ptr, PTX: tl.constexpr):
    """Each word's Σ table[code]·x as a float16 pair (int32 bits), arguments broadcast to one shape."""
    if PTX:
        return tl.inline_asm_elementwise(_DOT, "=r,r,r,r,r,r,r,r,r,r,r,r,r,r",
                                         [word, x0, x1, x2, x3, lo0, lo1, lo2, lo3, hi0, hi1, hi2, hi3],
                                         dtype=tl.int32, is_pure=True, pack=1)  # fmt: skip
    else:  # the same lanes from the float16 table in memory: low lane the low nibbles (odd columns)
        lo = tl.zeros(word.shape, dtype=tl.float16)
        hi = tl.zeros(word.shape, dtype=tl.float16)
        for q in tl.static_range(4):  # x_q = (x[2q + 1], x[2q]) meets byte q
            xa, xb = _unpack((x0, x1, x2, x3)[q])
            ta = tl.load(nib_ptr + ((word >> 8 * q) & 15)).to(tl.int16).to(tl.float16, bitcast=True)
            tb = tl.load(nib_ptr + ((word >> 8 * q + 4) & 15)).to(tl.int16).to(tl.float16, bitcast=True)
            lo = lo + ta * xa
            hi = hi + tb * xb
        return (lo.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF) | (hi.to(tl.int16, bitcast=True).to(tl.int32) << 16)


@triton.jit
def _lane_id(like, PTX: tl.constexpr):
    """The thread's lane in its warp (0 off the GPU), shaped like `like`."""
    if PTX:
        return tl.inline_asm_elementwise("mov.u32 $0, %laneid;", "=r,r", [like], dtype=tl.int32, is_pure=True, pack=1)
    else:
        return like * 0


@triton.jit
def _load_plane(x4_ptr, ms, v, q: tl.constexpr, M, KW, BM: tl.constexpr, EVEN: tl.constexpr):
    """Pair q of words v of each row of x (`prepare_x` with ``words``: plane q of a row holds them in a run)."""
    if BM == 1 and EVEN:
        return tl.load(x4_ptr + q * KW + v)
    elif BM == 1:
        return tl.load(x4_ptr + q * KW + v, mask=v < KW, other=0)
    else:
        return tl.load(x4_ptr + ms[:, None].to(tl.int64) * (4 * KW) + q * KW + v[None, :],
                       mask=(ms < M)[:, None] & (v < KW)[None, :], other=0)  # fmt: skip


@triton.jit
def _half2_kernel(x4_ptr, inv_ptr, sums_ptr, y_ptr, packed_ptr, words_ptr, nib_ptr, scale_ptr, zp_ptr, ncode_ptr,
                  nscale_ptr, offset_ptr, M, N, K, KW, G, stride_ym, center,
                  GS: tl.constexpr, HAS_ZP: tl.constexpr, DOUBLE_QUANT: tl.constexpr, NESTED_GS: tl.constexpr,
                  PTX: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                  STAGES: tl.constexpr, EVEN: tl.constexpr):  # fmt: skip
    """y[m, rows] for one block of BN output rows; x4 holds x's prepared pairs, four int32 per packed word.
    EVEN: K and N are multiples of every BK and BN, so the tiles load without masks."""
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    ms = tl.arange(0, BM)
    # The table's registers, loaded once. Loaded as scalars they would sit in uniform registers, which a prmt
    # cannot read: ptxas then copies them into ordinary ones at every call (2 instructions a byte). Each lane
    # reads one of four copies of the table instead, so the values are per thread.
    t = words_ptr + 8 * (_lane_id(rows[:, None], PTX) & 3)  # (BN, 1)
    lo0, lo1, lo2, lo3 = tl.load(t), tl.load(t + 1), tl.load(t + 2), tl.load(t + 3)
    hi0, hi1, hi2, hi3 = tl.load(t + 4), tl.load(t + 5), tl.load(t + 6), tl.load(t + 7)
    words = packed_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
    acc = tl.zeros((BM, BN, BK // GS), dtype=tl.float32)
    for k0 in tl.range(0, K, BK, num_stages=STAGES):
        v = tl.max_contiguous(tl.multiple_of(k0 // 8 + tl.arange(0, BK // 8), BK // 8), BK // 8)  # words of a row
        word_ptrs = words + rows[:, None].to(tl.int64) * KW + v[None, :]  # (BN, BK/8)
        if EVEN:
            word = tl.load(word_ptrs)
        else:
            word = tl.load(word_ptrs, mask=(rows < N)[:, None] & (v < KW)[None, :], other=0)
        q0 = _load_plane(x4_ptr, ms, v, 0, M, KW, BM, EVEN)  # pair q of each word: (BK/8,), or (BM, BK/8)
        q1 = _load_plane(x4_ptr, ms, v, 1, M, KW, BM, EVEN)
        q2 = _load_plane(x4_ptr, ms, v, 2, M, KW, BM, EVEN)
        q3 = _load_plane(x4_ptr, ms, v, 3, M, KW, BM, EVEN)
        if BM == 1:  # 1-D activations: the compiler moves them, not the word tile, into the other's layout
            p = _dot_words(word, q0[None, :], q1[None, :], q2[None, :], q3[None, :], lo0, lo1, lo2, lo3,
                           hi0, hi1, hi2, hi3, nib_ptr, PTX)  # (BN, BK/8) fmt: skip
            p = tl.reshape(p, (1, BN, BK // GS, GS // 8))
        else:
            p = _dot_words(word[None, :, :], q0[:, None, :], q1[:, None, :], q2[:, None, :], q3[:, None, :],
                           lo0[None], lo1[None], lo2[None], lo3[None], hi0[None], hi1[None], hi2[None], hi3[None],
                           nib_ptr, PTX)  # (BM, BN, BK/8) fmt: skip
            p = tl.reshape(p, (BM, BN, BK // GS, GS // 8))
        if PTX:
            lo, hi = _unpack(tl.reduce(p, 3, _add2_ptx))
        else:
            lo, hi = _unpack(p)
            lo, hi = tl.sum(lo, axis=3), tl.sum(hi, axis=3)
        idx, ok = pair_scale_index(rows, k0, N, K, G, BK, GS, 1)  # (BN, BK/GS); 1: SCALES_GROUPED
        raw, nested = load_scale_parts(scale_ptr, nscale_ptr, idx, ok, DOUBLE_QUANT, NESTED_GS)
        s = finish_scales(raw, nested, ncode_ptr, offset_ptr, DOUBLE_QUANT)
        dot = lo.to(tl.float32) + hi.to(tl.float32)  # (BM, BN, BK/GS)
        if HAS_ZP:
            z = tl.load(zp_ptr + idx, mask=ok, other=0).to(tl.float32)
            g = k0 // GS + tl.arange(0, BK // GS)
            sums = tl.load(sums_ptr + ms[:, None] * G + g[None, :], mask=(ms < M)[:, None] & (g < G)[None, :],
                           other=0.0)  # fmt: skip
            dot -= (z - center)[None, :, :] * sums[:, None, :]
        acc += dot * s[None, :, :]
    y = tl.sum(acc, axis=2) * tl.load(inv_ptr + ms, mask=ms < M, other=1.0)[:, None]  # (BM, BN)
    tl.store(y_ptr + ms[:, None] * stride_ym + rows[None, :], y.to(y_ptr.dtype.element_ty),
             mask=(ms < M)[:, None] & (rows < N)[None, :])  # fmt: skip


MAX_BN, MAX_BK = 32, 2048  # the largest tile of any launch (a launch with BK > K still works, masked)


def _configs() -> list[triton.Config]:
    """(BN, BK, warps, STAGES): the ten fastest of 100 launches at each Llama-3-8B shape, M = 1, on an H100
    (bench/gemv_sweep.py, session 19), and tiles for several rows of x."""
    shapes = [(8, 2048, 4, 1), (16, 1024, 4, 1), (2, 1024, 1, 1), (4, 2048, 2, 1), (4, 1024, 1, 3), (4, 512, 1, 3),
              (2, 2048, 2, 1), (8, 1024, 4, 1), (2, 1024, 1, 3), (4, 2048, 4, 1), (4, 1024, 2, 3), (16, 2048, 8, 1),
              (8, 512, 2, 3), (8, 512, 4, 3), (16, 256, 4, 3), (32, 256, 8, 3)]  # fmt: skip
    return [triton.Config({"BN": bn, "BK": bk, "STAGES": s}, num_warps=w, num_stages=1) for bn, bk, w, s in shapes]


def _prune(configs, named_args, **kwargs):
    """A tile covers whole groups, and the (BM, BN, BK/8) products stay in registers (≤ 32 words a thread)."""
    gs, bm = named_args.get("GS", kwargs.get("GS")), named_args.get("BM", kwargs.get("BM", 1))
    keep = [c for c in configs
            if c.kwargs["BK"] >= gs and bm * c.kwargs["BN"] * c.kwargs["BK"] // 8 <= 32 * 32 * c.num_warps]  # fmt: skip
    return keep or [c for c in configs if c.kwargs["BK"] >= gs][:1] or configs[:1]


_half2_tuned = autotune(_configs(), ["N", "K", "BM", "HAS_ZP"], prune_configs_by={"early_config_prune": _prune})(
    _half2_kernel
)


def supports(x: torch.Tensor, w: Lut4Weight) -> bool:
    """1 to MAX_M rows of x; grouped scales of a power-of-two group size ≥ 8 (NF4, FP4, E2M1, int4 groups with or
    without zero points); K a multiple of 8 and the packed bytes 4-byte aligned (they are read as words)."""
    if x.dim() != 2 or not 1 <= x.shape[0] <= MAX_M or w.in_features % 8 or w.packed.data_ptr() % 4:
        return False
    _, _, layout = kernel_args(w)
    return layout["SCALES"] == SCALES_GROUPED and layout["PAIRED"] and 8 <= layout["GS"] <= 1024


_WORDS: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _table_words(table: torch.Tensor, center: float) -> torch.Tensor:
    """Four copies of the eight int32 `lut4_asm.table_words` of table - center on the table's device (a copy per
    lane & 3, see the kernel), read once per table."""
    key = (table.data_ptr(), center)
    hit = _WORDS.get(key)
    if hit is None:
        if table.is_cuda and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("the half2 GEMV reads its table outside a CUDA graph capture: call it once first")
        bits = fp16_bits(table.detach().float() - center)
        if bits is None:
            raise ValueError("the format's table does not fit float16")
        words = torch.tensor([v - (1 << 32) if v >= 1 << 31 else v for v in table_words(bits)] * 4, dtype=torch.int32)
        if len(_WORDS) > 64:
            _WORDS.clear()
        hit = _WORDS[key] = (table, words.to(table.device))
    return hit[1]


def lut4_gemv_half2(x: torch.Tensor, w: Lut4Weight, config: dict | None = None) -> torch.Tensor:
    """y = x · Wᵀ for x (M, K), 1 ≤ M ≤ MAX_M, y (M, N) in x's dtype; `supports` says which weights.

    `config=None` autotunes (CUDA); a dict {BN, BK, num_warps[, STAGES]} fixes the launch.
    """
    if not supports(x, w):
        raise ValueError(f"lut4_gemv_half2 takes 1 to {MAX_M} rows of x and a weight with grouped scales "
                         "(group ≥ 8), K divisible by 8")  # fmt: skip
    if x.shape[1] != w.in_features:
        raise ValueError(f"x must be (M, {w.in_features}), got {tuple(x.shape)}")
    pointers, sizes, layout = kernel_args(w)
    gs, has_zp = layout["GS"], layout["HAS_ZP"]
    if config is not None and config["BK"] % gs:
        raise ValueError(f"config BK={config['BK']} must cover whole groups ({gs})")
    x = x if x.stride(1) == 1 else x.contiguous()
    x4, inv, sums = prepare_x(x, gs if has_zp else None, words=True)
    m, k = x.shape
    y = torch.empty((m, w.out_features), dtype=x.dtype, device=x.device)
    center = _center(w.table) if has_zp else 0.0
    ptx = x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1"
    packed, _, *rest = pointers  # packed, table, scale, zero point, nested code, nested scale, offset
    args = (x4, inv, sums, y, packed, _table_words(w.table, center), half_tables(w.table, "nibble", center), *rest)
    kw = dict(M=m, N=sizes["N"], K=k, KW=k // 8, G=sizes["G"], stride_ym=y.stride(0), center=center, GS=gs,
              HAS_ZP=has_zp, DOUBLE_QUANT=layout["DOUBLE_QUANT"], NESTED_GS=layout["NESTED_GS"], PTX=ptx,
              BM=triton.next_power_of_2(m), EVEN=k % MAX_BK == 0 and w.out_features % MAX_BN == 0)  # fmt: skip
    if config is None:
        launch_tuned(_half2_tuned, lambda meta: (triton.cdiv(w.out_features, meta["BN"]),), *args, **kw)
    else:
        config = {"STAGES": 1} | config
        kw["EVEN"] = kw["EVEN"] and k % config["BK"] == 0 and w.out_features % config["BN"] == 0
        _half2_kernel[(triton.cdiv(w.out_features, config["BN"]),)](*args, **kw, **config)
    return y
