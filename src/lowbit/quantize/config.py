"""QuantConfig: what to quantize in a model, into which format, by which algorithm."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import torch

from lowbit.formats.weight import WeightFormat

CONFIG_VERSION = 1
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class QuantConfig:
    """Quantize every targeted `nn.Linear` of a model.

    method: the algorithm choosing the quantized values ("rtn" = round to nearest; others register
        themselves in `lowbit.quantize`).
    format: nf4 | fp4 | e2m1 (4-bit codebooks, blockwise absmax) | int2 | int3 | int4 | int8 | fp8_e4m3 |
        fp8_e5m2.
    block_size, double_quant: for the 4-bit codebook formats (QLoRA defaults: 64, True).
    group_size, symmetric: for int/fp8 (None = one scale per output row).
    compute_dtype: dtype of the matmul ("float32", "bfloat16", "float16"), or "auto": each layer's own
        weight dtype (a bf16 model computes in bf16, as the unquantized model did; fp32 for other dtypes).
    include / exclude: anchored module-name patterns (see `lowbit.nn.matching`); lm_head is excluded
        by default because the output projection is the most error-sensitive layer (and is often tied
        to the embeddings, which are not linear layers and never quantized here).
    """

    method: str = "rtn"
    format: str = "nf4"
    block_size: int = 64
    double_quant: bool = True
    group_size: int | None = None
    symmetric: bool = True
    compute_dtype: str = "auto"
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ("lm_head",)
    version: int = CONFIG_VERSION
    options: dict = field(default_factory=dict)  # method-specific settings (e.g. GPTQ damping)

    def __post_init__(self) -> None:
        if isinstance(self.compute_dtype, torch.dtype):
            names = {v: k for k, v in DTYPES.items()}
            if self.compute_dtype not in names:
                raise ValueError(f"compute_dtype must be one of {list(DTYPES)}, got {self.compute_dtype}")
            object.__setattr__(self, "compute_dtype", names[self.compute_dtype])
        if self.compute_dtype not in DTYPES and self.compute_dtype != "auto":
            raise ValueError(f"compute_dtype must be 'auto' or one of {list(DTYPES)}, got {self.compute_dtype!r}")
        for name in ("include", "exclude"):
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))
        if self.version != CONFIG_VERSION:
            raise ValueError(f"QuantConfig version {self.version} is not supported (this lowbit reads {CONFIG_VERSION})")
        self.weight_format  # validates the format fields

    @property
    def weight_format(self) -> WeightFormat:
        return WeightFormat(self.format, self.block_size, self.double_quant, self.group_size, self.symmetric)

    @property
    def torch_compute_dtype(self) -> torch.dtype | None:
        """The matmul dtype; None for "auto" (the layer constructors then take the weight's dtype)."""
        return DTYPES.get(self.compute_dtype)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["include"], d["exclude"] = list(self.include), list(self.exclude)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> QuantConfig:
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown QuantConfig field(s): {sorted(unknown)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)
