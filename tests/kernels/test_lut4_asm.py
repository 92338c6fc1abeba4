"""The PTX table lookup (`lut4_asm`) run through a small interpreter of its instructions on the CPU.

The interpreter follows the PTX ISA's definitions of mov/shr/shl/and/or, `prmt.b32` (default mode:
selector nibble k picks byte k of the result from the eight bytes {b, a}; with its bit 3 set, the
picked byte's sign bit is replicated) and `lop3.b32` (bit i of the result is bit (a·4 + b·2 + c) of
the immediate). The reference is the float32 table of `lut4.py` rounded to float16, indexed by the
high and low nibble of each byte. On the GPU the kernels' tests check the compiled program.
"""

import random

import pytest
import torch

from lowbit.kernels.lut4 import _device_table
from lowbit.kernels.lut4_asm import fp16_bits, lookup_asm, table_asm

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


def run_ptx(asm: str, word: int) -> list[int]:
    """Execute the program with $4 = word; return $0..$3."""
    regs = {"$4": word}

    def val(tok: str) -> int:
        return regs[tok] if tok in regs else int(tok, 0)

    for line in asm.splitlines():
        line = line.strip()
        if line in ("{", "}") or line.startswith(".reg"):
            continue
        op, rest = line.rstrip(";").split(None, 1)
        d, *src = [t.strip() for t in rest.split(",")]
        v = [val(t) for t in src]
        if op == "mov.b32":
            r = v[0]
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
        else:
            raise AssertionError(f"instruction outside the interpreter: {line}")
        regs[d] = r & MASK32
    return [regs[f"${i}"] for i in range(4)]


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
