"""Float64 reference quantizers for the format tests.

Written from the specs (DESIGN.md "Number formats", QLoRA, Jacob et al. 2018), simple and slow, and
sharing no code with lowbit: nothing here imports lowbit. Codebooks the references need come from
published tables or the real bitsandbytes package, never from lowbit.
"""

from __future__ import annotations

import functools
import math
import statistics

import torch

# DESIGN.md's published NF4 table (bitsandbytes' values, printed to 7 decimals).
NF4_PUBLISHED = (
    -1.0, -0.6961928, -0.5250731, -0.3949175, -0.2844414, -0.1847734, -0.0910500, 0.0,
    0.0795803, 0.1609302, 0.2461123, 0.3379152, 0.4407098, 0.5626170, 0.7229568, 1.0,
)  # fmt: skip


def nf4_from_normal_quantiles(offset: float = 0.9677083) -> torch.Tensor:
    """QLoRA's NF4 construction with the standard library's N(0,1) inverse CDF, all in float64."""
    inv_cdf = statistics.NormalDist().inv_cdf

    def linspace(a: float, b: float, n: int) -> list[float]:
        return [a + (b - a) * i / (n - 1) for i in range(n)]

    positive = [inv_cdf(p) for p in linspace(offset, 0.5, 9)[:-1]]  # 8 positive quantiles
    negative = [-inv_cdf(p) for p in linspace(offset, 0.5, 8)[:-1]]  # 7 negative quantiles
    values = sorted(positive + negative + [0.0])
    top = max(abs(v) for v in values)
    return torch.tensor([v / top for v in values], dtype=torch.float64)


def dynamic_map_bnb() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (the real package), float64."""
    return _dynamic_map_bnb().clone()


@functools.cache
def _dynamic_map_bnb() -> torch.Tensor:
    from bitsandbytes.functional import create_dynamic_map

    return create_dynamic_map(signed=True).double()


def nearest_index(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """argmin |scaled - code| in float64 (first index on exact ties)."""
    return (scaled.double().reshape(-1, 1) - code.double().reshape(1, -1)).abs().argmin(dim=1)


def boundary_distance(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """How far each value is from being equidistant to its two nearest distinct codebook values."""
    dist = (scaled.double().reshape(-1, 1) - code.double().unique().reshape(1, -1)).abs()
    two = dist.topk(2, dim=1, largest=False).values
    return two[:, 1] - two[:, 0]


def blockwise_absmax_ref(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat float64 values, float64 absmax per block of the flattened tensor; last block may be short)."""
    flat = x.detach().double().reshape(-1)
    return flat, _reduce(flat.abs(), torch.arange(flat.numel()) // block, "amax")


def blockwise_4bit_ref(x: torch.Tensor, code: torch.Tensor, block: int):
    """Reference absmax quantizer: (code index per value, absmax per block, scaled values), float64."""
    flat, absmax = blockwise_absmax_ref(x, block)
    per_value = absmax.repeat_interleave(block)[: flat.numel()]
    scaled = torch.where(per_value > 0, flat / per_value, torch.zeros_like(flat))
    return nearest_index(scaled, code), absmax, scaled


def double_quant_ref(absmax: torch.Tensor, nested_block: int = 256) -> torch.Tensor:
    """QLoRA double quantization of fp absmax constants, reconstructed, float64.

    Subtract the mean, quantize blocks of 256 with the nearest entry of the dynamic map after
    scaling by each block's absmax, then undo it all.
    """
    dyn = dynamic_map_bnb()
    a = absmax.double()
    centred = a - a.mean()
    codes, nested, _ = blockwise_4bit_ref(centred, dyn, nested_block)
    return dyn[codes] * nested.repeat_interleave(nested_block)[: a.numel()] + a.mean()


# ---------------------------------------------------------------- scaled (int / fp8) references


def group_ids(shape: tuple[int, ...], kind: str, size: int | None = None) -> torch.Tensor:
    """Group index of every element (row-major flat order), numbering groups row by row.

    The tensor is read as a (shape[0], rest) matrix (1-D: one row). `group`: `size` consecutive
    columns of one row, the last group of a row possibly short; `block`: `size` consecutive values
    of the flattened tensor.
    """
    n = math.prod(shape)
    rows = shape[0] if len(shape) >= 2 else 1
    cols = n // rows
    flat = torch.arange(n)
    r, c = flat // cols, flat % cols
    if kind == "tensor":
        return torch.zeros(n, dtype=torch.long)
    if kind == "row":
        return r
    if kind == "column":
        return c
    if kind == "group":
        return r * math.ceil(cols / size) + c // size
    if kind == "block":
        return flat // size
    raise ValueError(kind)


def _reduce(values: torch.Tensor, gid: torch.Tensor, how: str) -> torch.Tensor:
    n_groups = int(gid.max()) + 1
    init = {"amax": -math.inf, "amin": math.inf}[how]
    out = torch.full((n_groups,), init, dtype=torch.float64)
    return out.scatter_reduce(0, gid, values, reduce=how)


def int_symmetric_ref(x: torch.Tensor, bits: int, gid: torch.Tensor):
    """S = absmax / qmax, q = clamp(round(x / S), -qmax, qmax). Returns (q, S, x/S), float64, flat."""
    qmax = 2 ** (bits - 1) - 1
    v = x.detach().double().reshape(-1)
    scale = _reduce(v.abs(), gid, "amax") / qmax
    ratio = v / scale[gid].where(scale[gid] > 0, torch.ones(1, dtype=torch.float64))
    return torch.round(ratio).clamp(-qmax, qmax), scale, ratio


def int_affine_ref(x: torch.Tensor, bits: int, gid: torch.Tensor):
    """Range widened to contain 0; S = (rmax - rmin) / (qmax - qmin), Z = round(qmin - rmin / S).

    Returns (q, S, Z, x/S, qmin - rmin/S), float64, flat.
    """
    qmin, qmax = 0, 2**bits - 1
    v = x.detach().double().reshape(-1)
    rmin = _reduce(v, gid, "amin").clamp(max=0.0)
    rmax = _reduce(v, gid, "amax").clamp(min=0.0)
    scale = (rmax - rmin) / (qmax - qmin)
    safe = scale.where(scale > 0, torch.ones(1, dtype=torch.float64))
    zero_arg = qmin - rmin / safe
    zero = torch.round(zero_arg).clamp(qmin, qmax)
    ratio = v / safe[gid]
    q = (torch.round(ratio) + zero[gid]).clamp(qmin, qmax)
    return q, scale, zero, ratio, zero_arg


def fp8_ref(x: torch.Tensor, dtype: torch.dtype, gid: torch.Tensor):
    """S = absmax / fp8_max (float64); q = fp8(clamp(x / S)). Returns (q as float64, S), flat."""
    fmax = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}[dtype]
    v = x.detach().double().reshape(-1)
    scale = _reduce(v.abs(), gid, "amax") / fmax
    ratio = v / scale[gid].where(scale[gid] > 0, torch.ones(1, dtype=torch.float64))
    return ratio.clamp(-fmax, fmax).to(dtype).double(), scale


def near_half(ratio: torch.Tensor, tol: float = 1e-4) -> torch.Tensor:
    """True where a value is within `tol` of a round-half tie (x.5), where float32 and float64 may differ."""
    return ((ratio - torch.floor(ratio)) - 0.5).abs() < tol
