"""The PTX table lookup (`lut4_asm`) run through a small interpreter of its instructions on the CPU.

The interpreter follows the PTX ISA's definitions of mov/shr/shl/and/or, `prmt.b32` (default mode:
selector nibble k picks byte k of the result from the eight bytes {b, a}; with its bit 3 set, the
picked byte's sign bit is replicated) and `lop3.b32` (bit i of the result is bit (a·4 + b·2 + c) of
the immediate). The reference is the float32 table of `lut4.py` rounded to float16, indexed by the
high and low nibble of each byte. On the GPU the kernels' tests check the compiled program.
"""

import random

import numpy as np
import pytest
import torch

from lowbit.kernels.lut4 import _device_table
from lowbit.kernels.lut4_asm import (
    TABLE_COPIES,
    dot_asm,
    fp16_bits,
    lookup_asm,
    pair_products_asm,
    pair_words,
    shared_dot_asm,
    shared_lookup_asm,
    shared_table_asm,
    table_asm,
    table_words,
)

MASK32 = 0xFFFFFFFF


def _prmt(a: int, b: int, c: int) -> int:
    src = b << 32 | a
    out = 0
    for k in range(4):
        sel = (c >> 4 * k) & 0xF
        byte = (src >> 8 * (sel & 7)) & 0xFF
        if sel & 8:
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << 8 * k
    return out


def _lop3(a: int, b: int, c: int, lut: int) -> int:
    out = 0
    for i in range(32):
        idx = ((a >> i) & 1) << 2 | ((b >> i) & 1) << 1 | ((c >> i) & 1)
        out |= ((lut >> idx) & 1) << i
    return out


def _halves(v: int) -> np.ndarray:
    return np.array([v & 0xFFFF, v >> 16], dtype=np.uint16).view(np.float16)


def _pair(h: np.ndarray) -> int:
    bits = h.astype(np.float16).view(np.uint16)
    return int(bits[0]) | int(bits[1]) << 16


def run_ptx(asm: str, word: int, inputs: dict | None = None, outputs: int = 4, shared: dict | None = None,
            lane: int = 0) -> list[int]:
    """Execute the program with $4 = word (or the registers in `inputs`); return $0..$(outputs - 1). The
    float16-pair instructions round per lane as IEEE float16 does (numpy; a product of two float16 values is
    exact in float64, so fma rounds once). `shared` maps shared-memory byte addresses to the words stored
    there (a load elsewhere, or not 4-byte aligned, fails); %laneid reads `lane`."""
    regs = (inputs or {"$4": word}) | {"%laneid": lane}

    def val(tok: str) -> int:
        return regs[tok] if tok in regs else int(tok, 0)

    for line in asm.splitlines():
        line = line.strip()
        if line in ("{", "}") or line.startswith(".reg"):
            continue
        op, rest = line.rstrip(";").split(None, 1)
        d, *src = [t.strip() for t in rest.split(",")]
        if op == "ld.shared.b32":
            address = regs[src[0].strip("[]")]
            assert address % 4 == 0 and address in shared, f"shared load from {address:#x}: {line}"
            regs[d] = shared[address]
            continue
        v = [val(t) for t in src]
        if op in ("mov.b32", "mov.u32"):
            r = v[0]
        elif op == "add.u32":
            r = v[0] + v[1]
        elif op == "shr.b32":
            r = v[0] >> v[1]
        elif op == "shl.b32":
            r = v[0] << v[1]
        elif op == "and.b32":
            r = v[0] & v[1]
        elif op == "or.b32":
            r = v[0] | v[1]
        elif op == "prmt.b32":
            r = _prmt(*v)
        elif op == "lop3.b32":
            r = _lop3(*v)
        elif op == "mul.rn.f16x2":
            r = _pair(_halves(v[0]).astype(np.float64) * _halves(v[1]))
        elif op == "fma.rn.f16x2":
            r = _pair(_halves(v[0]).astype(np.float64) * _halves(v[1]) + _halves(v[2]))
        else:
            raise AssertionError(f"instruction outside the interpreter: {line}")
        regs[d] = r & MASK32
    return [regs[f"${i}"] for i in range(outputs)]


def _expected(bits: list[int], word: int) -> list[int]:
    b = [(word >> 8 * k) & 0xFF for k in range(4)]
    hi, lo = [bits[x >> 4] for x in b], [bits[x & 15] for x in b]
    return [hi[0] | hi[1] << 16, hi[2] | hi[3] << 16, lo[0] | lo[1] << 16, lo[2] | lo[3] << 16]


@pytest.mark.parametrize("kind", ["nf4", "fp4", "e2m1", "int4_sym", "int4_affine"])
def test_ptx_lookup_matches_the_table_for_every_byte(kind):
    table = _device_table(kind, torch.device("cpu"))
    bits = fp16_bits(table)
    assert bits is not None
    asm = lookup_asm(bits)
    rng = random.Random(0)
    words = [rng.getrandbits(32) for _ in range(64)]
    for byte in range(256):  # every byte value in every position of the register
        words += [byte << 8 * k | rng.getrandbits(32) & ~(0xFF << 8 * k) for k in range(4)]
    for word in words:
        assert run_ptx(asm, word) == _expected(bits, word), f"{kind}: word {word:#010x}"


def test_table_rounding_to_float16_is_within_its_half_ulp():
    table = _device_table("nf4", torch.device("cpu"))
    half = torch.tensor(fp16_bits(table), dtype=torch.int32).to(torch.int16).view(torch.float16).float()
    assert torch.all((half - table).abs() <= table.abs() * 2.0**-11 + 1e-12)
    assert fp16_bits(torch.tensor([1e6] + [0.0] * 15)) is None  # beyond float16: no PTX program


def test_ptx_path_only_for_16_bit_inputs_on_cuda():
    table = _device_table("nf4", torch.device("cpu"))
    assert table_asm(table, torch.bfloat16) == ""  # CPU tensor: the kernels keep the memory table
    with pytest.raises(ValueError):
        lookup_asm([0] * 15)


@pytest.mark.parametrize("kind", ["nf4", "fp4", "int4_affine"])
def test_ptx_dot_of_a_word_matches_float64(kind):
    """`dot_asm`: a packed word's eight codes looked up in the table registers and multiplied with activations
    handed over as (x1, x0), (x3, x2), (x5, x4), (x7, x6); the low lane sums the odd columns (low nibbles), the
    high lane the even ones, each four float16 products, so each lane matches the float64 sum of the same
    float16 table values to float16 rounding."""
    bits = fp16_bits(_device_table(kind, torch.device("cpu")))
    values = np.array(bits, dtype=np.uint16).view(np.float16).astype(np.float64)
    consts = {f"${6 + i}": w for i, w in enumerate(table_words(bits))}
    asm = dot_asm()
    rng = np.random.default_rng(0)
    words = [int(w) for w in rng.integers(0, 2**32, 300)] + [0, 2**32 - 1, 0x88888888, 0x77777777, 0x0F0F0F0F]
    for word in words:
        x = rng.uniform(-1, 1, 8).astype(np.float16)
        pairs = [_pair(x[[2 * q + 1, 2 * q]]) for q in range(4)]
        out = run_ptx(asm, 0, {"$1": word, **{f"${2 + i}": p for i, p in enumerate(pairs)}, **consts}, outputs=1)[0]
        codes = [(word >> 8 * (j // 2) + (0 if j % 2 else 4)) & 15 for j in range(8)]  # column j: byte j // 2
        products = values[codes] * x.astype(np.float64)
        got = _halves(out).astype(np.float64)
        bound = 3 * 2.0**-11 * np.abs(products).sum() + 1e-6
        assert np.allclose(got, [products[1::2].sum(), products[0::2].sum()], rtol=0, atol=bound), hex(word)


@pytest.mark.parametrize("copies", TABLE_COPIES)
@pytest.mark.parametrize("kind", ["nf4", "fp4", "int4_affine"])
def test_ptx_shared_dot_matches_the_register_dot(kind, copies):
    """`shared_dot_asm` reads each byte's two values from the lane's copy of the `pair_words` table, laid out as
    the kernel fills it (entry e of copy c at word copies·e + c after the table's address; lane l reads copy
    l mod copies), and gives the same float16 pair as `dot_asm`, bit for bit (the same products in the same
    order), for every lane: each load stays in the lane's copy (with 32 copies, in its own bank)."""
    bits = fp16_bits(_device_table(kind, torch.device("cpu")))
    base = 0x400
    pairs = pair_words(bits)
    consts = {f"${6 + i}": w for i, w in enumerate(table_words(bits))}
    rng = np.random.default_rng(1)
    words = [int(w) for w in rng.integers(0, 2**32, 200)] + [0, 2**32 - 1, 0x80808080, 0x7F7F7F7F, 0x01FF01FF]
    for i, word in enumerate(words):
        x = rng.uniform(-1, 1, 8).astype(np.float16)
        pairs_x = {f"${2 + q}": _pair(x[[2 * q + 1, 2 * q]]) for q in range(4)}
        lane = i % 32
        own = {base + 4 * (copies * e + lane % copies): pairs[e] for e in range(256)}  # only the lane's copy
        assert copies < 32 or {(a - base) // 4 % 32 for a in own} == {lane}  # 32 copies: one bank a lane
        got = run_ptx(shared_dot_asm(copies), 0, {"$1": word, "$6": base, **pairs_x}, outputs=1, shared=own,
                      lane=lane)  # fmt: skip
        want = run_ptx(dot_asm(), 0, {"$1": word, **pairs_x, **consts}, outputs=1)
        assert got == want, (hex(word), lane)
    with pytest.raises(ValueError, match="copies"):
        shared_table_asm(8)


def test_ptx_lookup_once_then_products_per_row_equal_the_shared_dot():
    """For several rows of x the kernel looks a word up once (`shared_lookup_asm`) and multiplies per row
    (`pair_products_asm`): bit for bit `shared_dot_asm` of each row."""
    bits = fp16_bits(_device_table("nf4", torch.device("cpu")))
    base, pairs, lane = 0x800, pair_words(bits), 5
    shared = {base + 4 * (32 * e + lane): pairs[e] for e in range(256)}
    rng = np.random.default_rng(2)
    for word in [int(w) for w in rng.integers(0, 2**32, 100)]:
        looked = run_ptx(shared_lookup_asm(), 0, {"$4": word, "$5": base}, outputs=4, shared=shared, lane=lane)
        assert looked == [pairs[(word >> 8 * q) & 0xFF] for q in range(4)]
        for _ in range(3):  # rows of x
            x = rng.uniform(-1, 1, 8).astype(np.float16)
            pairs_x = [_pair(x[[2 * q + 1, 2 * q]]) for q in range(4)]
            split = run_ptx(pair_products_asm(), 0, {**{f"${1 + q}": looked[q] for q in range(4)},
                                                     **{f"${5 + q}": pairs_x[q] for q in range(4)}}, outputs=1)
            fused = run_ptx(shared_dot_asm(), 0, {"$1": word, "$6": base, **{f"${2 + q}": pairs_x[q] for q in range(4)}},
                            outputs=1, shared=shared, lane=lane)
            assert split == fused
