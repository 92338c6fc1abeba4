"""Decode GEMV (1 to 8 rows of x) that decodes and multiplies a packed 32-bit word of codes in one PTX program.

At batch 1 a linear layer is a pass over its weight, ¼ flop per byte, so the goal is to stream the
packed bytes at copy bandwidth. A read-only kernel over an 8B model's 30 MB gate projection streams at 88 %
of an H100's copy bandwidth (bench/gemv_sweep.py), but the earlier GEMVs reached ~39 % with any launch
(tiles, warps, software pipelining): decoding 4-bit codes through a table is integer work, and they spent
~17 instructions per packed byte (bench/RESULTS.md, session 19).

Each packed word (eight codes) is one PTX program that looks its values up and multiplies them with the
activations as one `mul` and three `fma.rn.f16x2`, returning a float16 pair. Two lookups:

- SMEM (what one row of x runs on Hopper, `hopper_single_row_launch`): each byte indexes a 256-entry table
  of float16 pairs (table[low nibble], table[high nibble]) in shared memory, 32 copies interleaved by word
  so that each lane reads its own bank (`lut4_asm.shared_dot_asm`): 4 instructions a byte. The 32 KB table
  is declared by inline PTX and filled by each block; several rows of x share each word's lookup;
- registers (`lut4_asm.dot_asm`): the 16 values in eight registers per thread (loaded from an address that
  differs by lane: as uniform values ptxas would copy them at every call), a byte's two codes selected
  together: 8 instructions a byte.

The activations are prepared once per call by `prepare_x`: float16 pairs, each SLICE columns scaled by their
own power of two into float16's range (bf16 activations can exceed it; the power is undone exactly, per
group), in the order the program meets the codes, as four planes the kernel reads in its word tile's
layout. On Hopper the GEMV is a
programmatic dependent launch: it fills its table and loads its first words while `prepare_x` runs. A
group's words are summed as float16 pairs, converted to float32 once per group, scaled, and accumulated in
float32; with zero points (GPTQ-style int4 groups) the table is centred and Σ(t - z)·x = Σ t·x - z·Σ x
uses group sums of x that `prepare_x` also makes. AHEAD launches load each step's successor before
computing it.

Precision: float16 products and group sums carry ~2⁻¹¹ relative rounding, the order of the 16-bit inputs'
own (bf16: 2⁻⁹); the tests bound it against float64 for activations from 1e-6 to 3e5 and an outlier.
Measured on an H100 (bench/RESULTS.md, session 21): 8.0 / 16.3 / 16.2 µs at M = 1 on the Llama-3-8B
shapes, 1.34–1.85× bitsandbytes, 61–62 % of copy bandwidth on the MLP shapes, where a read of the same bytes
takes 11.4 µs. What remains is latency, not the lookup: Nsight Compute (H200) sees one eligible warp per
scheduler and half an instruction issued per cycle (6.2 instructions a byte would take ~7 µs at full issue).
Neither a persistent grid of programs walking many tiles, capped registers (more blocks an SM) nor Triton's
software pipeliner (cp.async into shared memory) gained.

On the CPU (Triton's interpreter, no PTX) the same lanes are computed from the 16-entry table in memory.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from lowbit.kernels.autotune import autotune, launch_tuned
from lowbit.kernels.lut4 import Lut4Weight
from lowbit.kernels.lut4_asm import (
    dot_asm,
    fp16_bits,
    pair_products_asm,
    pair_words,
    shared_dot_asm,
    shared_lookup_asm,
    shared_table_asm,
    table_words,
)
from lowbit.kernels.lut4_tile import SCALES_GROUPED, kernel_args, pair_scale_index

MAX_M = 8

_DOT = tl.constexpr(dot_asm())
_PAIR_PRODUCTS = tl.constexpr(pair_products_asm())
# the shared-table programs for 32 and 16 copies of the table (COPIES), picked by a constexpr branch
_SHARED_DOT_32, _SHARED_DOT_16 = tl.constexpr(shared_dot_asm(32)), tl.constexpr(shared_dot_asm(16))
_SHARED_LOOKUP_32, _SHARED_LOOKUP_16 = tl.constexpr(shared_lookup_asm(32)), tl.constexpr(shared_lookup_asm(16))
_SHARED_TABLE_32, _SHARED_TABLE_16 = tl.constexpr(shared_table_asm(32)), tl.constexpr(shared_table_asm(16))


@triton.jit
def _unpack(a):
    """int32 bits of a float16 pair → (low half, high half) as float16."""
    return (a & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True), (a >> 16).to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def _pack(lo, hi):
    return (lo.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF) | (hi.to(tl.int16, bitcast=True).to(tl.int32) << 16)


@triton.jit
def _prepare_x_kernel(x_ptr, out_ptr, inv_ptr, sums_ptr, K, KB, G, S, stride_xm, GS: tl.constexpr,
                      SUMS: tl.constexpr, SLICE: tl.constexpr, PDL: tl.constexpr):  # fmt: skip
    """Slice s of row m of x (SLICE columns) → float16 pairs of x·2^e (|x·2^e| < 1, e the slice's own) as int32
    words, and 2^-e; with SUMS, also the sum of each group of GS (rounded, scaled) values, which zero points
    multiply. Pair j is (x[2j + 1], x[2j]), as `lut4_asm.dot_asm` meets a byte's codes, stored as four planes
    of K/8 (pair q of the 8-column word v at q·K/8 + v), so that the GEMV reads each plane's run of words with
    vector loads (a permutation within 8 columns: groups of GS ≥ 8 keep their pairs together). One program a
    slice, each a single load of its values: a row's preparation is one memory latency, not two per row."""
    if PDL:  # the GEMV may start now (programmatic dependent launch): it waits for these results before reading
        tl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0", "=r", [], dtype=tl.int32,
                                  is_pure=False, pack=1)  # fmt: skip
    m, sl = tl.program_id(0), tl.program_id(1)
    x_ptr += m.to(tl.int64) * stride_xm
    j = sl * (SLICE // 2) + tl.arange(0, SLICE // 2)  # the slice's pairs
    low = tl.load(x_ptr + 2 * j + 1, mask=j < KB, other=0.0).to(tl.float32)
    high = tl.load(x_ptr + 2 * j, mask=j < KB, other=0.0).to(tl.float32)
    amax = tl.max(tl.maximum(tl.abs(low), tl.abs(high)), axis=0)
    biased = (amax.to(tl.int32, bitcast=True) >> 23) & 0xFF  # amax < 2^(biased - 126)
    biased = tl.where(biased == 0xFF, 127, biased)  # inf / nan: scale 1, let them through
    scale = ((253 - biased) << 23).to(tl.float32, bitcast=True)  # 2^(126 - biased)
    tl.store(inv_ptr + m * S + sl, ((biased + 1) << 23).to(tl.float32, bitcast=True))  # 2^(biased - 126)
    low, high = (low * scale).to(tl.float16), (high * scale).to(tl.float16)
    plane = (j % 4) * (KB // 4) + j // 4
    tl.store(out_ptr + m.to(tl.int64) * KB + plane, _pack(low, high), mask=j < KB)
    if SUMS:  # (SLICE is a multiple of GS, so a slice holds whole groups)
        pair = low.to(tl.float32) + high.to(tl.float32)
        g = sl * (SLICE // GS) + tl.arange(0, SLICE // GS)
        tl.store(sums_ptr + m.to(tl.int64) * G + g, tl.sum(tl.reshape(pair, (SLICE // GS, GS // 2)), 1),
                 mask=g < G)  # fmt: skip


@triton.jit
def _add2_ptx(a, b):
    """Float16 pairs a + b (the PTX path's group sums; the interpreter sums the unpacked lanes instead)."""
    return tl.inline_asm_elementwise("add.rn.f16x2 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.int32, is_pure=True,
                                     pack=1)  # fmt: skip


@triton.jit
def _dot_words(word, x0, x1, x2, x3, lo0, lo1, lo2, lo3, hi0, hi1, hi2, hi3, table, nib_ptr,
               PTX: tl.constexpr, SMEM: tl.constexpr, COPIES: tl.constexpr):  # fmt: skip
    """Each word's Σ table[code]·x as a float16 pair (int32 bits), arguments broadcast to one shape; the table in
    registers (lo*, hi*) or, with SMEM, in shared memory at `table` (`_shared_pair_table`)."""
    if PTX and SMEM and COPIES == 16:
        return tl.inline_asm_elementwise(_SHARED_DOT_16, "=r,r,r,r,r,r,r", [word, x0, x1, x2, x3, table],
                                         dtype=tl.int32, is_pure=True, pack=1)  # fmt: skip
    elif PTX and SMEM:
        return tl.inline_asm_elementwise(_SHARED_DOT_32, "=r,r,r,r,r,r,r", [word, x0, x1, x2, x3, table],
                                         dtype=tl.int32, is_pure=True, pack=1)  # fmt: skip
    elif PTX:
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
def _dot_rows_shared(word, x0, x1, x2, x3, table, COPIES: tl.constexpr):
    """`_dot_words` with SMEM for several rows of x, word (BN, W) and x planes (BM, W): each word's values are
    looked up once (`lut4_asm.shared_lookup_asm`) and multiplied with every row (`pair_products_asm`), the same
    numbers as `shared_dot_asm` per row and word; (BM, BN, W)."""
    if COPIES == 16:
        v0, v1, v2, v3 = tl.inline_asm_elementwise(_SHARED_LOOKUP_16, "=r,=r,=r,=r,r,r", [word, table],
                                                   dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True,
                                                   pack=1)  # fmt: skip
    else:
        v0, v1, v2, v3 = tl.inline_asm_elementwise(_SHARED_LOOKUP_32, "=r,=r,=r,=r,r,r", [word, table],
                                                   dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True,
                                                   pack=1)  # fmt: skip
    return tl.inline_asm_elementwise(_PAIR_PRODUCTS, "=r,r,r,r,r,r,r,r,r",
                                     [v0[None], v1[None], v2[None], v3[None], x0[:, None, :], x1[:, None, :],
                                      x2[:, None, :], x3[:, None, :]], dtype=tl.int32, is_pure=True, pack=1)  # fmt: skip


@triton.jit
def _shared_pair_table(pairs_ptr, COPIES: tl.constexpr):
    """Declares the shared byte table (`lut4_asm.shared_table_asm`), copies the 256 pair words at `pairs_ptr` into
    each of its COPIES copies, waits for the block, and returns its address. Column c of each chunk is
    written by lane c (a warp writes an entry's copies, one word per bank)."""
    if COPIES == 16:
        table = tl.inline_asm_elementwise(_SHARED_TABLE_16, "=r,r", [tl.program_id(0)], dtype=tl.int32,
                                          is_pure=False, pack=1)  # fmt: skip
    else:
        table = tl.inline_asm_elementwise(_SHARED_TABLE_32, "=r,r", [tl.program_id(0)], dtype=tl.int32,
                                          is_pure=False, pack=1)  # fmt: skip
    copy = tl.arange(0, COPIES)[None, :]
    for c in tl.static_range(0, 256, 32):
        e = c + tl.arange(0, 32)[:, None]
        # the load inside the asm: a Triton load would pick its own layout (rows to lanes: 32-way conflicts)
        tl.inline_asm_elementwise("{ .reg .b32 v; ld.global.nc.b32 v, [$1]; st.shared.b32 [$2], v; mov.b32 $0, 0; }",
                                  "=r,l,r", [pairs_ptr + e + 0 * copy, table + (e * COPIES + copy) * 4],
                                  dtype=tl.int32, is_pure=False, pack=1)  # fmt: skip
    tl.debug_barrier()
    return table


@triton.jit
def _lane_id(like, PTX: tl.constexpr):
    """The thread's lane in its warp (0 off the GPU), shaped like `like`."""
    if PTX:
        return tl.inline_asm_elementwise("mov.u32 $0, %laneid;", "=r,r", [like], dtype=tl.int32, is_pure=True, pack=1)
    else:
        return like * 0


@triton.jit
def _ldg(ptrs, PTX: tl.constexpr):
    """tl.load(ptrs) of uint8 (as int32) or float32, by inline PTX on the GPU. The compiler gives each load a
    layout of its own, chosen for coalescing: a step's scales then moved into the products' layout through
    shared memory, two block barriers a step for the codes and the scales (sm_90 SASS, Triton 3.6). The
    PTX load's result keeps the layout of its use."""
    if PTX and ptrs.dtype.element_ty == tl.uint8:
        return tl.inline_asm_elementwise("ld.global.nc.u8 $0, [$1];", "=r,l", [ptrs], dtype=tl.int32, is_pure=True,
                                         pack=1)  # fmt: skip
    elif PTX and ptrs.dtype.element_ty == tl.float32:
        return tl.inline_asm_elementwise("ld.global.nc.f32 $0, [$1];", "=f,l", [ptrs], dtype=tl.float32,
                                         is_pure=True, pack=1)  # fmt: skip
    else:  # (16-bit scales: the compiler's load)
        return tl.load(ptrs)


@triton.jit
def _group_scales(scale_ptr, ncode_ptr, nscale_ptr, offset_ptr, idx, ok, DOUBLE_QUANT: tl.constexpr,
                  NESTED_GS: tl.constexpr, PTX: tl.constexpr):  # fmt: skip
    """float32 scales of the groups at `idx` (`lut4_tile.load_scales`' values). Groups outside the weight read
    group 0 instead (their products are zero), so that no load needs a mask. The index is 32-bit: N·K/GS
    groups stay below 2^31 for any weight a GPU holds (N·K/2 packed bytes)."""
    idx = tl.where(ok, idx, 0).to(tl.int32)
    if DOUBLE_QUANT:
        code = _ldg(scale_ptr + idx, PTX)
        return _ldg(ncode_ptr + code, PTX) * _ldg(nscale_ptr + idx // NESTED_GS, PTX) + tl.load(offset_ptr)
    else:
        return _ldg(scale_ptr + idx, PTX).to(tl.float32)


@triton.jit
def _load_plane(x4_ptr, ms, rows, v, q: tl.constexpr, M, KW, BM: tl.constexpr, EVEN: tl.constexpr):
    """Pair q of words v of each row of x (`prepare_x` with ``words``: plane q of a row holds them in a run). One
    row of x is loaded in the word tile's (BN, BK/8) shape, each thread the pairs of its own words (L1 hits):
    loaded once as a (BK/8,) vector, it would be moved into the tile's layout through shared memory, with two
    block barriers per plane and step."""
    if BM == 1 and EVEN:
        return tl.load(x4_ptr + q * KW + v[None, :] + 0 * rows[:, None])
    elif BM == 1:
        return tl.load(x4_ptr + q * KW + v[None, :] + 0 * rows[:, None], mask=(v < KW)[None, :], other=0)
    else:
        return tl.load(x4_ptr + ms[:, None].to(tl.int64) * (4 * KW) + q * KW + v[None, :],
                       mask=(ms < M)[:, None] & (v < KW)[None, :], other=0)  # fmt: skip


@triton.jit
def _load_words(words, rows, k0, N, KW, BK: tl.constexpr, EVEN: tl.constexpr):
    """The packed words of step k0, (BN, BK/8), and their word indices v along the row."""
    v = tl.max_contiguous(tl.multiple_of(k0 // 8 + tl.arange(0, BK // 8), BK // 8), BK // 8)
    word_ptrs = words + rows[:, None].to(tl.int64) * KW + v[None, :]
    if EVEN:
        return tl.load(word_ptrs), v
    else:
        return tl.load(word_ptrs, mask=(rows < N)[:, None] & (v < KW)[None, :], other=0), v


@triton.jit
def _load_planes(x4_ptr, ms, rows, v, M, KW, BM: tl.constexpr, EVEN: tl.constexpr):
    """x's four planes of pairs for the words v: (BN or BM, BK/8) each."""
    q0 = _load_plane(x4_ptr, ms, rows, v, 0, M, KW, BM, EVEN)
    q1 = _load_plane(x4_ptr, ms, rows, v, 1, M, KW, BM, EVEN)
    q2 = _load_plane(x4_ptr, ms, rows, v, 2, M, KW, BM, EVEN)
    q3 = _load_plane(x4_ptr, ms, rows, v, 3, M, KW, BM, EVEN)
    return q0, q1, q2, q3


@triton.jit
def _wait_for_x(PDL: tl.constexpr):
    """With programmatic dependent launch the kernel starts while `_prepare_x_kernel` still runs: everything
    before this wait (the shared table, the first words) overlaps it; x is read only after it."""
    if PDL:
        tl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r", [], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _half2_kernel(x4_ptr, inv_ptr, sums_ptr, y_ptr, packed_ptr, words_ptr, pairs_ptr, nib_ptr, scale_ptr, zp_ptr,
                  ncode_ptr, nscale_ptr, offset_ptr, M, N, K, KW, G, S, stride_ym, center,
                  GS: tl.constexpr, HAS_ZP: tl.constexpr, DOUBLE_QUANT: tl.constexpr, NESTED_GS: tl.constexpr,
                  PTX: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                  STAGES: tl.constexpr, EVEN: tl.constexpr, SMEM: tl.constexpr, AHEAD: tl.constexpr,
                  PDL: tl.constexpr, COPIES: tl.constexpr, SLICE: tl.constexpr):  # fmt: skip
    """y[m, rows] for one block of BN output rows; x4 holds x's prepared pairs, four int32 per packed word.
    EVEN: K and N are multiples of every BK and BN, so the tiles load without masks. AHEAD: each step loads
    the next one's words and pairs before it computes (in registers), and the first step's loads are issued
    before the shared table is filled."""
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    ms = tl.arange(0, BM)
    # The table's registers, loaded once. Loaded as scalars they would sit in uniform registers, which a prmt
    # cannot read: ptxas then copies them into ordinary ones at every call (2 instructions a byte). Each lane
    # reads one of four copies of the table instead, so the values are per thread.
    # With SMEM the byte table sits in shared memory instead, a copy per lane (`lut4_asm.shared_dot_asm`).
    words = packed_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
    if AHEAD:
        word, v = _load_words(words, rows, 0, N, KW, BK, EVEN)
    table = _shared_pair_table(pairs_ptr, COPIES) if PTX and SMEM else 0
    _wait_for_x(PDL)
    if AHEAD:
        q0, q1, q2, q3 = _load_planes(x4_ptr, ms, rows, v, M, KW, BM, EVEN)
    t = words_ptr + 8 * (_lane_id(rows[:, None], PTX) & 3)  # (BN, 1)
    lo0, lo1, lo2, lo3 = tl.load(t), tl.load(t + 1), tl.load(t + 2), tl.load(t + 3)
    hi0, hi1, hi2, hi3 = tl.load(t + 4), tl.load(t + 5), tl.load(t + 6), tl.load(t + 7)
    acc = tl.zeros((BM, BN, BK // GS), dtype=tl.float32)
    for k0 in tl.range(0, K, BK, num_stages=STAGES, loop_unroll_factor=2 if AHEAD else 1):
        if AHEAD:
            cw, c0, c1, c2, c3 = word, q0, q1, q2, q3
            # after the last step it loads the last step again (in bounds, never used): no masks in the loop
            nxt = tl.minimum(k0 + BK, (K - 1) // BK * BK)
            word, v = _load_words(words, rows, nxt, N, KW, BK, EVEN)
            q0, q1, q2, q3 = _load_planes(x4_ptr, ms, rows, v, M, KW, BM, EVEN)
        else:
            cw, v = _load_words(words, rows, k0, N, KW, BK, EVEN)
            c0, c1, c2, c3 = _load_planes(x4_ptr, ms, rows, v, M, KW, BM, EVEN)
        if BM == 1:
            p = _dot_words(cw, c0, c1, c2, c3, lo0, lo1, lo2, lo3,
                           hi0, hi1, hi2, hi3, table, nib_ptr, PTX, SMEM, COPIES)  # (BN, BK/8) fmt: skip
            p = tl.reshape(p, (1, BN, BK // GS, GS // 8))
        elif PTX and SMEM:
            p = tl.reshape(_dot_rows_shared(cw, c0, c1, c2, c3, table, COPIES), (BM, BN, BK // GS, GS // 8))
        else:
            p = _dot_words(cw[None, :, :], c0[:, None, :], c1[:, None, :], c2[:, None, :], c3[:, None, :],
                           lo0[None], lo1[None], lo2[None], lo3[None], hi0[None], hi1[None], hi2[None], hi3[None],
                           table, nib_ptr, PTX, SMEM, COPIES)  # (BM, BN, BK/8) fmt: skip
            p = tl.reshape(p, (BM, BN, BK // GS, GS // 8))
        if PTX:
            lo, hi = _unpack(tl.reduce(p, 3, _add2_ptx))
        else:
            lo, hi = _unpack(p)
            lo, hi = tl.sum(lo, axis=3), tl.sum(hi, axis=3)
        idx, ok = pair_scale_index(rows, k0, N, K, G, BK, GS, 1)  # (BN, BK/GS); 1: SCALES_GROUPED
        s = _group_scales(scale_ptr, ncode_ptr, nscale_ptr, offset_ptr, idx, ok, DOUBLE_QUANT, NESTED_GS, PTX)
        dot = lo.to(tl.float32) + hi.to(tl.float32)  # (BM, BN, BK/GS)
        if HAS_ZP:
            z = tl.load(zp_ptr + idx, mask=ok, other=0).to(tl.float32)
            g = k0 // GS + tl.arange(0, BK // GS)
            sums = tl.load(sums_ptr + ms[:, None] * G + g[None, :], mask=(ms < M)[:, None] & (g < G)[None, :],
                           other=0.0)  # fmt: skip
            dot -= (z - center)[None, :, :] * sums[:, None, :]
        # x's 2^-e of each group's slice (rows past M and groups past K read a valid one: their products are 0)
        sl = tl.minimum((k0 + tl.arange(0, BK // GS) * GS) // SLICE, S - 1)
        xinv = _ldg(inv_ptr + tl.minimum(ms, M - 1)[:, None] * S + sl[None, :], PTX)  # (BM, BK/GS)
        acc += dot * s[None, :, :] * xinv[:, None, :]
    y = tl.sum(acc, axis=2)  # (BM, BN)
    tl.store(y_ptr + ms[:, None] * stride_ym + rows[None, :], y.to(y_ptr.dtype.element_ty),
             mask=(ms < M)[:, None] & (rows < N)[None, :])  # fmt: skip


SLICE = 1024  # columns of x sharing a power-of-two scale: a multiple of every group size (≤ 1024) and of 8
MAX_BN, MAX_BK = 32, 2048  # the largest tile of any launch (a launch with BK > K still works, masked)


def _configs() -> list[triton.Config]:
    """(BN, BK, warps[, STAGES]) launches for the autotuner (several rows of x, and one row off Hopper). With the
    byte table in shared memory (SMEM), the launches that won or came close at a Llama-3-8B shape, M = 1, in
    every sweep on an H100 and an H200 (bench/gemv_sweep.py, sessions 20–21); with the register table, small
    tiles for several rows of x, which the shared table's 32 KB a block does not favour. The autotuner
    decides per shape and batch."""
    shared = [(32, 512, 4, True, 32), (32, 1024, 16, True, 32), (32, 2048, 16, True, 32), (16, 1024, 8, True, 32),
              (8, 2048, 4, False, 32), (8, 1024, 4, True, 16), (16, 2048, 16, False, 16)]  # fmt: skip
    registers = [(4, 1024, 2, 3), (8, 512, 4, 3), (16, 256, 4, 3), (32, 256, 8, 3), (8, 512, 2, 3), (2, 1024, 1, 1)]
    return [triton.Config({"BN": bn, "BK": bk, "STAGES": 1, "SMEM": True, "AHEAD": ahead, "COPIES": copies},
                          num_warps=w, num_stages=1) for bn, bk, w, ahead, copies in shared] + [
        triton.Config({"BN": bn, "BK": bk, "STAGES": st, "SMEM": False, "AHEAD": False, "COPIES": 32}, num_warps=w,
                      num_stages=1) for bn, bk, w, st in registers]  # fmt: skip


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


_NIBBLES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def nibble_table(table: torch.Tensor, center: float = 0.0) -> torch.Tensor:
    """(16,) int32: the float16 bits of a format's table minus ``center``, what the kernel reads off the GPU."""
    key = (table.data_ptr(), center)
    hit = _NIBBLES.get(key)
    if hit is None:
        if table.is_cuda and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("the half2 GEMV builds its table outside a CUDA graph capture: call it once first")
        half = (table.detach().float() - center).to(torch.float16)
        if not torch.isfinite(half).all():
            raise ValueError("the format's table does not fit float16")
        if len(_NIBBLES) > 64:
            _NIBBLES.clear()
        hit = _NIBBLES[key] = (table, (half.view(torch.int16).to(torch.int32) & 0xFFFF).contiguous())
    return hit[1]


def _ptx(x: torch.Tensor) -> bool:
    """Compiled for an NVIDIA GPU, where the kernels' inline PTX runs (not Triton's interpreter)."""
    return x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1"


def _pdl(x: torch.Tensor) -> bool:
    """The GEMV starts while `prepare_x` runs (programmatic dependent launch: Hopper and later)."""
    return _ptx(x) and torch.cuda.get_device_capability(x.device)[0] >= 9


def prepare_x(x: torch.Tensor, group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (M, K), K divisible by 8 → (M, K/2) int32 float16 pairs of x, each SLICE columns of a row times their own
    2^e, in `_prepare_x_kernel`'s order; (M, ceil(K / SLICE)) float32 2^-e; and with a ``group_size`` the
    (M, ceil(K / group_size)) float32 sums of each group of those scaled values."""
    if x.shape[1] % 8:
        raise ValueError(f"the half2 GEMV's activations need K divisible by 8, got {x.shape[1]}")
    m, k = x.shape
    slices = -(-k // SLICE)
    x2 = torch.empty((m, k // 2), dtype=torch.int32, device=x.device)
    inv = torch.empty((m, slices), dtype=torch.float32, device=x.device)
    groups = -(-k // group_size) if group_size else 1
    sums = torch.empty((m, groups), dtype=torch.float32, device=x.device)
    _prepare_x_kernel[(m, slices)](x, x2, inv, sums, k, k // 2, groups, slices, x.stride(0), GS=group_size or 2,
                                   SUMS=group_size is not None, SLICE=SLICE, PDL=_pdl(x), num_warps=4)  # fmt: skip
    return x2, inv, sums


_WORDS: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _table_words(table: torch.Tensor, center: float) -> torch.Tensor:
    """The lookup's words for table - center on the table's device, read once per table: four copies of the eight
    `lut4_asm.table_words` (a copy per lane & 3, see the kernel), then the 256 `lut4_asm.pair_words`."""
    key = (table.data_ptr(), center)
    hit = _WORDS.get(key)
    if hit is None:
        if table.is_cuda and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("the half2 GEMV reads its table outside a CUDA graph capture: call it once first")
        bits = fp16_bits(table.detach().float() - center)
        if bits is None:
            raise ValueError("the format's table does not fit float16")
        words = table_words(bits) * 4 + pair_words(bits)
        words = torch.tensor([v - (1 << 32) if v >= 1 << 31 else v for v in words], dtype=torch.int32)
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
    if config is not None and config.get("SMEM") and config.get("STAGES", 1) > 1:
        # the 33 KB static table plus the pipeliner's buffers can pass the 48 KB a launch gets without opting in
        # (a CUDA "invalid argument"), and pipelined it ran 10-20 % slower than with loads ahead (s22e)
        raise ValueError("a shared-table launch (SMEM) runs unpipelined: STAGES=1 (AHEAD=True to load ahead)")
    x = x if x.stride(1) == 1 else x.contiguous()
    x4, inv, sums = prepare_x(x, gs if has_zp else None)
    m, k = x.shape
    y = torch.empty((m, w.out_features), dtype=x.dtype, device=x.device)
    center = _center(w.table) if has_zp else 0.0
    ptx, pdl = _ptx(x), _pdl(x)
    packed, _, *rest = pointers  # packed, table, scale, zero point, nested code, nested scale, offset
    words = _table_words(w.table, center)
    args = (x4, inv, sums, y, packed, words, words[32:], nibble_table(w.table, center), *rest)
    kw = dict(M=m, N=sizes["N"], K=k, KW=k // 8, G=sizes["G"], S=inv.shape[1], stride_ym=y.stride(0), center=center,
              GS=gs, HAS_ZP=has_zp, DOUBLE_QUANT=layout["DOUBLE_QUANT"], NESTED_GS=layout["NESTED_GS"], PTX=ptx,
              PDL=pdl, SLICE=SLICE, BM=triton.next_power_of_2(m),
              EVEN=k % MAX_BK == 0 and w.out_features % MAX_BN == 0)  # fmt: skip
    if config is None and m == 1 and ptx and torch.cuda.get_device_capability(x.device)[0] == 9:
        config = hopper_single_row_launch(w.out_features, k, gs)
    if config is None:
        kw |= {"launch_pdl": True} if pdl else {}
        launch_tuned(_half2_tuned, lambda meta: (triton.cdiv(w.out_features, meta["BN"]),), *args, **kw)
    else:
        config = {"STAGES": 1, "SMEM": False, "AHEAD": False, "COPIES": 32} | config
        kw["EVEN"] = kw["EVEN"] and k % config["BK"] == 0 and w.out_features % config["BN"] == 0
        kw |= {"launch_pdl": True} if pdl else {}
        _half2_kernel[(triton.cdiv(w.out_features, config["BN"]),)](*args, **kw, **config)
    return y


def hopper_single_row_launch(n: int, k: int, group_size: int) -> dict | None:
    """The launch for one row of x on Hopper, by the weight's aspect: the winner of every graph-replayed sweep
    on an H100 and an H200 (bench/gemv_sweep.py, sessions 20–21) for tall (N ≥ 2K), wide (K ≥ 2N) and square
    weights. The autotuner times one launch at a time after an L2 flush, and there it ranked launches that run
    14 % slower in a decoder's graph first (18.5 µs for 16.3 at 14336×4096; s22c, s22e). None (autotune) where
    the launch's steps would split a group."""
    if n >= 2 * k:
        launch = {"BN": 32, "BK": 512, "num_warps": 4, "SMEM": True, "AHEAD": True}
    elif k >= 2 * n:
        launch = {"BN": 8, "BK": 2048, "num_warps": 4, "SMEM": True}
    else:
        launch = {"BN": 32, "BK": 1024, "num_warps": 16, "SMEM": True, "AHEAD": True}
    return launch if launch["BK"] % group_size == 0 else None


_CENTERS: dict[int, tuple[torch.Tensor, float]] = {}


def _center(table: torch.Tensor) -> float:
    """The middle of a table's range (7.5 for int4's 0…15), read once per table (a host sync)."""
    hit = _CENTERS.get(table.data_ptr())
    if hit is None:
        if table.is_cuda and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("the half2 GEMV reads its table outside a CUDA graph capture: call it once first")
        hit = _CENTERS[table.data_ptr()] = (table, float(table.max() + table.min()) / 2)
    return hit[1]
