"""SpQR: GPTQ in tiny groups with quantized statistics and sensitivity-chosen fp16 outliers.

Dettmers et al. 2023, "SpQR: A Sparse-Quantized Representation for Near-Lossless LLM Weight
Compression", §4.1–4.2 and Algorithm 1. The GPTQ column sweep (`gptq.obs_column_sweep`: inverse-Hessian
Cholesky factor U, lazy block updates, optional act-order permutation) runs with a different per-column
quantizer:

- small groups: every β1 = 16 input columns (in the sweep's order) a new min-max affine statistic pair
  (scale, zero) is fitted per output row, at `bits` (default 3) — on the current, error-updated weights;
- bi-level statistics: those (out,) scale and zero vectors are quantized at once to 3-bit codes in groups
  of β2 = 16 rows (`nn.spqr_linear.fit_statistics`), and the weights are rounded against the *decoded*
  statistics, exactly what will be stored;
- outliers by sensitivity: a weight whose quantization error, measured as GPTQ weighs it,
  ((w − ŵ) / U_ii)², exceeds τ is kept exactly (fp16) and costs no error downstream. τ is relative:
  `outlier_threshold` × the layer's mean of Var(W_:,j) / U_jj² (as the authors' code). Before fitting a
  group's statistics, the weights that would most reduce that group's error if left out (leave-one-out:
  error of the group quantized without weight k, k excluded, versus with everything) are taken out of the
  min-max fit, so that outliers do not stretch the grid for the rest (§4.2 "outlier detection").

The result is stored by `SpQRLinear` (dense bit-packed codes, bi-level statistics, CSR outliers), whose
bits/parameter the report shows (≈ 3.6 + 32 × outlier share for the defaults).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import nn

from lowbit.formats.weight import INT_BITS
from lowbit.nn.spqr_linear import (
    SCALE_FLOOR,
    SpQRFormat,
    SpQRLinear,
    dequantize_scale,
    dequantize_statistics,
    fit_statistics,
)
from lowbit.quantize.api import register_method, swap_in, target_linears
from lowbit.quantize.calibration import HessianObserver, LayerTicker, calibration_ids, calibration_steps, split_options
from lowbit.quantize.gptq import inverse_hessian_cholesky, obs_column_sweep
from lowbit.quantize.report import LayerReport


@dataclass(frozen=True)
class SpQROptions:
    """SpQR's knobs (`QuantConfig.options`); the weight bits and β1 come from QuantConfig.format / group_size."""

    stat_bits: int = 3
    stat_group_size: int = 16  # β2
    outlier_threshold: float = 0.2  # τ relative to the layer's mean sensitivity; math.inf: no outliers
    damp: float = 0.01
    block_size: int = 128
    act_order: bool = True

    def __post_init__(self) -> None:
        SpQRFormat(stat_bits=self.stat_bits, stat_group_size=self.stat_group_size)  # validates both
        t = self.outlier_threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0:
            raise ValueError(f"outlier_threshold must be a positive number (math.inf: none), got {t!r}")
        if isinstance(self.damp, bool) or not isinstance(self.damp, (int, float)) or not 0 <= self.damp < 1:
            raise ValueError(f"damp must be a number in [0, 1), got {self.damp!r}")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {self.block_size!r}")
        if not isinstance(self.act_order, bool):
            raise ValueError(f"act_order must be a bool, got {self.act_order!r}")


def _minmax_error(x: torch.Tensor, d: torch.Tensor, maxq: int) -> torch.Tensor:
    """Σ over the last dim of ((x − minmax_b(x)) / d)², with min-max statistics fitted on that dim."""
    lo, hi = x.amin(dim=-1, keepdim=True), x.amax(dim=-1, keepdim=True)
    scale = ((hi - lo) / maxq).clamp(min=SCALE_FLOOR)
    zero = -lo / scale
    q = torch.round(x / scale + zero).clamp(0, maxq)
    return ((scale * (q - zero) - x) / d).square().sum(dim=-1)


def leave_one_out_reduction(group: torch.Tensor, d: torch.Tensor, bits: int) -> torch.Tensor:
    """(out, g) weights, (g,) U diagonal → (out, g): how much the group's weighted error drops without weight k."""
    g = group.shape[1]
    if g < 2:
        return torch.zeros_like(group)
    idx = torch.arange(g, device=group.device)
    others = idx[1:] - (idx[:, None] >= idx[1:]).long()  # (g, g-1): row k lists every column but k
    base = _minmax_error(group, d, 2**bits - 1)  # (out,)
    loo = _minmax_error(group[:, others], d[others], 2**bits - 1)  # (out, g)
    return base[:, None] - loo


class _SpQRColumnQuantizer:
    """Per-column quantizer of the SpQR sweep; records codes, statistics and outliers as it goes."""

    def __init__(self, fmt: SpQRFormat, u_diag: torch.Tensor, tau: float, shape: tuple[int, int], device) -> None:
        self.fmt, self.d, self.tau = fmt, u_diag.float(), tau
        self.maxq = 2**fmt.bits - 1
        self.codes = torch.zeros(shape, dtype=torch.uint8, device=device)
        self.outliers = torch.zeros(shape, dtype=torch.bool, device=device)
        self.values = torch.zeros(shape, dtype=torch.float16, device=device)
        self.stats = {"scale": ([], []), "zero": ([], [])}  # codes and (min, step) per column group

    def _fit(self, cols: torch.Tensor, d: torch.Tensor) -> None:
        cols = cols.float()
        if math.isfinite(self.tau):  # fit the grid without the weights that will likely become outliers
            likely = leave_one_out_reduction(cols, d, self.fmt.bits) > self.tau
            keep = (~likely).float()
            mean = (cols * keep).sum(dim=1, keepdim=True) / keep.sum(dim=1, keepdim=True).clamp(min=1)
            cols = torch.where(likely, mean, cols)
        lo, hi = cols.amin(dim=1), cols.amax(dim=1)
        flat = hi == lo  # a constant row: widen to include 0 so that the constant is a grid point
        lo, hi = torch.where(flat, lo.clamp(max=0), lo), torch.where(flat, hi.clamp(min=0), hi)
        scale = ((hi - lo) / self.maxq).clamp(min=SCALE_FLOOR)
        zero = -lo / scale
        f = self.fmt
        for name, values in (("scale", scale), ("zero", zero)):
            codes, min_step = fit_statistics(values, f.stat_bits, f.stat_group_size)
            self.stats[name][0].append(codes)
            self.stats[name][1].append(min_step)
        self.scale = dequantize_scale(self.stats["scale"][0][-1], self.stats["scale"][1][-1], f.stat_group_size)
        self.zero = dequantize_statistics(self.stats["zero"][0][-1], self.stats["zero"][1][-1], f.stat_group_size)

    def __call__(self, i: int, wt: torch.Tensor) -> torch.Tensor:
        g = self.fmt.group_size
        if i % g == 0:
            self._fit(wt[i : i + g].t(), self.d[i : i + g])
        w = wt[i].float()
        q = torch.round(w / self.scale + self.zero).clamp(0, self.maxq)
        w_hat = self.scale * (q - self.zero)
        if math.isfinite(self.tau):
            outlier = ((w - w_hat) / self.d[i]).square() > self.tau
            exact = w.half()
            w_hat = torch.where(outlier, exact.float(), w_hat)  # stored exactly: no error to spread
            self.outliers[:, i] = outlier
            self.values[:, i] = torch.where(outlier, exact, torch.zeros_like(exact))
        self.codes[:, i] = q.to(torch.uint8)
        return w_hat.to(wt.dtype)

    def statistics(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """((G, out) codes, (G, S, 2) fp16) of the scales or zero points."""
        codes, min_step = self.stats[name]
        return torch.stack(codes), torch.stack(min_step)


@dataclass
class SpQRResult:
    fmt: SpQRFormat
    codes: torch.Tensor  # (out, in) uint8, stored column order
    scale: tuple[torch.Tensor, torch.Tensor]  # (G, out) codes, (G, S, 2) fp16
    zero: tuple[torch.Tensor, torch.Tensor]
    outliers: torch.Tensor  # (out, in) bool, stored column order
    values: torch.Tensor  # (out, in) fp16, the outliers' exact values (0 elsewhere)
    perm: torch.Tensor | None
    weight: torch.Tensor  # (out, in) float32, the decoded weight in the original column order


def spqr_quantize(weight: torch.Tensor, hessian: torch.Tensor, fmt: SpQRFormat = SpQRFormat(),
                  options: SpQROptions = SpQROptions()) -> SpQRResult:  # fmt: skip
    """Algorithm 1 of the paper on one (out, in) weight with its (in, in) Hessian."""
    if hessian.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(f"Hessian {tuple(hessian.shape)} does not match weight {tuple(weight.shape)}")
    if not torch.isfinite(hessian).all() or not torch.isfinite(weight).all():
        raise ValueError("SpQR needs a finite weight and Hessian (the calibration data produced NaN or inf)")
    perm = torch.argsort(torch.diagonal(hessian), descending=True, stable=True) if fmt.act_order else None
    w = weight.detach().float().clone()
    if perm is not None:
        w = w[:, perm]
    u = inverse_hessian_cholesky(hessian, options.damp, perm)
    d = torch.diagonal(u)
    tau = math.inf
    if math.isfinite(options.outlier_threshold) and w.shape[0] > 1:
        tau = options.outlier_threshold * float((w.var(dim=0) / d.square()).mean())
    quantizer = _SpQRColumnQuantizer(fmt, d, tau, tuple(w.shape), w.device)
    w = obs_column_sweep(w, u, options.block_size, quantizer)
    if perm is not None:
        unpermuted = torch.empty_like(w)
        unpermuted[:, perm] = w
        w = unpermuted
    return SpQRResult(fmt, quantizer.codes, quantizer.statistics("scale"), quantizer.statistics("zero"),
                      quantizer.outliers, quantizer.values, perm, w)  # fmt: skip


def spqr_linear(linear: nn.Linear, hessian: torch.Tensor, fmt: SpQRFormat = SpQRFormat(),
                options: SpQROptions = SpQROptions(),
                compute_dtype: torch.dtype | None = None) -> SpQRLinear:  # fmt: skip
    r = spqr_quantize(linear.weight, hessian, fmt, options)
    return SpQRLinear.from_parts(linear, fmt, r.codes, r.scale, r.zero, r.outliers, r.values, r.perm, compute_dtype)


@register_method("spqr")
def quantize_spqr(model, config, targets, calibration=None, tokenizer=None) -> list[LayerReport]:
    """`lowbit.quantize(model, QuantConfig(method="spqr", format="int3", group_size=16), calibration=…)`.

    The base weights are min-max affine (scale and zero point) whatever `QuantConfig.symmetric` says,
    as in the paper.
    """
    options, calib = split_options(config.options, SpQROptions, "spqr")
    if config.format not in INT_BITS:
        raise ValueError(f"spqr's base weights are integers: format must be one of {sorted(INT_BITS)}, "
                         f"got {config.format!r}")  # fmt: skip
    fmt = SpQRFormat(INT_BITS[config.format], config.group_size or 16, options.stat_bits, options.stat_group_size,
                     options.act_order)  # fmt: skip
    ticker = LayerTicker(targets)
    names = target_linears(model, config)
    if not names:
        return []
    ids = calibration_ids(calibration, tokenizer, calib, "spqr")
    reports = []
    for step in calibration_steps(model, ids, names):
        layers = {n: model.get_submodule(n) for n in step.names}
        observers = step.observe(layers, lambda n, m: HessianObserver(n, m.in_features, m.weight.device))
        for name, linear in layers.items():
            module = spqr_linear(linear, observers.pop(name).hessian(), fmt, options, config.torch_compute_dtype)
            share = module.n_outliers / (linear.in_features * linear.out_features)
            reports.append(replace(swap_in(model, name, linear, module), outlier_share=share))
            ticker.done()
    return reports
