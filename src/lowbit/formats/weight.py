"""How a weight matrix is stored in each format: named tensors in, named tensors out.

A `WeightFormat` is the whole recipe for storing one weight (which format, block or group size,
double quantization, symmetric or affine). `encode` turns a dense weight into the flat dict of tensors
a module registers as buffers (and a checkpoint stores); `decode` turns them back into a dense
matrix. Algorithms (GPTQ, …) that choose their own integer values hand them to `encode_int`.

Storage per format:
- nf4 / fp4 / e2m1: `weight` packed uint8 (2 codes per byte), `absmax` fp32 per block, or with double
  quantization uint8 plus `nested_absmax` fp32 and `offset` (bitsandbytes' layout).
- int2 / int3 / int4 / int8: `weight` int8 levels (int4: packed two per byte as level - qmin; int2 /
  int3: level - qmin in a dense bit stream, see `bitpack.py`), `scale` fp32 per group, `zero_point`
  for affine; groups of `group_size` along the input dimension, or per row.
- fp8_e4m3 / fp8_e5m2: `weight` float8, `scale` fp32 per group or row.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from lowbit.formats.bitpack import pack_bits, packed_nbytes, unpack_bits
from lowbit.formats.blockwise import NestedState, QuantState, dequantize_4bit, pack_4bit, quantize_4bit, unpack_4bit
from lowbit.formats.codebooks import CODEBOOKS
from lowbit.formats.granularity import Granularity, n_groups
from lowbit.formats.scaled import FP8_DTYPES, ScaledTensor, dequantize_scaled, int_range, quantize_fp8, quantize_int

INT_BITS = {"int2": 2, "int3": 3, "int4": 4, "int8": 8}
FORMATS = tuple(CODEBOOKS) + tuple(INT_BITS) + tuple(FP8_DTYPES)


@dataclass(frozen=True)
class WeightFormat:
    """The storage recipe of a quantized weight; validated on construction, JSON-serialisable."""

    name: str = "nf4"
    block_size: int = 64  # 4-bit codebook formats: values per absmax block
    double_quant: bool = True  # 4-bit codebook formats: quantize the absmax constants too
    group_size: int | None = None  # int / fp8 formats: values per scale along a row; None = per row
    symmetric: bool = True  # int formats: symmetric (zero point 0) or affine

    def __post_init__(self) -> None:
        if self.name not in FORMATS:
            raise ValueError(f"unknown weight format {self.name!r}; choose one of {FORMATS}")
        if self.block_size < 2:
            raise ValueError(f"block_size must be ≥ 2, got {self.block_size}")
        if self.group_size is not None and self.group_size < 1:
            raise ValueError(f"group_size must be a positive integer or None, got {self.group_size}")
        if self.name in FP8_DTYPES and not self.symmetric:
            raise ValueError("FP8 formats are symmetric; affine (symmetric=False) applies to int4/int8")

    @property
    def is_codebook(self) -> bool:
        return self.name in CODEBOOKS

    @property
    def granularity(self) -> Granularity:
        return Granularity("row") if self.group_size is None else Granularity("group", self.group_size)

    def to_dict(self) -> dict:
        return asdict(self)

    def encode(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """Quantize a dense (out, in) weight into named storage tensors."""
        if weight.dim() != 2:
            raise ValueError(f"expected a 2-D (out_features, in_features) weight, got shape {tuple(weight.shape)}")
        if self.is_codebook:
            packed, state = quantize_4bit(weight, self.name, self.block_size, self.double_quant)
            tensors = {"weight": packed, "absmax": state.absmax}
            if state.nested is not None:
                tensors |= {"nested_absmax": state.nested.absmax, "offset": state.offset.reshape(1)}
            return tensors
        if self.name in INT_BITS:
            return self.encode_int(quantize_int(weight, INT_BITS[self.name], self.symmetric, self.granularity))
        q = quantize_fp8(weight, self.name, self.granularity)
        return {"weight": q.data, "scale": q.scale}

    def encode_int(self, q: ScaledTensor) -> dict[str, torch.Tensor]:
        """Store integer levels chosen elsewhere (RTN here, GPTQ in quantize/), packing 4-bit ones."""
        qmin, _ = int_range(q.bits, q.zero_point is None)
        data = q.data
        if q.bits == 4:
            data = pack_4bit((data.to(torch.int16) - qmin).to(torch.uint8))
        elif q.bits < 4:
            data = pack_bits(data.to(torch.int16) - qmin, q.bits)
        tensors = {"weight": data, "scale": q.scale}
        if q.zero_point is not None:
            tensors["zero_point"] = q.zero_point
        return tensors

    def decode(self, tensors: dict[str, torch.Tensor], shape: tuple[int, int], dtype: torch.dtype,
               scratch: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """Dense (out, in) weight in `dtype` from the storage tensors. ``scratch``: a float32 buffer the 4-bit
        codebook formats may decode into (`dequantize_4bit`'s ``out``; the result may then be a view of it)."""
        if self.is_codebook:
            return dequantize_4bit(tensors["weight"], self.quant_state(tensors, shape), dtype, out=scratch)
        if self.name in INT_BITS:
            bits = INT_BITS[self.name]
            qmin, _ = int_range(bits, self.symmetric)
            data = tensors["weight"]
            if bits == 4:
                data = (unpack_4bit(data, math.prod(shape)).to(torch.int16) + qmin).to(torch.int8).view(shape)
            elif bits < 4:
                data = (unpack_bits(data, bits, math.prod(shape)).to(torch.int16) + qmin).to(torch.int8).view(shape)
            q = ScaledTensor(data, tensors["scale"], tensors.get("zero_point"), "int", bits, self.granularity, dtype)
        else:
            q = ScaledTensor(tensors["weight"], tensors["scale"], None, self.name, 8, self.granularity, dtype)
        return dequantize_scaled(q, dtype)

    def quant_state(self, tensors: dict[str, torch.Tensor], shape: tuple[int, int]) -> QuantState:
        """The bitsandbytes-style QuantState of a 4-bit codebook weight's storage tensors."""
        nested = NestedState(tensors["nested_absmax"]) if "nested_absmax" in tensors else None
        offset = tensors["offset"].reshape(()) if nested is not None else None
        return QuantState(self.name, shape, torch.float32, self.block_size, tensors["absmax"], offset, nested)

    def empty(self, shape: tuple[int, int], device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """Uninitialised storage of the right shapes and dtypes, for loading a checkpoint into."""
        n = math.prod(shape)
        kw = {"device": device}
        if self.is_codebook:
            n_blocks = math.ceil(n / self.block_size)
            if not self.double_quant:
                return {"weight": torch.empty((n + 1) // 2, dtype=torch.uint8, **kw),
                        "absmax": torch.empty(n_blocks, **kw)}  # fmt: skip
            return {
                "weight": torch.empty((n + 1) // 2, dtype=torch.uint8, **kw),
                "absmax": torch.empty(n_blocks, dtype=torch.uint8, **kw),
                "nested_absmax": torch.empty(math.ceil(n_blocks / 256), **kw),
                "offset": torch.empty(1, **kw),
            }
        groups = n_groups(shape, self.granularity)
        if self.name in FP8_DTYPES:
            return {"weight": torch.empty(shape, dtype=FP8_DTYPES[self.name], **kw), "scale": torch.empty(groups, **kw)}
        bits = INT_BITS[self.name]
        if bits < 8:
            weight = torch.empty(packed_nbytes(n, bits), dtype=torch.uint8, **kw)  # 4-bit: (n + 1) // 2 too
        else:
            weight = torch.empty(shape, dtype=torch.int8 if self.symmetric else torch.uint8, **kw)
        tensors = {"weight": weight, "scale": torch.empty(groups, **kw)}
        if not self.symmetric:
            tensors["zero_point"] = torch.empty(groups, dtype=torch.int16, **kw)
        return tensors
