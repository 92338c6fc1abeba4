"""Packing b-bit codes (1 ≤ b ≤ 8) into a dense little-endian bit stream of uint8.

2- and 3-bit weights (GPTQ int2/int3, SpQR's 3-bit weights and statistics) must cost 2 or 3 bits each in
memory and on disk, or bits/parameter would be a fiction. Code i occupies stream bits [i·b, (i+1)·b),
least significant bit first; stream bit k is bit (k mod 8) of byte k // 8. (4-bit weights keep
`pack_4bit`'s nibble layout, which is bitsandbytes'.)
"""

from __future__ import annotations

import math

import torch


def packed_nbytes(n: int, bits: int) -> int:
    """Bytes that `pack_bits` uses for `n` codes of `bits` bits."""
    return math.ceil(n * bits / 8)


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(…) integer codes in [0, 2**bits) → (ceil(n·bits / 8),) uint8 bit stream."""
    _check_bits(bits)
    flat = codes.reshape(-1).to(torch.int16)
    if flat.numel() and (flat.min() < 0 or flat.max() >= 2**bits):
        raise ValueError(f"codes must lie in [0, {2**bits - 1}] to pack into {bits} bits")
    shifts = torch.arange(bits, device=flat.device, dtype=torch.int16)
    stream = ((flat[:, None] >> shifts) & 1).reshape(-1).to(torch.uint8)  # (n·bits,) one bit per entry
    stream = torch.nn.functional.pad(stream, (0, -stream.numel() % 8))
    weights = (1 << torch.arange(8, device=flat.device, dtype=torch.int16)).to(torch.uint8)
    return (stream.view(-1, 8) * weights).sum(dim=1, dtype=torch.int16).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack_bits`: the first `n` codes as uint8."""
    _check_bits(bits)
    packed = packed.reshape(-1)
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed codes must be uint8, got {packed.dtype}")
    if packed.numel() != packed_nbytes(n, bits):
        raise ValueError(f"{packed.numel()} packed bytes cannot hold exactly {n} {bits}-bit codes")
    shifts = torch.arange(8, device=packed.device, dtype=torch.uint8)
    stream = ((packed[:, None] >> shifts) & 1).reshape(-1)[: n * bits].view(n, bits)  # (n, bits)
    weights = (1 << torch.arange(bits, device=packed.device, dtype=torch.int16))
    return (stream.to(torch.int16) * weights).sum(dim=1, dtype=torch.int16).to(torch.uint8)


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an int in [1, 8], got {bits!r}")
