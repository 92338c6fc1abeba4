"""Quantization-aware training: train through the rounding, then store the weights for real.

Post-training quantization rounds weights that were never trained to be rounded. QAT (Jacob et al. 2018,
"Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only Inference", §3) runs
the forward pass with *fake-quantized* weights — quantized and immediately dequantized, so the model
sees exactly the values it will have after conversion — while the optimizer keeps updating full-precision
"shadow" weights. Rounding has zero gradient almost everywhere, so backward uses the straight-through
estimator (Bengio et al. 2013): d ŵ / d w := 1, i.e.

    ŵ = w + stopgrad(Q(w) - w)        forward: Q(w)     backward: ∂L/∂w = ∂L/∂ŵ

With absmax scaling no weight falls outside the representable range, so the plain (unclipped) STE is
exact about which weights can move. The fake quantizer is the storage format itself
(`WeightFormat.encode` then `decode`): int8 / int4 per channel or per group, NF4 / FP4 blockwise, with
or without double quantization — so `convert_qat` produces `QuantLinear`s whose outputs equal the
fake-quantized forward exactly, not approximately.

    model = apply_qat(model, QATConfig(format="int4", group_size=128))
    train(model, examples, TrainConfig(...))          # the linear weights train through fake quant
    model = convert_qat(model)                        # nn.Linear weights → real QuantLinear storage
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.formats.weight import FORMATS, WeightFormat
from lowbit.nn.matching import matches_any
from lowbit.nn.quant_linear import QuantLinear

CONFIG_VERSION = 1


@dataclass(frozen=True)
class QATConfig:
    """format: a lowbit weight format (int8, int4, nf4, fp4, …); group_size: int formats, values per scale
    along a row (None: one scale per output channel); block_size / double_quant: 4-bit codebook formats.
    exclude: anchored module-name patterns left in full precision (the output head by default)."""

    format: str = "int4"
    group_size: int | None = None
    block_size: int = 64
    double_quant: bool = False
    symmetric: bool = True
    exclude: tuple[str, ...] = ("lm_head",)
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        if self.version != CONFIG_VERSION:
            raise ValueError(f"QATConfig version {self.version} is not supported (this lowbit reads {CONFIG_VERSION})")
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {self.format!r}")
        object.__setattr__(self, "exclude", tuple(self.exclude))
        self.weight_format()  # validates group/block sizes now

    def weight_format(self) -> WeightFormat:
        return WeightFormat(self.format, block_size=self.block_size, double_quant=self.double_quant,
                            group_size=self.group_size, symmetric=self.symmetric)  # fmt: skip


def fake_quantize(weight: torch.Tensor, fmt: WeightFormat) -> torch.Tensor:
    """Q(w) in the forward pass, identity in the backward pass (straight-through estimator)."""
    w = weight.detach()
    q = fmt.decode(fmt.encode(w), tuple(w.shape), w.dtype)  # exactly what conversion will store
    return weight + (q - w)  # (q - w) carries no gradient: ∂/∂weight is the identity


class FakeQuantLinear(nn.Module):
    """An nn.Linear whose forward uses its fake-quantized weight; the full-precision weight trains."""

    def __init__(self, linear: nn.Linear, fmt: WeightFormat) -> None:
        super().__init__()
        self.linear, self.fmt = linear, fmt

    @property
    def in_features(self) -> int:
        return self.linear.in_features

    @property
    def out_features(self) -> int:
        return self.linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, fake_quantize(self.linear.weight, self.fmt).to(x.dtype),
                        None if self.linear.bias is None else self.linear.bias.to(x.dtype))  # fmt: skip

    def extra_repr(self) -> str:
        return f"format={self.fmt.name}, group_size={self.fmt.group_size}, block_size={self.fmt.block_size}"


def _targets(model: nn.Module, config: QATConfig) -> list[str]:
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [n for n, m in model.named_modules() if type(m) is nn.Linear and m is not out_emb
            and not matches_any(n, config.exclude)]  # fmt: skip


def apply_qat(model: nn.Module, config: QATConfig | None = None) -> nn.Module:
    """Swap every nn.Linear (but the excluded ones and the output head) for a FakeQuantLinear, in place.
    Their weights (and biases) train; the rest of the model is left as it is."""
    config = config or QATConfig()
    fmt = config.weight_format()
    names = _targets(model, config)
    if not names:
        raise ValueError("no nn.Linear layer to quantize (all excluded, or already converted)")
    for name in names:
        model.set_submodule(name, FakeQuantLinear(model.get_submodule(name), fmt))
    return model


def convert_qat(model: nn.Module, compute_dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every FakeQuantLinear by a real QuantLinear holding the quantized trained weight, in place."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)]
    if not found:
        raise ValueError("the model has no FakeQuantLinear layers (apply_qat first)")
    for name, m in found:
        model.set_submodule(name, QuantLinear.from_linear(m.linear, m.fmt, compute_dtype))
    return model
