"""Triton device functions that read a tile of a LUT4 weight (see `lut4.py`) into registers.

Shared by the GEMV, the GEMM and the dequantize kernels, so every kernel decodes the format with the
same code. Two ways to read a (BN, BK) tile of W:

- paired (`PAIRED=True`, the fast path): each packed byte is loaded once, 16 bytes per thread, and
  split into its high (column 2j) and low (column 2j + 1) nibble; the two halves are interleaved back
  with `tl.join`. Scales are loaded once per group, (BN, BK / GS), and broadcast over the group's
  GS / 2 bytes by a reshape. It needs K even (a row starts on a byte) and a scale index that
  separates into row and column (grouped scales, or flat blocks with K % GS == 0, which the host
  turns into grouped ones) with GS a power of two, or one scale per row.
- generic (`PAIRED=False`): one element at a time from its flat index; any N, K, group size and
  flat blocks that span rows. Slower (each byte read twice, one scale load per element), correct
  everywhere.

Scale modes (`SCALES`): 0 = flat blocks of the flattened tensor, 1 = groups along rows (G per row),
2 = one scale per row.
"""

from __future__ import annotations

import triton
import triton.language as tl

from lowbit.formats.blockwise import NESTED_BLOCK_SIZE
from lowbit.kernels.lut4_asm import table_asm

SCALES_FLAT, SCALES_GROUPED, SCALES_ROW = 0, 1, 2


@triton.jit
def load_scale_parts(scale_ptr, nested_scale_ptr, idx, mask, DOUBLE_QUANT: tl.constexpr, NESTED_GS: tl.constexpr):
    """The global loads behind `load_scales`, as loaded (no conversion, so nothing waits for them yet):
    (codes, nested scales) with double quantization, else (scales, scales)."""
    if DOUBLE_QUANT:
        raw = tl.load(scale_ptr + idx, mask=mask, other=0)
        nested = tl.load(nested_scale_ptr + idx // NESTED_GS, mask=mask, other=0.0)
    else:
        raw = tl.load(scale_ptr + idx, mask=mask, other=0.0)
        nested = raw
    return raw, nested


@triton.jit
def finish_scales(raw, nested, nested_code_ptr, offset_ptr, DOUBLE_QUANT: tl.constexpr):
    """`load_scale_parts`' values → float32 scales, undoing double quantization (QLoRA §3, DQ)."""
    if DOUBLE_QUANT:
        s = tl.load(nested_code_ptr + raw.to(tl.int32)) * nested + tl.load(offset_ptr)
    else:
        s = raw.to(tl.float32)
    return s


@triton.jit
def load_scales(scale_ptr, nested_code_ptr, nested_scale_ptr, offset_ptr, idx, mask,
                DOUBLE_QUANT: tl.constexpr, NESTED_GS: tl.constexpr):  # fmt: skip
    """float32 scales at group indices `idx`."""
    raw, nested = load_scale_parts(scale_ptr, nested_scale_ptr, idx, mask, DOUBLE_QUANT, NESTED_GS)
    return finish_scales(raw, nested, nested_code_ptr, offset_ptr, DOUBLE_QUANT)


@triton.jit
def load_pair_bytes(packed_ptr, rows, k0, N, KB, BN: tl.constexpr, BK: tl.constexpr):
    """Paired path: the (BN, BK/2) packed bytes of W[rows, k0 : k0 + BK] (zero past the end of a row)."""
    j = tl.arange(0, BK // 2)  # byte within the tile row
    # k0 is a multiple of BK, so the bytes of a tile row are contiguous and aligned: tell the compiler,
    # which then issues 16-byte loads (KB = K / 2 is the row stride in bytes). The column mask is
    # written on bytes too (byte < KB ⟺ both columns < K, K even): a mask on 2j would hide the
    # contiguity and split the load into single bytes.
    col = tl.max_contiguous(tl.multiple_of(k0 // 2 + j, BK // 2), BK // 2)
    byte = rows[:, None].to(tl.int64) * KB + col[None, :]  # (BN, BK/2)
    return tl.load(packed_ptr + byte, mask=(rows < N)[:, None] & (col < KB)[None, :], other=0)


@triton.jit
def decode_pair_values(b, table_ptr, LUT_ASM: tl.constexpr):
    """Packed bytes → (hi, lo) = (table[high nibble], table[low nibble]): columns 2j and 2j + 1.

    With a PTX program (`lut4_asm`, CUDA, 16-bit inputs) the table lives in registers; otherwise each
    value is a load from the 16 float32 in memory.
    """
    if LUT_ASM != "":  # (an `if` takes a bool, not the string itself)
        # out: hi values 0-1, 2-3 and lo values 0-1, 2-3 as float16 pairs; in: four packed bytes
        hi, lo = tl.inline_asm_elementwise(LUT_ASM, "=r,=r,=r,=r,r", [b], dtype=(tl.float16, tl.float16),
                                           is_pure=True, pack=4)  # fmt: skip
        return hi.to(tl.float32), lo.to(tl.float32)
    else:
        b = b.to(tl.int32)
        return tl.load(table_ptr + (b >> 4)), tl.load(table_ptr + (b & 15))


@triton.jit
def load_pair_values(packed_ptr, table_ptr, rows, k0, N, KB, BN: tl.constexpr, BK: tl.constexpr,
                     LUT_ASM: tl.constexpr):  # fmt: skip
    """Paired path, unscaled: (hi, lo) = table[code], each (BN, BK/2), columns k0 + 2j and k0 + 2j + 1."""
    return decode_pair_values(load_pair_bytes(packed_ptr, rows, k0, N, KB, BN, BK), table_ptr, LUT_ASM)


@triton.jit
def pair_scale_index(rows, k0, N, K, G, BK: tl.constexpr, GS: tl.constexpr, SCALES: tl.constexpr):
    """(index, mask) of a paired tile's scales: (BN,) when one per tile row, else (BN, BK/GS).

    (Each branch tests one constexpr: Triton compiles `A or B` of constexprs as a run-time branch.)
    """
    row_ok = rows < N
    if SCALES == 2:  # one scale per row
        idx, ok = rows.to(tl.int64), row_ok
    elif GS > BK:  # GS a multiple of BK: the tile lies inside one group of each row
        idx, ok = rows.to(tl.int64) * G + k0 // GS, row_ok
    else:  # groups of GS along the row, G per row, BK / GS of them in the tile
        g = tl.arange(0, BK // GS)
        ok = row_ok[:, None] & ((k0 + g * GS) < K)[None, :]
        idx = rows[:, None].to(tl.int64) * G + (k0 // GS + g)[None, :]  # (BN, BK/GS)
    return idx, ok


@triton.jit
def load_pair_scales(scale_ptr, zp_ptr, ncode_ptr, nscale_ptr, offset_ptr, rows, k0, N, K, G,
                     BK: tl.constexpr, GS: tl.constexpr, SCALES: tl.constexpr, HAS_ZP: tl.constexpr,
                     DOUBLE_QUANT: tl.constexpr, NESTED_GS: tl.constexpr):  # fmt: skip
    """Scales (and zero points) of a paired tile, shaped as `pair_scale_index`."""
    idx, ok = pair_scale_index(rows, k0, N, K, G, BK, GS, SCALES)
    s = load_scales(scale_ptr, ncode_ptr, nscale_ptr, offset_ptr, idx, ok, DOUBLE_QUANT, NESTED_GS)
    z = s  # unused without zero points
    if HAS_ZP:
        z = tl.load(zp_ptr + idx, mask=ok, other=0).to(tl.float32)
    return s, z


@triton.jit
def _scale_rows(v, s, z, HAS_ZP: tl.constexpr):
    if HAS_ZP:
        v = v - z[:, None]
    return v * s[:, None]


@triton.jit
def scale_pairs(v, s, z, BN: tl.constexpr, BK: tl.constexpr, GS: tl.constexpr, SCALES: tl.constexpr,
                HAS_ZP: tl.constexpr):  # fmt: skip
    """(BN, BK/2) values of a paired tile → (v - z) · s, each byte with its own group's scale."""
    if SCALES == 2:
        return _scale_rows(v, s, z, HAS_ZP)
    elif GS > BK:
        return _scale_rows(v, s, z, HAS_ZP)
    else:
        v3 = tl.reshape(v, (BN, BK // GS, GS // 2))  # a group's GS/2 bytes along the last axis
        if HAS_ZP:
            v3 = v3 - z[:, :, None]
        return tl.reshape(v3 * s[:, :, None], (BN, BK // 2))


@triton.jit
def load_lut4_pairs(packed_ptr, table_ptr, scale_ptr, zp_ptr, ncode_ptr, nscale_ptr, offset_ptr,
                    rows, k0, N, K, KB, G,
                    BN: tl.constexpr, BK: tl.constexpr, GS: tl.constexpr, SCALES: tl.constexpr,
                    HAS_ZP: tl.constexpr, DOUBLE_QUANT: tl.constexpr, NESTED_GS: tl.constexpr,
                    LUT_ASM: tl.constexpr):  # fmt: skip
    """Paired path: (hi, lo), each (BN, BK/2) float32, the columns k0 + 2j and k0 + 2j + 1 of W[rows]."""
    hi, lo = load_pair_values(packed_ptr, table_ptr, rows, k0, N, KB, BN, BK, LUT_ASM)
    s, z = load_pair_scales(scale_ptr, zp_ptr, ncode_ptr, nscale_ptr, offset_ptr, rows, k0, N, K, G,
                            BK, GS, SCALES, HAS_ZP, DOUBLE_QUANT, NESTED_GS)  # fmt: skip
    return scale_pairs(hi, s, z, BN, BK, GS, SCALES, HAS_ZP), scale_pairs(lo, s, z, BN, BK, GS, SCALES, HAS_ZP)


@triton.jit
def _tile_generic(packed_ptr, table_ptr, scale_ptr, zp_ptr, ncode_ptr, nscale_ptr, offset_ptr,
                  rows, k0, N, K, G,
                  BN: tl.constexpr, BK: tl.constexpr, GS: tl.constexpr, SCALES: tl.constexpr,
                  HAS_ZP: tl.constexpr, DOUBLE_QUANT: tl.constexpr, NESTED_GS: tl.constexpr):  # fmt: skip
    cols = k0 + tl.arange(0, BK)
    mask = (rows < N)[:, None] & (cols < K)[None, :]
    e = rows[:, None].to(tl.int64) * K + cols[None, :]  # flat element index, (BN, BK)
    b = tl.load(packed_ptr + e // 2, mask=mask, other=0).to(tl.int32)
    code = (b >> (4 - 4 * (e % 2)).to(tl.int32)) & 15  # even index: high nibble
    v = tl.load(table_ptr + code)
    if SCALES == 0:
        idx = e // GS
    elif SCALES == 1:
        idx = rows[:, None].to(tl.int64) * G + (cols // GS)[None, :]
    else:
        idx = rows[:, None].to(tl.int64) + 0 * cols[None, :]
    if HAS_ZP:
        v = v - tl.load(zp_ptr + idx, mask=mask, other=0).to(tl.float32)
    v = v * load_scales(scale_ptr, ncode_ptr, nscale_ptr, offset_ptr, idx, mask, DOUBLE_QUANT, NESTED_GS)
    return tl.where(mask, v, 0.0)


@triton.jit
def load_lut4_tile(packed_ptr, table_ptr, scale_ptr, zp_ptr, ncode_ptr, nscale_ptr, offset_ptr,
                   rows, k0, N, K, KB, G,
                   BN: tl.constexpr, BK: tl.constexpr, GS: tl.constexpr, SCALES: tl.constexpr,
                   PAIRED: tl.constexpr, HAS_ZP: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
                   NESTED_GS: tl.constexpr, LUT_ASM: tl.constexpr):  # fmt: skip
    """(BN, BK) float32 tile W[rows, k0 : k0 + BK]; finite everywhere, zero outside K on the generic path.

    Out-of-range columns of the paired path hold finite junk (code 0 times a masked scale): callers
    mask the activation they multiply it with, so it never reaches an output.
    """
    if PAIRED:
        hi, lo = load_lut4_pairs(packed_ptr, table_ptr, scale_ptr, zp_ptr, ncode_ptr, nscale_ptr, offset_ptr,
                                 rows, k0, N, K, KB, G, BN, BK, GS, SCALES, HAS_ZP, DOUBLE_QUANT,
                                 NESTED_GS, LUT_ASM)  # fmt: skip
        return tl.reshape(tl.join(hi, lo), (BN, BK))  # (BN, BK/2, 2) → (BN, BK), columns interleaved
    return _tile_generic(packed_ptr, table_ptr, scale_ptr, zp_ptr, ncode_ptr, nscale_ptr, offset_ptr,
                         rows, k0, N, K, G, BN, BK, GS, SCALES, HAS_ZP, DOUBLE_QUANT, NESTED_GS)  # fmt: skip


def kernel_args(w, dtype=None) -> tuple[list, dict, dict]:
    """Host side of `load_lut4_tile`: (pointer arguments, runtime sizes, constexpr layout) of a `Lut4Weight`.

    `dtype`, the kernel's input or output dtype, enables the register lookup (`lut4_asm`) where it applies.

    Flat blocks that never span two rows (K % group_size == 0) are re-indexed as groups along rows
    (same scale index, n·K/GS + k/GS), which is what lets the paired fast path read them as tiles.
    """
    n, k, gs = w.out_features, w.in_features, w.group_size
    if w.flat and k % gs == 0:
        scales, groups_per_row = SCALES_GROUPED, k // gs
    elif w.flat:
        scales, groups_per_row = SCALES_FLAT, 0
    elif gs >= k:
        scales, groups_per_row, gs = SCALES_ROW, 1, 1
    else:
        scales, groups_per_row = SCALES_GROUPED, -(-k // gs)
    power_of_two = gs >= 2 and gs & (gs - 1) == 0
    paired = k % 2 == 0 and (scales == SCALES_ROW or (scales == SCALES_GROUPED and power_of_two))
    dummy = w.table  # never read: the constexpr flags below switch its loads off
    pointers = [
        w.packed, w.table, w.scale,
        w.zero_point if w.zero_point is not None else dummy,
        w.nested_code if w.double_quant else dummy,
        w.nested_scale if w.double_quant else dummy,
        w.offset if w.double_quant else dummy,
    ]  # fmt: skip
    sizes = {"N": n, "K": k, "KB": k // 2, "G": groups_per_row}
    layout = {"GS": gs, "SCALES": scales, "PAIRED": paired, "HAS_ZP": w.zero_point is not None,
              "DOUBLE_QUANT": w.double_quant, "NESTED_GS": NESTED_BLOCK_SIZE,
              "LUT_ASM": table_asm(w.table, dtype) if paired and dtype is not None else ""}  # fmt: skip
    return pointers, sizes, layout
