"""Dense b-bit packing (formats/bitpack.py) against a bit-by-bit Python reference, and int2/int3 storage size."""

import math

import pytest
import torch

from lowbit.formats import WeightFormat
from lowbit.formats.bitpack import pack_bits, packed_nbytes, unpack_bits


def reference_pack(codes: list[int], bits: int) -> bytes:
    """Little-endian bit stream: code i at stream bits [i·b, (i+1)·b), LSB first, bit k in byte k // 8."""
    out = bytearray(math.ceil(len(codes) * bits / 8))
    for i, c in enumerate(codes):
        for j in range(bits):
            k = i * bits + j
            out[k // 8] |= ((c >> j) & 1) << (k % 8)
    return bytes(out)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [1, 7, 8, 13, 64])
def test_pack_matches_reference_and_round_trips(bits, n):
    codes = torch.randint(0, 2**bits, (n,), generator=torch.Generator().manual_seed(bits * 100 + n))
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_nbytes(n, bits)
    assert bytes(packed.tolist()) == reference_pack(codes.tolist(), bits)
    assert torch.equal(unpack_bits(packed, bits, n), codes.to(torch.uint8))


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"\[0, 7\]"):
        pack_bits(torch.tensor([8]), 3)
    with pytest.raises(ValueError, match="bits"):
        pack_bits(torch.tensor([1]), 9)
    with pytest.raises(ValueError, match="cannot hold"):
        unpack_bits(torch.zeros(3, dtype=torch.uint8), 3, 9)
    with pytest.raises(TypeError):
        unpack_bits(torch.zeros(3, dtype=torch.int8), 3, 8)


@pytest.mark.parametrize("name,bits", [("int2", 2), ("int3", 3)])
def test_int2_int3_weights_cost_their_bits(name, bits):
    fmt = WeightFormat(name, group_size=32, symmetric=False)
    w = torch.randn(24, 96)
    tensors = fmt.encode(w)
    assert tensors["weight"].numel() == math.ceil(24 * 96 * bits / 8)
    # every level is reachable and used: the decoded grid of one group has at most 2**bits values
    decoded = fmt.decode(tensors, (24, 96), torch.float32)
    assert len(torch.unique(decoded[0, :32])) <= 2**bits
