"""Quantization-error report: which layers a quantized model got wrong, and why — a table and a plot.

For each quantized layer (a `QuantLinear` in the quantized model, the ``nn.Linear`` of the same name in the
reference model), with W the original and Ŵ the dequantized weight:

    relative error      ‖W − Ŵ‖_F / ‖W‖_F
    outlier share       fraction of weights with |w − mean| > k·std  (k = ``outlier_sigma``, default 3; a Gaussian
                        layer has 0.27%; heavy tails — the outliers LLM.int8 and SpQR single out — show more)
    outlier error share fraction of the squared error ‖W − Ŵ‖² that falls on those outlier weights
    bits                storage bits per weight (codes, scales and nested constants)

Absmax formats give large weights a large scale: the outliers themselves are represented well, but they
stretch their block's grid and the ordinary weights around them lose precision. A layer with high relative
error and a high outlier share is the usual culprit when a quantized model misbehaves.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lowbit.nn.quant_linear import QuantLinear


@dataclass
class LayerError:
    name: str
    shape: tuple[int, int]
    format: str
    bits: float
    relative_error: float
    outlier_share: float
    outlier_error_share: float
    max_abs_error: float


@dataclass
class ErrorReport:
    layers: list[LayerError] = field(default_factory=list)
    outlier_sigma: float = 3.0

    def worst(self, n: int = 5) -> list[LayerError]:
        return sorted(self.layers, key=lambda r: -r.relative_error)[:n]

    def to_markdown(self) -> str:
        lines = ["| layer | shape | format | bits | rel. error | outliers | outlier error share | max abs error |",
                 "|---|---|---|---:|---:|---:|---:|---:|"]  # fmt: skip
        for r in self.layers:
            lines.append(f"| {r.name} | {r.shape[0]}×{r.shape[1]} | {r.format} | {r.bits:.3f} | "
                         f"{r.relative_error:.4f} | {r.outlier_share:.2%} | {r.outlier_error_share:.1%} | "
                         f"{r.max_abs_error:.3g} |")  # fmt: skip
        return "\n".join(lines)

    def plot(self, path: str | os.PathLike, title: str = "quantization error per layer") -> Path:
        """Write a PNG: relative error per layer (bars coloured by bits/weight) over the outlier shares."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure  # no pyplot: no global figure state, no display needed

        if not self.layers:
            raise ValueError("the report has no layers to plot")
        names = [r.name for r in self.layers]
        x = range(len(names))
        fig = Figure(figsize=(max(6.0, 0.25 * len(names) + 2), 6), layout="constrained")
        FigureCanvasAgg(fig)
        top, bottom = fig.subplots(2, 1, sharex=True)
        bits = [r.bits for r in self.layers]
        bars = top.bar(x, [r.relative_error for r in self.layers], color=_colors(bits))
        top.set_ylabel("relative error ‖W−Ŵ‖/‖W‖")
        top.set_title(title)
        for bar, b in zip(bars, bits):
            bar.set_label(f"{b:.2f} bits")
        handles = {h.get_label(): h for h in bars}  # one legend entry per distinct bit width
        top.legend(handles.values(), handles.keys(), fontsize="small")
        bottom.bar(x, [100 * r.outlier_share for r in self.layers], color="tab:gray", label="weights beyond "
                   f"{self.outlier_sigma:g}σ (%)")  # fmt: skip
        bottom.plot(x, [100 * r.outlier_error_share for r in self.layers], "o-", color="tab:red",
                    label="their share of the squared error (%)")  # fmt: skip
        bottom.set_ylabel("%")
        bottom.legend(fontsize="small")
        bottom.set_xticks(list(x), names, rotation=90, fontsize="x-small")
        path = Path(path)
        fig.savefig(path, dpi=100, format="png")
        return path


def _colors(bits: list[float]) -> list:
    from matplotlib import colormaps

    lo, hi = min(bits), max(bits)
    cmap = colormaps["viridis"]
    return [cmap(0.5 if hi == lo else (b - lo) / (hi - lo)) for b in bits]


def layer_error(name: str, w: torch.Tensor, w_hat: torch.Tensor, fmt: str, bits: float, sigma: float) -> LayerError:
    w, w_hat = w.double(), w_hat.double()
    err = w - w_hat
    outliers = (w - w.mean()).abs() > sigma * w.std()
    sq = err.square()
    return LayerError(
        name=name, shape=tuple(w.shape), format=fmt, bits=bits,
        relative_error=float(err.norm() / w.norm().clamp(min=1e-300)),
        outlier_share=float(outliers.double().mean()),
        outlier_error_share=float(sq[outliers].sum() / sq.sum().clamp(min=1e-300)),
        max_abs_error=float(err.abs().max()),
    )  # fmt: skip


def quantization_error_report(reference: nn.Module, quantized: nn.Module, outlier_sigma: float = 3.0) -> ErrorReport:
    """Compare every QuantLinear of ``quantized`` with the same-named ``nn.Linear`` of ``reference``."""
    if outlier_sigma <= 0:
        raise ValueError(f"outlier_sigma must be > 0, got {outlier_sigma}")
    ref_modules = dict(reference.named_modules())
    report = ErrorReport(outlier_sigma=outlier_sigma)
    for name, q in quantized.named_modules():
        if not isinstance(q, QuantLinear):
            continue
        ref = ref_modules.get(name)
        if not isinstance(ref, nn.Linear) or tuple(ref.weight.shape) != (q.out_features, q.in_features):
            shape = (q.out_features, q.in_features)
            raise ValueError(f"the reference model has no nn.Linear {name!r} of shape {shape}")
        with torch.no_grad():
            report.layers.append(layer_error(name, ref.weight, q.dequantize(torch.float32), q.fmt.name,
                                             q.bits_per_parameter(), outlier_sigma))  # fmt: skip
    if not report.layers:
        raise ValueError("the quantized model has no QuantLinear layers")
    return report


def error_report_for(model: nn.Module, config, outlier_sigma: float = 3.0, **quantize_kwargs) -> ErrorReport:
    """Quantize a copy of ``model`` with ``config`` (a QuantConfig) and report its error; ``model`` is untouched."""
    import copy

    from lowbit.quantize import quantize

    quantized = copy.deepcopy(model)
    quantize(quantized, config, **quantize_kwargs)
    return quantization_error_report(model, quantized, outlier_sigma)
