"""Codebooks: the finite sets of values a quantized code can stand for.

A codebook format stores, for each weight, the index of the nearest codebook entry after the weight has
been divided by its block's absmax, so every codebook here lives in [-1, 1] and is sorted where the
format allows it (NF4, the dynamic map). bitsandbytes' FP4 table is not sorted: its index is a bit
pattern, so lookups go through `nearest_code`, which handles any order.
"""

from __future__ import annotations

from functools import lru_cache, wraps

import torch


def _cached_copy(build):
    """Build a table once; hand every caller its own copy, so no caller can corrupt the cache."""
    cached = lru_cache(maxsize=None)(build)

    @wraps(build)
    def table() -> torch.Tensor:
        return cached().clone()

    return table

# The probability mass QLoRA leaves outside the outermost quantile so that it is finite
# (≈ the mean of 1 - 1/30 and 1 - 1/32; the value is QLoRA's published constant).
NF4_OFFSET = 0.9677083

# The float32 NF4 values as published by QLoRA / bitsandbytes. Storage uses this exact table so codes
# are bit-compatible with bitsandbytes; `nf4_from_quantiles` re-derives it (tests check they agree to
# ~1e-7, the precision of the table, which was computed through a float32 linspace).
NF4_TABLE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip


def nf4_from_quantiles(offset: float = NF4_OFFSET) -> torch.Tensor:
    """NormalFloat4 (QLoRA, Dettmers et al. 2023, eq. 4) built from equal-mass quantiles of N(0, 1).

    An asymmetric construction gives an exact zero: 8 quantiles on the positive side from 9 equally
    spaced probabilities in [1/2, offset], 7 on the negative side from 8, zero once, then everything
    is divided by the largest magnitude so the set spans [-1, 1]. Float64, sorted ascending.
    """
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    values = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative]).sort().values
    return values / values.abs().max()


@_cached_copy
def nf4_codebook() -> torch.Tensor:
    """The 16 NF4 values, sorted ascending, float32 (the published table)."""
    return torch.tensor(NF4_TABLE, dtype=torch.float32)


# OCP E2M1 magnitudes: exponent bias 1, one mantissa bit, one subnormal (0.5); no inf/NaN.
_E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


@_cached_copy
def e2m1_codebook() -> torch.Tensor:
    """Standard FP4 E2M1 (OCP microscaling spec), indexed by its bit pattern s·e1e0·m, scaled to [-1, 1].

    Index i < 8 is +magnitude[i], index 8 + i is -magnitude[i] (so index 8 is negative zero).
    """
    mags = torch.tensor(_E2M1_MAGNITUDES, dtype=torch.float32) / 6.0
    return torch.cat([mags, -mags])


@_cached_copy
def bnb_fp4_codebook() -> torch.Tensor:
    """bitsandbytes' FP4 table, indexed by its 4-bit code (sign bit first).

    It is E2M1 with bitsandbytes' own exponent encoding (field 01 → 4, 10 → 2, 11 → 1, 00 →
    subnormal) and its subnormal at 1/32 instead of 0.5, divided by 6. Kept exactly so that lowbit's
    "fp4" checkpoints are byte-compatible with bitsandbytes' `quant_type="fp4"`.
    """
    exponent_value = {0b01: 4.0, 0b10: 2.0, 0b11: 1.0}
    mags = []
    for bits in range(8):
        exponent, mantissa = bits >> 1, bits & 1
        if exponent == 0:
            mags.append(0.0 if mantissa == 0 else 1 / 32)
        else:
            mags.append(exponent_value[exponent] * (1.5 if mantissa else 1.0))
    mags_t = torch.tensor(mags, dtype=torch.float32) / 6.0
    return torch.cat([mags_t, -mags_t]) + 0.0  # + 0.0 turns -0.0 into 0.0, as in bitsandbytes' table


@_cached_copy
def dynamic_codebook() -> torch.Tensor:
    """The signed 8-bit dynamic tree map of Dettmers (2015), used for double quantization.

    Each value is ±10^(e-6) · f for a decade e ∈ [0, 6] and a fraction f taken from the midpoints of
    2^e + 1 equally spaced points on [0.1, 1]: small magnitudes get few fraction steps, large ones
    many. Together with 0 and 1 that is 2·127 + 2 = 256 entries, sorted ascending. Computed in
    float32 like bitsandbytes so that nested constants are bit-identical.
    """
    values: list[float] = []
    for decade in range(7):
        edges = torch.linspace(0.1, 1.0, 2**decade + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        scaled = (10.0 ** (decade - 6)) * mids
        values += scaled.tolist() + (-scaled).tolist()
    values += [0.0, 1.0]
    return torch.tensor(sorted(values), dtype=torch.float32)


CODEBOOKS = {
    "nf4": nf4_codebook,
    "fp4": bnb_fp4_codebook,
    "e2m1": e2m1_codebook,
}


def get_codebook(name: str, device: torch.device | str | None = None) -> torch.Tensor:
    """A 4-bit codebook by name: nf4, fp4 (bitsandbytes' table) or e2m1 (OCP FP4)."""
    if name not in CODEBOOKS:
        raise ValueError(f"unknown 4-bit codebook {name!r}; choose one of {sorted(CODEBOOKS)}")
    return CODEBOOKS[name]().to(device) if device is not None else CODEBOOKS[name]()


@lru_cache(maxsize=None)
def byte_pair_table(name: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """(256, 2) float32: the two codebook values a packed byte stands for (high nibble first).

    Decoding a packed tensor is then one gather per byte instead of two shifts and two lookups.
    """
    code = get_codebook(name, device)
    byte = torch.arange(256, device=device)
    return torch.stack([code[byte >> 4], code[byte & 0xF]], dim=1)


def nearest_code(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest codebook entry for each element of `x` (values in [-1, 1]), as int64.

    Ties go to the smaller value (decision boundaries are the midpoints between sorted neighbours,
    compared with `x <= boundary`), which is also bitsandbytes' rule, so codes match it bit for bit.
    """
    # -0.0 sorts before +0.0 (E2M1 has both), so tiny negatives keep their sign bit; tables without a
    # negative zero (NF4, bitsandbytes' FP4) are ordered exactly as by value.
    key = codebook.double() - (torch.signbit(codebook) & (codebook == 0)).double() * 1e-300
    order = torch.argsort(key, stable=True)
    sorted_values = codebook[order]
    boundaries = (sorted_values[:-1] + sorted_values[1:]) / 2
    return order[torch.bucketize(x, boundaries)]
