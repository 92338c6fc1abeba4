"""The 4-bit kernels' table lookups in PTX, for NVIDIA GPUs: a register-only 16-entry lookup (below), and
the half2 GEMV's word programs with the table in registers (`dot_asm`) or in shared memory
(`shared_dot_asm`, `shared_lookup_asm`, `pair_products_asm`; see their docstrings).

Triton has no shared-memory table and lowers a gather from a small table to a global (L1) load per
value or ~30 selects, which made the decode loop instruction-bound (bench/RESULTS.md). This lookup
keeps the table in eight 32-bit registers and decodes four packed bytes (eight values) with 28
integer instructions, mostly byte permutes (`prmt`):

- the table is rounded to float16 and split into its low bytes L[0..15] and high bytes H[0..15],
  four per register (L0 = L[0..3], L1 = L[4..7], ...);
- for four 3-bit indices packed as selector nibbles, `prmt(L0, L1, sel)` picks L[i] for i < 8 and
  `prmt(L2, L3, sel)` picks L[8 + i]; bit 3 of each code, replicated over its byte by prmt's sign
  mode, chooses between them (`lop3` as a bitwise select); the same for H;
- two more permutes interleave low and high bytes into float16 pairs.

`tl.inline_asm_elementwise(..., pack=4)` hands the asm four packed bytes in one register and takes
two float16 pairs back per output: `hi` (the high nibbles, even columns) and `lo` (the low nibbles,
odd columns), element-wise per byte, exactly what `lut4_tile.decode_pair_values` computes with the
float32 table. The float16 rounding of the table (≤ 2⁻¹² relative) is below the rounding of 16-bit
activations, so the kernels use this path only for float16/bfloat16 inputs.

The program is a pure function of the 16 table values; tests/kernels/test_lut4_asm.py runs it
through a small interpreter of these PTX instructions against the table lookup on the CPU.
"""

from __future__ import annotations

import os

import torch

def _word(bytes4: list[int]) -> int:
    return bytes4[0] | bytes4[1] << 8 | bytes4[2] << 16 | bytes4[3] << 24


def _lookup(out0: str, out1: str, sel: str, mask: str, lo: list[str], hi: list[str]) -> list[str]:
    """Four float16 values into out0/out1 (two per register) for the 3-bit selectors in `sel`, from the table's
    low bytes in registers `lo` and high bytes in `hi` (four of each)."""
    return [
        f"prmt.b32 a, {lo[0]}, {lo[1]}, {sel};", f"prmt.b32 b, {lo[2]}, {lo[3]}, {sel};",
        f"lop3.b32 lob, a, b, {mask}, 0xD8;",
        f"prmt.b32 a, {hi[0]}, {hi[1]}, {sel};", f"prmt.b32 b, {hi[2]}, {hi[3]}, {sel};",
        f"lop3.b32 hib, a, b, {mask}, 0xD8;",
        f"prmt.b32 {out0}, lob, hib, 0x5140;", f"prmt.b32 {out1}, lob, hib, 0x7362;",
    ]  # fmt: skip


def _selectors(word: str, high: bool) -> list[str]:
    """`sel` ← the low 3 bits of each byte's high (or low) nibble as selector nibbles 0..3; `m` ← 0xFF in each
    byte whose nibble has bit 3 set (prmt's sign mode replicates bit 7 of a byte)."""
    if high:
        return [f"shr.b32 t, {word}, 4;", "and.b32 t, t, 0x07070707;", "shr.b32 s, t, 4;", "or.b32 s, s, t;",
                "prmt.b32 sel, s, 0, 0x0020;", f"prmt.b32 m, {word}, 0, 0xBA98;"]  # fmt: skip
    return [f"and.b32 t, {word}, 0x07070707;", "shr.b32 s, t, 4;", "or.b32 s, s, t;", "prmt.b32 sel, s, 0, 0x0020;",
            f"shl.b32 q, {word}, 4;", "prmt.b32 m, q, 0, 0xBA98;"]  # fmt: skip


def table_words(table_fp16_bits: list[int]) -> list[int]:
    """The eight 32-bit registers of the lookup: low bytes of entries 0-3, 4-7, 8-11, 12-15, then high bytes."""
    if len(table_fp16_bits) != 16 or not all(0 <= v < 1 << 16 for v in table_fp16_bits):
        raise ValueError("the lookup takes 16 float16 bit patterns")
    low = [v & 0xFF for v in table_fp16_bits]
    high = [v >> 8 for v in table_fp16_bits]
    return [_word(low[4 * i : 4 * i + 4]) for i in range(4)] + [_word(high[4 * i : 4 * i + 4]) for i in range(4)]


def lookup_asm(table_fp16_bits: list[int]) -> str:
    """The PTX program for a table of 16 float16 bit patterns (see the module docstring)."""
    words = table_words(table_fp16_bits)
    lo, hi = ["l0", "l1", "l2", "l3"], ["h0", "h1", "h2", "h3"]
    consts = [f"mov.b32 {r}, {v:#010x};" for r, v in zip(lo + hi, words)]
    lines = ["{", ".reg .b32 t, s, sel, m, q, a, b, lob, hib, l0, l1, l2, l3, h0, h1, h2, h3;", *consts]
    lines += _selectors("$4", high=True) + _lookup("$0", "$1", "sel", "m", lo, hi)
    lines += _selectors("$4", high=False) + _lookup("$2", "$3", "sel", "m", lo, hi)
    return "\n".join(lines + ["}"])


def dot_asm() -> str:
    """PTX for one packed word (four bytes, eight 4-bit codes) times its eight activations, in float16 pairs:
    $0 = a float16 pair whose lanes add up to Σ table[code]·x over the word (the odd columns 1, 3, 5, 7 in the
    low lane, the even ones in the high lane), from $1 the word, $2..$5 the activations as pairs
    (x1, x0), (x3, x2), (x5, x4), (x7, x6) of the word's columns (`lut4_gemv_half2.prepare_x`
    orders them so), and $6..$13 the table's `table_words`.

    Unlike `lookup_asm` it looks up a byte's two codes side by side: the word's low 3 bits of all eight
    codes, ANDed out at once, are the selectors of bytes 0-1 (prmt reads a selector's low 16 bits) and, shifted,
    of bytes 2-3; two sign-mode permutes gather the codes' bit 3. Five instructions prepare a word instead of
    twelve, and the values come out as (table[low nibble], table[high nibble]) pairs, the operands of the half2
    products. The table arrives in registers the kernel loaded once: embedded as immediates, ptxas
    rematerialises them at every call (two instructions a byte). 25 integer instructions and four half2
    multiply-adds for eight values."""
    lo, hi = ["$6", "$7", "$8", "$9"], ["$10", "$11", "$12", "$13"]
    lines = ["{", ".reg .b32 t, sb, q, ma, mb, a, b, lob, hib, v0, v1, v2, v3, acc;",
             "and.b32 t, $1, 0x77777777;",  # selectors of (low, high) nibble of byte 0, then byte 1
             "shr.b32 sb, t, 16;",  # ... of bytes 2 and 3
             "shl.b32 q, $1, 4;",  # bit 3 of each low nibble at bit 7 of its byte; the high nibbles' is there
             "prmt.b32 ma, q, $1, 0xD9C8;",  # 0xFF where the code has bit 3: low 0, high 0, low 1, high 1
             "prmt.b32 mb, q, $1, 0xFBEA;"]  # ... bytes 2 and 3 fmt: skip
    lines += _lookup("v0", "v1", "t", "ma", lo, hi) + _lookup("v2", "v3", "sb", "mb", lo, hi)
    lines += ["mul.rn.f16x2 acc, v0, $2;", "fma.rn.f16x2 acc, v1, $3, acc;", "fma.rn.f16x2 acc, v2, $4, acc;",
              "fma.rn.f16x2 $0, v3, $5, acc;"]  # fmt: skip
    return "\n".join(lines + ["}"])


SHARED_TABLE = "lowbit_pair_table"  # the shared-memory array that `shared_table_asm` declares in a kernel
TABLE_COPIES = (32, 16)  # copies of the pair table a block may hold: 32 never conflict; 16 halve the fill


def pair_words(table_fp16_bits: list[int]) -> list[int]:
    """The 256 words of the byte table: for byte b, table[b & 15] in the low half and table[b >> 4] in the high
    half, the lanes in which `dot_asm` meets a byte's two codes."""
    if len(table_fp16_bits) != 16 or not all(0 <= v < 1 << 16 for v in table_fp16_bits):
        raise ValueError("the lookup takes 16 float16 bit patterns")
    return [table_fp16_bits[b & 15] | table_fp16_bits[b >> 4] << 16 for b in range(256)]


def shared_table_asm(copies: int = 32) -> str:
    """PTX declaring the kernel's byte table in shared memory, `copies` copies interleaved by word (entry e of
    copy c at word copies·e + c; lane l reads copy l mod copies), and $0 ← its address. With 32 copies each
    lane reads its own bank and no load conflicts; with 16, lanes l and l + 16 share a bank (at most two-way
    conflicts) for half the shared memory and fill. Emitted once, at function scope (no braces), so that
    the programs after it see the name."""
    if copies not in TABLE_COPIES:
        raise ValueError(f"the shared table holds one of {TABLE_COPIES} copies, got {copies}")
    return f".shared .align 16 .b32 {SHARED_TABLE}[{256 * copies}];\nmov.u32 $0, {SHARED_TABLE};"


def _shared_loads(word: str, table: str, copies: int) -> list[str]:
    """v0..v3 ← the pair words of the four bytes of `word` from the lane's copy of the shared table at `table`:
    byte q moved to bits s..s+7 (4·copies = 2^s bytes a table entry), the lane's copy's offset or-ed in."""
    s = copies.bit_length() + 1  # log2(4 · copies)
    lines = ["mov.u32 lane, %laneid;"] + ([f"and.b32 lane, lane, {copies - 1};"] if copies < 32 else [])
    lines += ["shl.b32 lane, lane, 2;"]
    for q in range(4):
        shift = f"shl.b32 a{q}, {word}, {s - 8 * q};" if 8 * q < s else f"shr.b32 a{q}, {word}, {8 * q - s};"
        lines += [shift, f"and.b32 a{q}, a{q}, {0xFF << s:#x};", f"or.b32 a{q}, a{q}, lane;",
                  f"add.u32 a{q}, a{q}, {table};", f"ld.shared.b32 v{q}, [a{q}];"]  # (and+or: one lop3)
    return lines


_PRODUCTS = ["mul.rn.f16x2 acc, v0, {0};", "fma.rn.f16x2 acc, v1, {1}, acc;", "fma.rn.f16x2 acc, v2, {2}, acc;",
             "fma.rn.f16x2 {out}, v3, {3}, acc;"]  # fmt: skip


def shared_dot_asm(copies: int = 32) -> str:
    """`dot_asm` with the byte table in shared memory instead of registers (`shared_table_asm` with `copies`):
    $0 = the float16 pair Σ table[code]·x over word $1 with the activation pairs $2..$5, $6 = the table's
    address.

    Each byte is one load of its two values from the thread's copy of the table, two integer instructions to
    form the address and one half2 multiply-add: four instructions a byte against `dot_asm`'s eight. The
    lane is read here, not passed in: a value computed per element may move to another thread when the
    compiler changes the tensor's layout, and the lane is a property of the thread (ptxas reads it once)."""
    lines = ["{", ".reg .b32 lane, a0, a1, a2, a3, v0, v1, v2, v3, acc;", *_shared_loads("$1", "$6", copies)]
    lines += [line.format("$2", "$3", "$4", "$5", out="$0") for line in _PRODUCTS]
    return "\n".join(lines + ["}"])


def shared_lookup_asm(copies: int = 32) -> str:
    """The table half of `shared_dot_asm`: $0..$3 = the pair words of bytes 0..3 of word $4 (table at $5), for
    several rows of x to share (`pair_products_asm`)."""
    lines = ["{", ".reg .b32 lane, a0, a1, a2, a3, v0, v1, v2, v3;", *_shared_loads("$4", "$5", copies)]
    return "\n".join(lines + ["mov.b32 $0, v0;", "mov.b32 $1, v1;", "mov.b32 $2, v2;", "mov.b32 $3, v3;", "}"])


def pair_products_asm() -> str:
    """The product half of `shared_dot_asm`: $0 = Σ_q $(1+q)·$(5+q) in float16 pairs, in `shared_dot_asm`'s
    order (so the two halves give its result bit for bit), from `shared_lookup_asm`'s values and a word's
    activation pairs."""
    lines = ["{", ".reg .b32 v0, v1, v2, v3, acc;", "mov.b32 v0, $1;", "mov.b32 v1, $2;", "mov.b32 v2, $3;",
             "mov.b32 v3, $4;"]  # fmt: skip
    lines += [line.format("$5", "$6", "$7", "$8", out="$0") for line in _PRODUCTS]
    return "\n".join(lines + ["}"])


def fp16_bits(table: torch.Tensor) -> list[int] | None:
    """The table's float16 bit patterns, or None where a value does not fit float16."""
    half = table.detach().to("cpu", torch.float32).to(torch.float16)
    if not torch.isfinite(half).all():
        return None
    return [int(v) & 0xFFFF for v in half.view(torch.int16).tolist()]


_CACHE: dict[int, tuple[torch.Tensor, str]] = {}  # table data_ptr → (the table, kept alive; its program)


def table_asm(table: torch.Tensor, dtype: torch.dtype) -> str:
    """The lookup program for `table` when a kernel with `dtype` inputs may use it, else "".

    Used on CUDA for float16/bfloat16 only (not under the Triton interpreter, which has no PTX).
    Tables are few and long-lived (`lut4._device_table`), so their programs are cached by address;
    reading a new table syncs once, which a CUDA-graph capture forbids, so then the kernel keeps the
    memory-table path.
    """
    if dtype not in (torch.float16, torch.bfloat16) or table.device.type != "cuda":
        return ""
    if os.environ.get("TRITON_INTERPRET") == "1" or os.environ.get("LOWBIT_NO_PTX_LUT") == "1":
        return ""
    hit = _CACHE.get(table.data_ptr())  # the cache holds the table, so its address is not reused
    if hit is not None:
        return hit[1]
    if torch.cuda.is_current_stream_capturing():
        return ""
    bits = fp16_bits(table)
    asm = "" if bits is None else lookup_asm(bits)
    if len(_CACHE) > 64:
        _CACHE.clear()
    _CACHE[table.data_ptr()] = (table, asm)
    return asm
