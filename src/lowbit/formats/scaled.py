"""Scaled integer and FP8 quantization at any granularity (see `granularity.py`).

Integers, round-to-nearest with clamping (Jacob et al. 2018; the seeds' affine formulas):

- symmetric: `S = absmax / qmax`, `q = clamp(round(x / S), -qmax, qmax)`, `x̂ = S·q`; levels
  [-(2^(b-1) - 1), 2^(b-1) - 1] (int8: ±127, int4: ±7), so zero is exact and the range symmetric.
- affine: `S = (rmax - rmin) / (qmax - qmin)`, `Z = round(qmin - rmin / S)`,
  `q = clamp(round(x / S) + Z, qmin, qmax)`, `x̂ = S·(q - Z)`; levels [0, 2^b - 1]. The range is
  widened to contain 0 (as GPTQ and PyTorch's observers do) so that Z is a valid level and zero is
  exact here too.

FP8 (E4M3 / E5M2, Micikevicius et al. 2022): `S = absmax / fp8_max`, `q = fp8(x / S)` with torch's
round-to-nearest-even cast, saturated to the finite range.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lowbit.formats.blockwise import check_finite_float
from lowbit.formats.granularity import Granularity, from_groups, to_groups

FP8_DTYPES = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
_TINY = torch.finfo(torch.float32).tiny  # smallest scale: keeps all-zero groups finite


@dataclass
class ScaledTensor:
    """A quantized tensor: element codes plus one scale (and zero point) per group.

    `data` has the original shape: int8 levels (int formats, any bit width ≤ 8) or float8 values.
    `scale` and `zero_point` have one entry per group, in `to_groups` order.
    """

    data: torch.Tensor
    scale: torch.Tensor  # (n_groups,) float32
    zero_point: torch.Tensor | None  # (n_groups,) int16 for affine, None when symmetric
    kind: str  # "int" or an FP8_DTYPES key
    bits: int
    granularity: Granularity
    dtype: torch.dtype  # dtype that was quantized

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    def nbytes(self) -> int:
        """Storage if codes were packed at `bits` per value, plus scales and zero points."""
        total = math.ceil(self.data.numel() * self.bits / 8) + self.scale.numel() * self.scale.element_size()
        if self.zero_point is not None:
            total += math.ceil(self.zero_point.numel() * self.bits / 8)
        return total

    def bits_per_parameter(self) -> float:
        return 8 * self.nbytes() / self.data.numel()


def int_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """(qmin, qmax) of the integer levels."""
    if not 2 <= bits <= 8:
        raise ValueError(f"integer formats take 2 to 8 bits, got {bits}")
    if symmetric:
        return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def quantize_int(
    x: torch.Tensor, bits: int = 8, symmetric: bool = True, granularity: Granularity | None = None
) -> ScaledTensor:
    """Round-to-nearest integer quantization with one scale (and zero point) per group."""
    check_finite_float(x)
    g = granularity or Granularity("row")
    qmin, qmax = int_range(bits, symmetric)
    groups = to_groups(x.detach().float(), g)  # (G, L)
    if symmetric:
        scale = (groups.abs().amax(dim=1) / qmax).clamp(min=_TINY)
        q = torch.round(groups / scale[:, None]).clamp(qmin, qmax)
        zero = None
    else:
        rmin = groups.amin(dim=1).clamp(max=0.0)
        rmax = groups.amax(dim=1).clamp(min=0.0)
        # Divide each end separately: rmax - rmin can overflow float32 for huge values.
        scale = (rmax / (qmax - qmin) - rmin / (qmax - qmin)).clamp(min=_TINY)
        zero = torch.round(qmin - rmin / scale).clamp(qmin, qmax)
        q = (torch.round(groups / scale[:, None]) + zero[:, None]).clamp(qmin, qmax)
        zero = zero.to(torch.int16)
    data = from_groups(q.to(torch.int16), g, tuple(x.shape)).to(torch.int8 if symmetric or bits < 8 else torch.uint8)
    return ScaledTensor(data, scale, zero, "int", bits, g, x.dtype)


def quantize_fp8(x: torch.Tensor, kind: str = "fp8_e4m3", granularity: Granularity | None = None) -> ScaledTensor:
    """Scaled FP8: each group divided by absmax / fp8_max, then cast to the float8 dtype."""
    if kind not in FP8_DTYPES:
        raise ValueError(f"unknown FP8 kind {kind!r}; choose one of {sorted(FP8_DTYPES)}")
    check_finite_float(x)
    g = granularity or Granularity("row")
    fp8 = FP8_DTYPES[kind]
    fmax = torch.finfo(fp8).max
    groups = to_groups(x.detach().float(), g)
    scale = (groups.abs().amax(dim=1) / fmax).clamp(min=_TINY)
    q = (groups / scale[:, None]).clamp(-fmax, fmax).to(fp8)
    return ScaledTensor(from_groups(q, g, tuple(x.shape)), scale, None, kind, 8, g, x.dtype)


def dequantize_scaled(t: ScaledTensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """x̂ = S·(q - Z), in `dtype` (default: the dtype that was quantized)."""
    groups = to_groups(t.data.float(), t.granularity)
    if t.zero_point is not None:
        groups = groups - t.zero_point.float()[:, None]
    return from_groups(groups * t.scale[:, None], t.granularity, t.shape).to(dtype or t.dtype)
