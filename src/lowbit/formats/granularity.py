"""Which values share one scale: per tensor, per row, per column, per group along a row, or per block.

Every scaled format (integers, FP8) computes one scale (and maybe a zero point) per group of values.
`to_groups` rearranges a tensor so each group is one row of a 2-D view, `from_groups` undoes it. A
tensor of more than two dimensions is read as (shape[0], rest): rows are output channels, columns
input channels, as in an `nn.Linear` weight.

Sizes need not divide evenly: the last group is padded by repeating its final value, which leaves the
group's min, max and absmax unchanged, and the padding is dropped again on the way back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

GranularityName = Literal["tensor", "row", "column", "group", "block"]
GRANULARITIES = ("tensor", "row", "column", "group", "block")


@dataclass(frozen=True)
class Granularity:
    """`group`: `size` consecutive values of one row share a scale; `block`: of the flattened tensor."""

    kind: GranularityName = "row"
    size: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in GRANULARITIES:
            raise ValueError(f"unknown granularity {self.kind!r}; choose one of {GRANULARITIES}")
        if self.kind in ("group", "block"):
            if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
                raise ValueError(f"granularity {self.kind!r} needs a positive size, got {self.size}")
        elif self.size is not None:
            raise ValueError(f"granularity {self.kind!r} takes no size (got {self.size})")


def _pad_last(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad the last dimension to a multiple by repeating its final value."""
    pad = -x.shape[-1] % multiple
    if pad == 0:
        return x
    return torch.cat([x, x[..., -1:].expand(*x.shape[:-1], pad)], dim=-1)


def _as_matrix(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1) if x.dim() >= 2 else x.reshape(1, -1)


def to_groups(x: torch.Tensor, g: Granularity) -> torch.Tensor:
    """(…) → (n_groups, group_len): one row per group of values that share a scale."""
    if g.kind == "tensor":
        return x.reshape(1, -1)
    if g.kind == "block":
        return _pad_last(x.reshape(-1), g.size).view(-1, g.size)
    m = _as_matrix(x)  # (rows, cols)
    if g.kind == "row":
        return m
    if g.kind == "column":
        return m.t()
    return _pad_last(m, g.size).reshape(-1, g.size)  # group: (rows * ceil(cols / size), size)


def from_groups(groups: torch.Tensor, g: Granularity, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of `to_groups` for a tensor of the original `shape`."""
    n = math.prod(shape)
    if g.kind in ("tensor", "block"):
        return groups.reshape(-1)[:n].reshape(shape)
    if g.kind == "row":
        return groups.reshape(shape)
    rows = shape[0] if len(shape) >= 2 else 1
    if g.kind == "column":
        return groups.t().reshape(shape)
    return groups.reshape(rows, -1)[:, : n // rows].reshape(shape)


def n_groups(shape: tuple[int, ...], g: Granularity) -> int:
    """How many scales a tensor of `shape` needs at granularity `g`."""
    n = math.prod(shape)
    rows = shape[0] if len(shape) >= 2 else 1
    return {
        "tensor": 1,
        "row": rows,
        "column": n // rows,
        "group": rows * math.ceil((n // rows) / (g.size or 1)),
        "block": math.ceil(n / (g.size or 1)),
    }[g.kind]
