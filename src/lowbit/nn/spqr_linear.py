"""SpQRLinear: the sparse-quantized representation of Dettmers et al. 2023 ("SpQR: A Sparse-Quantized
Representation for Near-Lossless LLM Weight Compression", §4 and Fig. 3), stored for real.

A weight W (out, in) is kept as

- `weight`: b-bit codes q (default 3 bits) of every entry, in a dense bit stream (`formats.bitpack`);
  `Ŵ[r, c] = scale[g, r] · (q[r, c] − zero[g, r])` with g = c // β1: one affine statistic pair per output
  row and group of β1 (default 16) consecutive input columns;
- bi-level statistics: the first-level scales and zero points are themselves quantized to `stat_bits`
  (default 3) codes, min-max, in groups of β2 (default 16) consecutive rows; every second-level group keeps
  its minimum and step in fp16 (`scale_stats` / `zero_stats`, (G, ⌈out/β2⌉, 2));
- outliers: the few weights whose quantization would cost the most are stored exactly, in fp16, as CSR —
  `outlier_row_ptr` int32 (out + 1), `outlier_col` int16 (int32 beyond 32767 columns), `outlier_val` fp16 —
  and replace the dense value at their position (32 bits per outlier + 32 bits per row, as in the paper);
- `input_perm` (act-order, optional): stored column i is input column input_perm[i]; groups, codes and
  outlier columns are all in that stored order.

Average bits per parameter ≈ b + 2·stat_bits/β1 + 2·32/(β1·β2) + 32·(outliers + rows)/(out·in)
(3 + 0.375 + 0.25 = 3.625 before outliers for the defaults); `bits_per_parameter()` counts the actual bytes.
The algorithm that chooses all this (GPTQ-style, with sensitivity-based outliers) is quantize/spqr.py.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from lowbit.formats.bitpack import pack_bits, packed_nbytes, unpack_bits
from lowbit.nn.quant_linear import COMPUTE_DTYPES

SCALE_FLOOR = 2.0**-24  # decoded first-level scales never reach 0 (fp16 statistics can underflow)
_FP16_MAX = 65504.0


@dataclass(frozen=True)
class SpQRFormat:
    """Storage recipe of an SpQR weight (what `SpQRLinear` records in a checkpoint)."""

    bits: int = 3  # b: bits of every weight code
    group_size: int = 16  # β1: input columns sharing one first-level (scale, zero) per row
    stat_bits: int = 3  # bits of the first-level statistics' codes
    stat_group_size: int = 16  # β2: first-level statistics (consecutive rows) per fp16 (min, step) pair
    act_order: bool = True  # columns stored permuted (input_perm present)

    def __post_init__(self) -> None:
        for name in ("bits", "stat_bits"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 8:
                raise ValueError(f"SpQR {name} must be an int in [1, 8], got {value!r}")
        for name in ("group_size", "stat_group_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"SpQR {name} must be a positive int, got {value!r}")

    @property
    def name(self) -> str:
        return f"spqr-w{self.bits}g{self.group_size}"

    def to_dict(self) -> dict:
        return asdict(self)


def fit_statistics(stats: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Second level: (…, n) float → (…, n) uint8 codes, (…, ⌈n/β2⌉, 2) fp16 (min, step); min-max per group.

    Values are rebuilt as `min + code · step` with the fp16 min and step, so the codes are chosen against
    exactly the constants that will be stored.
    """
    n = stats.shape[-1]
    pad = -n % group_size
    padded = torch.cat([stats, stats[..., -1:].expand(*stats.shape[:-1], pad)], dim=-1) if pad else stats
    groups = padded.float().reshape(*stats.shape[:-1], -1, group_size)  # (…, S, β2)
    lo = groups.amin(dim=-1).clamp(-_FP16_MAX, _FP16_MAX).half()
    step = ((groups.amax(dim=-1) - lo.float()) / (2**bits - 1)).clamp(0, _FP16_MAX).half()
    safe = torch.where(step > 0, step.float(), torch.ones_like(step, dtype=torch.float32))
    codes = torch.round((groups - lo.float()[..., None]) / safe[..., None]).clamp(0, 2**bits - 1)
    codes = torch.where(step[..., None] > 0, codes, torch.zeros_like(codes)).to(torch.uint8)
    return codes.reshape(*stats.shape[:-1], -1)[..., :n], torch.stack([lo, step], dim=-1)


def dequantize_statistics(codes: torch.Tensor, min_step: torch.Tensor, group_size: int) -> torch.Tensor:
    """Inverse of `fit_statistics`: (…, n) codes, (…, S, 2) fp16 → (…, n) float32."""
    per_value = min_step.float().repeat_interleave(group_size, dim=-2)[..., : codes.shape[-1], :]  # (…, n, 2)
    return per_value[..., 0] + codes.float() * per_value[..., 1]


def dequantize_scale(codes: torch.Tensor, min_step: torch.Tensor, group_size: int) -> torch.Tensor:
    """First-level scales from their codes, kept ≥ SCALE_FLOOR (the algorithm divides by them)."""
    return dequantize_statistics(codes, min_step, group_size).clamp(min=SCALE_FLOOR)


class SpQRLinear(nn.Module):
    """y = x · Ŵᵀ + b with Ŵ decoded from SpQR storage (dense b-bit codes, bi-level statistics, CSR outliers)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        fmt: SpQRFormat | None = None,
        compute_dtype: torch.dtype = torch.float32,
        n_outliers: int = 0,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if compute_dtype not in COMPUTE_DTYPES:
            raise TypeError(f"compute_dtype must be one of {COMPUTE_DTYPES}, got {compute_dtype}")
        self.in_features, self.out_features = in_features, out_features
        self.fmt = fmt or SpQRFormat()
        self.compute_dtype = compute_dtype
        for name, tensor in self.empty_storage(n_outliers, device).items():
            self.register_buffer(name, tensor)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None

    @property
    def n_groups(self) -> int:
        return math.ceil(self.in_features / self.fmt.group_size)

    @property
    def n_outliers(self) -> int:
        return self.outlier_val.numel()

    def empty_storage(self, n_outliers: int, device=None) -> dict[str, torch.Tensor]:
        """Uninitialised buffers of the layout (shapes, dtypes) described in the module docstring."""
        f, out, g = self.fmt, self.out_features, self.n_groups
        s = math.ceil(out / f.stat_group_size)
        kw = {"device": device}
        col_dtype = torch.int16 if self.in_features <= 2**15 else torch.int32
        tensors = {
            "weight": torch.empty(packed_nbytes(out * self.in_features, f.bits), dtype=torch.uint8, **kw),
            "scale_codes": torch.empty(packed_nbytes(g * out, f.stat_bits), dtype=torch.uint8, **kw),
            "scale_stats": torch.empty(g, s, 2, dtype=torch.float16, **kw),
            "zero_codes": torch.empty(packed_nbytes(g * out, f.stat_bits), dtype=torch.uint8, **kw),
            "zero_stats": torch.empty(g, s, 2, dtype=torch.float16, **kw),
            "outlier_row_ptr": torch.empty(out + 1, dtype=torch.int32, **kw),
            "outlier_col": torch.empty(n_outliers, dtype=col_dtype, **kw),
            "outlier_val": torch.empty(n_outliers, dtype=torch.float16, **kw),
        }
        if f.act_order:
            tensors["input_perm"] = torch.empty(self.in_features, dtype=torch.int32, **kw)
        return tensors

    @classmethod
    def from_parts(cls, linear: nn.Linear, fmt: SpQRFormat, codes: torch.Tensor, scale: tuple, zero: tuple,
                   outliers: torch.Tensor, values: torch.Tensor, perm: torch.Tensor | None = None,
                   compute_dtype: torch.dtype | None = None) -> SpQRLinear:  # fmt: skip
        """Pack what the SpQR algorithm chose for `linear` (its bias is kept).

        codes: (out, in) weight codes in stored column order; scale / zero: ((G, out) codes, (G, S, 2) fp16)
        from `fit_statistics`; outliers: (out, in) bool mask and values: (out, in) float of the weights kept
        exactly (stored order); perm: the act-order permutation when `fmt.act_order`.
        """
        out, n = linear.out_features, linear.in_features
        if codes.shape != (out, n) or outliers.shape != (out, n):
            raise ValueError(f"codes and outlier mask must be {(out, n)}, got {tuple(codes.shape)} and "
                             f"{tuple(outliers.shape)}")  # fmt: skip
        if fmt.act_order != (perm is not None):
            raise ValueError("a permutation is required exactly when fmt.act_order is set")
        dtype = compute_dtype or (linear.weight.dtype if linear.weight.dtype in COMPUTE_DTYPES else torch.float32)
        rows, cols = outliers.nonzero(as_tuple=True)  # row-major order: CSR
        module = cls(n, out, linear.bias is not None, fmt, dtype, n_outliers=rows.numel(), device="meta")
        counts = torch.bincount(rows, minlength=out)
        tensors = {
            "weight": pack_bits(codes, fmt.bits),
            "scale_codes": pack_bits(scale[0], fmt.stat_bits),
            "scale_stats": scale[1].to(torch.float16),
            "zero_codes": pack_bits(zero[0], fmt.stat_bits),
            "zero_stats": zero[1].to(torch.float16),
            "outlier_row_ptr": torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32),
            "outlier_col": cols.to(module.outlier_col.dtype),
            "outlier_val": values[rows, cols].to(torch.float16),
        }
        if perm is not None:
            tensors["input_perm"] = perm.to(torch.int32)
        for name, tensor in tensors.items():
            expected = getattr(module, name)
            if tensor.shape != expected.shape:
                raise ValueError(f"SpQR {name} has shape {tuple(tensor.shape)}, expected {tuple(expected.shape)}")
            setattr(module, name, tensor.to(linear.weight.device))
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.detach().to(dtype), requires_grad=False)
        return module

    def to_meta(self) -> dict:
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias is not None,
            "compute_dtype": str(self.compute_dtype).removeprefix("torch."),
            "spqr_format": self.fmt.to_dict(),
            "n_outliers": self.n_outliers,
        }

    @classmethod
    def from_meta(cls, meta: dict, device="meta") -> SpQRLinear:
        dtype = getattr(torch, meta["compute_dtype"], None)
        if dtype not in COMPUTE_DTYPES:
            raise ValueError(f"unknown compute dtype {meta['compute_dtype']!r}")
        return cls(meta["in_features"], meta["out_features"], meta["bias"], SpQRFormat(**meta["spqr_format"]), dtype,
                   n_outliers=int(meta["n_outliers"]), device=device)  # fmt: skip

    def storage(self) -> dict[str, torch.Tensor]:
        return {name: buf for name, buf in self.named_buffers(recurse=False)}

    def weight_nbytes(self) -> int:
        """Every byte of the stored weight: codes, both levels of statistics, CSR outliers, permutation."""
        return sum(t.numel() * t.element_size() for t in self.storage().values())

    def bits_per_parameter(self) -> float:
        return 8 * self.weight_nbytes() / (self.in_features * self.out_features)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense (out, in) weight, input columns in their original order."""
        f, out, n, g = self.fmt, self.out_features, self.in_features, self.n_groups
        codes = unpack_bits(self.weight, f.bits, out * n).view(out, n).float()
        scale = dequantize_scale(unpack_bits(self.scale_codes, f.stat_bits, g * out).view(g, out),
                                 self.scale_stats, f.stat_group_size)  # fmt: skip  (G, out)
        zero = dequantize_statistics(unpack_bits(self.zero_codes, f.stat_bits, g * out).view(g, out),
                                     self.zero_stats, f.stat_group_size)  # fmt: skip
        group = torch.arange(n, device=codes.device) // f.group_size  # (in,) column → group
        w = scale.t()[:, group] * (codes - zero.t()[:, group])  # (out, in), stored column order
        rows = torch.repeat_interleave(torch.arange(out, device=codes.device), self.outlier_row_ptr.diff().long())
        w[rows, self.outlier_col.long()] = self.outlier_val.float()
        if f.act_order:
            unpermuted = torch.empty_like(w)
            unpermuted[:, self.input_perm.long()] = w
            w = unpermuted
        return w.to(dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"SpQRLinear expects input (…, {self.in_features}), got {tuple(x.shape)}")
        y = x.to(self.compute_dtype) @ self.dequantize(self.compute_dtype).t()
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        f = self.fmt
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"bits={f.bits}, group_size={f.group_size}, stat_bits={f.stat_bits}, "
                f"stat_group_size={f.stat_group_size}, outliers={self.n_outliers}, "
                f"act_order={f.act_order}")  # fmt: skip
