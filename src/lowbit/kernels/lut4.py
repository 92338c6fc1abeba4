"""LUT4: the one 4-bit weight layout every lowbit 4-bit kernel reads, and its torch reference.

NF4, FP4 (QLoRA, Dettmers et al. 2023) and GPTQ-style int4 groups differ only in what a 4-bit code
stands for and in which values share a scale, so the kernels see them all as

    W[n, k] = (table[code(n, k)] - zero_point[g(n, k)]) · scale[g(n, k)]          W: (N, K)

- `code(n, k)`: nibble of the flat row-major index e = n·K + k in `packed`, byte e // 2, the even
  index in the HIGH nibble (`lowbit.formats.pack_4bit`, bitsandbytes' order).
- `table`: 16 float32 values: the codebook (nf4/fp4/e2m1), or the integer levels `code + qmin`.
- `g(n, k)`: `flat=True`: (n·K + k) // group_size, blocks of the flattened tensor (blockwise absmax,
  a block may span two rows); `flat=False`: n·ceil(K / group_size) + k // group_size, groups along
  a row, the last one short (`lowbit.formats.granularity`, int formats). When K is a multiple of
  group_size both are the same index, which is what lets the fast kernels use tiles.
- `scale`: float32 per group, or with double quantization uint8 codes into `nested_code` (the
  dynamic map), so scale[g] = nested_code[scale[g]] · nested_scale[g // 256] + offset.

This file holds the layout (`Lut4Weight`), its construction from a `WeightFormat`'s storage and the
pure-PyTorch reference of the kernels: dequantize, then matmul (the CPU implementation of the ops).
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import NamedTuple

import torch

from lowbit.formats.blockwise import NESTED_BLOCK_SIZE
from lowbit.formats.codebooks import dynamic_codebook, get_codebook
from lowbit.formats.scaled import int_range
from lowbit.formats.weight import WeightFormat


class Lut4Weight(NamedTuple):
    """A 4-bit weight as the kernels read it (see the module docstring for the formula)."""

    packed: torch.Tensor  # (ceil(N·K / 2),) uint8
    table: torch.Tensor  # (16,) float32
    scale: torch.Tensor  # (n_groups,) float32, or uint8 codes with double quantization
    zero_point: torch.Tensor | None  # (n_groups,) integer, or None (symmetric)
    nested_code: torch.Tensor | None  # (256,) float32 dynamic map, double quantization only
    nested_scale: torch.Tensor | None  # (ceil(n_groups / 256),) float32
    offset: torch.Tensor | None  # (1,) float32
    out_features: int  # N
    in_features: int  # K
    group_size: int
    flat: bool

    @property
    def double_quant(self) -> bool:
        return self.nested_code is not None

    def n_groups(self) -> int:
        n, k, gs = self.out_features, self.in_features, self.group_size
        return math.ceil(n * k / gs) if self.flat else n * math.ceil(k / gs)

    def nbytes(self) -> int:
        """Bytes a kernel must read for the weight (packed codes and all scale constants)."""
        parts = (self.packed, self.scale, self.zero_point, self.nested_scale, self.offset)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)


@lru_cache(maxsize=None)
def _device_table(kind: str, device: torch.device) -> torch.Tensor:
    """Read-only 16- or 256-entry lookup tables, moved to a device once (not once per forward)."""
    if kind == "dynamic":
        return dynamic_codebook().to(device)
    if kind.startswith("int4"):
        qmin, _ = int_range(4, kind == "int4_sym")
        return (torch.arange(16, dtype=torch.float32) + qmin).to(device)
    return get_codebook(kind).to(device)


def supports(fmt: WeightFormat) -> bool:
    """Whether a weight format is a LUT4 layout (4-bit codebooks and int4 groups are; int8/fp8 not)."""
    return fmt.is_codebook or fmt.name == "int4"


def lut4_weight(fmt: WeightFormat, storage: dict[str, torch.Tensor], shape: tuple[int, int]) -> Lut4Weight:
    """View a `WeightFormat`'s storage tensors (as `QuantLinear.storage()` returns them) as a LUT4 weight."""
    if not supports(fmt):
        raise ValueError(f"format {fmt.name!r} is not a 4-bit lookup format; LUT4 kernels take nf4, fp4, e2m1, int4")
    n, k = int(shape[0]), int(shape[1])
    device = storage["weight"].device
    if fmt.is_codebook:
        table = _device_table(fmt.name, device)
        dq = "nested_absmax" in storage
        return Lut4Weight(
            storage["weight"], table, storage["absmax"], None,
            _device_table("dynamic", device) if dq else None,
            storage["nested_absmax"] if dq else None,
            storage["offset"].reshape(1) if dq else None,
            n, k, fmt.block_size, True,
        )  # fmt: skip
    table = _device_table("int4_sym" if fmt.symmetric else "int4_affine", device)
    group = fmt.group_size if fmt.group_size is not None else k  # per row: one group spanning the row
    return Lut4Weight(storage["weight"], table, storage["scale"], storage.get("zero_point"),
                      None, None, None, n, k, min(group, k), False)  # fmt: skip


def check_weight(w: Lut4Weight) -> None:
    """Clear errors for storage that does not fit the declared shape (before any kernel reads it)."""
    n, k = w.out_features, w.in_features
    if n < 1 or k < 1 or w.group_size < 1:
        raise ValueError(f"LUT4 weight needs positive sizes, got N={n}, K={k}, group_size={w.group_size}")
    if w.packed.dtype != torch.uint8 or w.packed.numel() != (n * k + 1) // 2:
        raise ValueError(f"packed must be {(n * k + 1) // 2} uint8 bytes for a ({n}, {k}) weight, "
                         f"got {w.packed.numel()} of {w.packed.dtype}")  # fmt: skip
    if w.table.numel() != 16 or w.table.dtype != torch.float32:
        raise ValueError(f"table must hold 16 float32 values, got {w.table.numel()} of {w.table.dtype}")
    if w.scale.numel() != w.n_groups():
        raise ValueError(f"scale must hold {w.n_groups()} values (one per group), got {w.scale.numel()}")
    if w.double_quant != (w.scale.dtype == torch.uint8):
        raise ValueError("double quantization needs uint8 scale codes with nested_code/nested_scale/offset")
    if w.double_quant and w.nested_scale.numel() != math.ceil(w.n_groups() / NESTED_BLOCK_SIZE):
        raise ValueError(f"nested_scale must hold ceil({w.n_groups()} / {NESTED_BLOCK_SIZE}) values")
    if w.zero_point is not None and w.zero_point.numel() != w.n_groups():
        raise ValueError(f"zero_point must hold {w.n_groups()} values, got {w.zero_point.numel()}")


def group_scales(w: Lut4Weight) -> torch.Tensor:
    """(n_groups,) float32 scales, undoing double quantization."""
    if not w.double_quant:
        return w.scale.float()
    nested = w.nested_scale.float().repeat_interleave(NESTED_BLOCK_SIZE)[: w.scale.numel()]
    return w.nested_code[w.scale.long()] * nested + w.offset.float()


def dequantize(w: Lut4Weight) -> torch.Tensor:
    """The dense (N, K) float32 weight: the torch reference every kernel is checked against."""
    n, k = w.out_features, w.in_features
    packed = w.packed.reshape(-1)
    codes = torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)[: n * k].long()  # (N·K,)
    values = w.table[codes].view(n, k)
    if w.flat:
        group = torch.arange(n * k, device=packed.device).view(n, k) // w.group_size
    else:
        per_row = math.ceil(k / w.group_size)
        rows, cols = torch.arange(n, device=packed.device), torch.arange(k, device=packed.device)
        group = rows[:, None] * per_row + cols // w.group_size
    if w.zero_point is not None:
        values = values - w.zero_point.float()[group]
    return values * group_scales(w)[group]


def linear_reference(x: torch.Tensor, w: Lut4Weight) -> torch.Tensor:
    """y = x · Wᵀ, (M, K) → (M, N), W dequantized in float32 then cast to x's dtype (as QuantLinear)."""
    return x @ dequantize(w).to(x.dtype).t()


def linear_grad_input_reference(grad_out: torch.Tensor, w: Lut4Weight) -> torch.Tensor:
    """dX = dY · W, (M, N) → (M, K): QLoRA's backward through a frozen 4-bit weight."""
    return grad_out @ dequantize(w).to(grad_out.dtype)
