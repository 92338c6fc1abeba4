"""Sparsity accounting: how many weights of each linear layer are exactly zero."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from lowbit.nn.matching import matches_any

DEFAULT_EXCLUDE = ("lm_head",)  # the output projection is tied to the embeddings in many models


@dataclass
class LayerSparsity:
    name: str
    shape: tuple[int, ...]
    zeros: int

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def sparsity(self) -> float:
        return self.zeros / self.numel


@dataclass
class PruneReport:
    method: str
    layers: list[LayerSparsity] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)  # e.g. perplexity before / after

    @property
    def sparsity(self) -> float:
        """Zeros over all targeted weights."""
        total = sum(layer.numel for layer in self.layers)
        return sum(layer.zeros for layer in self.layers) / max(total, 1)

    def to_markdown(self) -> str:
        lines = ["| layer | shape | zeros | sparsity |", "|---|---|---:|---:|"]
        for r in self.layers:
            lines.append(f"| {r.name} | {'×'.join(map(str, r.shape))} | {r.zeros:,} | {r.sparsity:.1%} |")
        lines.append(f"| **all** | | {sum(r.zeros for r in self.layers):,} | **{self.sparsity:.1%}** |")
        return "\n".join(lines)

    def __str__(self) -> str:
        extra = "".join(f", {k} {v:.4g}" for k, v in self.metrics.items())
        return f"{self.method}: {len(self.layers)} linear layers, sparsity {self.sparsity:.1%}{extra}"


def target_linears(model: nn.Module, include=("*",), exclude=DEFAULT_EXCLUDE) -> list[tuple[str, nn.Linear]]:
    """The ``nn.Linear`` layers selected by anchored name patterns (`lowbit.nn.matching`)."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and matches_any(n, include) and not matches_any(n, exclude)]  # fmt: skip


def sparsity_report(model: nn.Module, include=("*",), exclude=DEFAULT_EXCLUDE, method: str = "sparsity") -> PruneReport:
    """Count the zero weights of every targeted linear layer."""
    report = PruneReport(method)
    for name, layer in target_linears(model, include, exclude):
        w = layer.weight.detach()
        report.layers.append(LayerSparsity(name, tuple(w.shape), int((w == 0).sum())))
    return report


def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Zero every weight whose mask entry is False (masks: layer name → bool tensor shaped like its weight)."""
    with torch.no_grad():
        for name, mask in masks.items():
            weight = model.get_submodule(name).weight
            weight.mul_(mask.to(weight.device, weight.dtype))
