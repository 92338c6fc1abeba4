"""GPTQ: column-by-column quantization with inverse-Hessian error feedback (Frantar et al. 2023).

For a linear layer with calibration inputs X (N tokens × in), GPTQ minimises ‖XWᵀ − XŴᵀ‖² row by row
(eq. 1). With H = 2XᵀX (the layer-wise Hessian, eq. 2) it quantizes one input column at a time and
moves that column's error onto the columns not yet quantized (the OBS update, eq. 3):

    e = (w_i − q(w_i)) / [U]_ii,      W[:, i+1:] −= e · U[i, i+1:],

where U is the upper Cholesky factor of H⁻¹ (§4 "Cholesky reformulation": rows of U hold exactly the
updates the sequential inverse-Hessian eliminations would give, computed once and stably). Step 2 of
§4 ("lazy batch updates") applies the updates inside a block of `block_size` columns at once and the
block's accumulated error to the rest with one matmul. Dampening adds `damp · mean(diag H)` to the
diagonal (§4 step 3), which also makes a singular H (too few tokens, constant features) invertible.

Options: group_size (a new scale/zero every `group_size` columns, fitted on the current, already
updated weights when the group starts), act_order ("desc_act": columns in order of decreasing diag H;
with groups the storage keeps that order, see `ActOrderQuantLinear`), any int2/int3/int4/int8 format,
symmetric or affine. Levels follow the format's own rounding rule (formats/scaled.py), so a GPTQ layer is
a plain QuantLinear with the format's storage. Input channels that calibration never excites (a zero
diagonal) are quantized by plain rounding rather than zeroed as in the reference code: a small calibration
set must not erase weights that real inputs use.

The 4-bit codebook formats (NF4, FP4) get the same sweep through `gptq_codebook_quantize`: each block's
absmax is fixed first from the weight to be quantized (what round-to-nearest would store, double
quantization included: AutoGPTQ's "static groups"), then the sweep picks the nearest code of every column
against those fixed scales, so the stored codes and scales decode to exactly the weight the sweep produced.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lowbit.formats.blockwise import pack_4bit
from lowbit.formats.codebooks import get_codebook, nearest_code
from lowbit.formats.granularity import Granularity
from lowbit.formats.scaled import ScaledTensor, int_range, quantize_int
from lowbit.formats.weight import INT_BITS, WeightFormat
from lowbit.nn.act_order_linear import ActOrderQuantLinear
from lowbit.nn.quant_linear import QuantLinear
from lowbit.quantize.api import register_method, swap_in, target_linears
from lowbit.quantize.calibration import (
    HessianObserver,
    LayerTicker,
    calibration_ids,
    calibration_steps,
    split_options,
)
from lowbit.quantize.report import LayerReport


@dataclass(frozen=True)
class GPTQOptions:
    """GPTQ's knobs (`QuantConfig.options`, next to the calibration options n_samples / seq_len / seed)."""

    damp: float = 0.01  # fraction of mean(diag H) added to the diagonal
    block_size: int = 128  # columns per lazy batch update (changes speed, not the result)
    act_order: bool = False  # quantize columns by decreasing Hessian diagonal

    def __post_init__(self) -> None:
        if isinstance(self.damp, bool) or not isinstance(self.damp, (int, float)) or not 0 <= self.damp < 1:
            raise ValueError(f"damp must be a number in [0, 1), got {self.damp!r}")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {self.block_size!r}")
        if not isinstance(self.act_order, bool):
            raise ValueError(f"act_order must be a bool, got {self.act_order!r}")


def inverse_hessian_cholesky(hessian: torch.Tensor, damp: float, perm: torch.Tensor | None = None,
                             dtype: torch.dtype = torch.float32) -> torch.Tensor:  # fmt: skip
    """U, upper triangular with Uᵀ U = (H + λI)⁻¹ (in the permuted order), λ = damp · mean(diag H).

    Channels with a zero diagonal get 1 there (their weights do not affect the calibration outputs, so
    they are rounded without spreading error). The factorisations run in `dtype` (float32, as GPTQ's
    reference, is 2-3× faster than float64 on CPU) and are retried in float64 if float32 fails.
    """
    h = hessian.detach().double().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    if perm is not None:
        h = h[perm][:, perm]
    idx = torch.arange(h.shape[0], device=h.device)
    h[idx, idx] += damp * torch.diagonal(h).mean()
    for attempt in dict.fromkeys((dtype, torch.float64)):
        chol, info = torch.linalg.cholesky_ex(h.to(attempt))
        if info.item() == 0:
            u, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(chol), upper=True)
            if info.item() == 0 and torch.isfinite(u).all():
                return u
    raise ValueError(f"the calibration Hessian is not positive definite even after dampening (damp={damp}); "
                     f"use a larger damp or more calibration data")


def obs_column_sweep(weight: torch.Tensor, u: torch.Tensor, block_size: int, quantize_column) -> torch.Tensor:
    """GPTQ's Algorithm 1 on `weight` (out, in) float; returns the quantized (dequantized) weight (out, in).

    `quantize_column(i, wt)` returns column i's quantized value (out,); `wt` is the working weight
    transposed, (in, out), so that it may read rows `wt[i:]` (the current, error-updated columns) to fit
    group statistics. The sweep works on that transposed copy: a column of W is then a contiguous row,
    which makes the rank-1 updates several times faster than on strided columns.
    """
    wt = weight.detach().t().contiguous()  # (in, out)
    n = wt.shape[0]
    u = u.to(wt.dtype)
    for b0 in range(0, n, block_size):
        b1 = min(b0 + block_size, n)
        err = torch.zeros(b1 - b0, wt.shape[1], dtype=wt.dtype, device=wt.device)  # (B, out)
        for i in range(b0, b1):
            q = quantize_column(i, wt)
            e = (wt[i] - q) / u[i, i]
            wt[i] = q
            wt[i + 1 : b1].addr_(u[i, i + 1 : b1], e, alpha=-1)  # eq. 3 inside the block
            err[i - b0] = e
        wt[b1:].addmm_(u[b0:b1, b1:].t(), err, alpha=-1)  # the block's lazy batch update
    return wt.t()


class _GroupIntQuantizer:
    """Rounds columns to a format's integer levels, refitting scale/zero at every group start."""

    def __init__(self, fmt: WeightFormat, weight: torch.Tensor) -> None:
        self.bits, self.symmetric, self.group = INT_BITS[fmt.name], fmt.symmetric, fmt.group_size
        self.qmin, self.qmax = int_range(self.bits, self.symmetric)
        self.levels = torch.zeros(weight.shape, dtype=torch.int16, device=weight.device)
        self.scales, self.zeros = [], []
        if self.group is None:  # one scale per row, from the whole row (order-independent)
            self._fit(weight)

    def _fit(self, cols: torch.Tensor) -> None:
        q = quantize_int(cols, self.bits, self.symmetric, Granularity("row"))  # the format's own rule
        self.scale = q.scale  # (out,)
        self.zero = q.zero_point.float() if q.zero_point is not None else torch.zeros_like(q.scale)
        self.scales.append(q.scale)
        self.zeros.append(q.zero_point)

    def __call__(self, i: int, wt: torch.Tensor) -> torch.Tensor:
        if self.group is not None and i % self.group == 0:
            self._fit(wt[i : i + self.group].t())
        q = (torch.round(wt[i] / self.scale) + self.zero).clamp_(self.qmin, self.qmax)  # float64 stays float64
        self.levels[:, i] = q
        return (self.scale * (q - self.zero)).to(wt.dtype)

    def scaled_tensor(self, levels: torch.Tensor) -> ScaledTensor:
        """The chosen levels (out, in) with their statistics, in `to_groups` order (row-major groups)."""
        scale = torch.stack(self.scales, dim=1).reshape(-1)  # (out · G,)
        zero = None if self.symmetric else torch.stack(self.zeros, dim=1).reshape(-1)
        dtype = torch.uint8 if not self.symmetric and self.bits == 8 else torch.int8
        granularity = Granularity("row") if self.group is None else Granularity("group", self.group)
        return ScaledTensor(levels.to(dtype), scale, zero, "int", self.bits, granularity, torch.float32)


@dataclass
class GPTQResult:
    quantized: ScaledTensor  # levels + statistics, columns in stored order
    perm: torch.Tensor | None  # act-order with groups: stored column i is input column perm[i]
    weight: torch.Tensor  # (out, in) the dequantized result in the original column order


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, fmt: WeightFormat,
                  options: GPTQOptions = GPTQOptions()) -> GPTQResult:  # fmt: skip
    """Quantize one (out, in) weight with its (in, in) Hessian into `fmt` (an int format)."""
    if fmt.name not in INT_BITS:
        raise ValueError(f"GPTQ chooses integer levels: format must be one of {sorted(INT_BITS)}, got {fmt.name!r}")
    _check_hessian(weight, hessian)
    perm = torch.argsort(torch.diagonal(hessian), descending=True, stable=True) if options.act_order else None
    w = weight.detach().to(torch.float64 if weight.dtype == torch.float64 else torch.float32).clone()
    if perm is not None:
        w = w[:, perm]
    u = inverse_hessian_cholesky(hessian, options.damp, perm, w.dtype)
    quantizer = _GroupIntQuantizer(fmt, w)
    w = obs_column_sweep(w, u, options.block_size, quantizer)
    levels = quantizer.levels
    if perm is not None:
        unpermuted = torch.empty_like(w)
        unpermuted[:, perm] = w
        w = unpermuted
        if fmt.group_size is None:  # per-row statistics do not depend on the order: store unpermuted
            original = torch.empty_like(levels)
            original[:, perm] = levels
            levels, perm = original, None
    return GPTQResult(quantizer.scaled_tensor(levels), perm, w)


def _check_hessian(weight: torch.Tensor, hessian: torch.Tensor) -> None:
    if hessian.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(f"Hessian {tuple(hessian.shape)} does not match weight {tuple(weight.shape)}")
    if not torch.isfinite(hessian).all():
        raise ValueError("the calibration Hessian contains NaN or inf")


def gptq_codebook_quantize(
    weight: torch.Tensor, hessian: torch.Tensor, fmt: WeightFormat, options: GPTQOptions = GPTQOptions()
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """GPTQ for a 4-bit codebook format: (storage tensors of `fmt`, the (out, in) float32 weight they decode to).

    The scales are fixed before the sweep, so a block may even span two rows (blocks run over the
    flattened weight); act-order is refused, as it would store the columns in another order.
    """
    if not fmt.is_codebook:
        raise ValueError(f"gptq_codebook_quantize takes a 4-bit codebook format (nf4, fp4, e2m1), got {fmt.name!r}")
    _check_hessian(weight, hessian)
    if options.act_order:
        raise ValueError("act_order is not supported for codebook formats (blocks follow the stored column order)")
    w = weight.detach().float()
    shape = tuple(w.shape)
    storage = fmt.encode(w)  # round-to-nearest storage: its block scales are the ones the sweep keeps
    block_scales = fmt.quant_state(storage, shape).block_absmax()  # (n_blocks,) as decoding uses them
    block_of = torch.arange(w.numel(), device=w.device).view(shape) // fmt.block_size
    scales_t = block_scales[block_of].t().contiguous()  # (in, out): row i holds column i's scales
    inverse_t = torch.where(scales_t != 0, 1.0 / scales_t, torch.zeros_like(scales_t))
    codebook = get_codebook(fmt.name, w.device)
    codes = torch.zeros(shape, dtype=torch.uint8, device=w.device)

    def quantize_column(i: int, wt: torch.Tensor) -> torch.Tensor:
        code = nearest_code((wt[i] * inverse_t[i]).clamp_(-1, 1), codebook)  # (out,)
        codes[:, i] = code.to(torch.uint8)
        return codebook[code] * scales_t[i]  # exactly what decoding multiplies out

    u = inverse_hessian_cholesky(hessian, options.damp, None, torch.float32)
    w_hat = obs_column_sweep(w.clone(), u, options.block_size, quantize_column)
    flat = codes.reshape(-1)
    if flat.numel() % 2:  # the spare nibble holds the code of 0.0, as quantize_4bit does
        flat = torch.cat([flat, nearest_code(flat.new_zeros(1, dtype=torch.float32), codebook).to(torch.uint8)])
    storage["weight"] = pack_4bit(flat)
    return storage, w_hat


def gptq_linear(linear: nn.Linear, hessian: torch.Tensor, fmt: WeightFormat, options: GPTQOptions = GPTQOptions(),
                compute_dtype: torch.dtype | None = None) -> QuantLinear:  # fmt: skip
    """A QuantLinear (ActOrderQuantLinear for act-order with groups) holding GPTQ's choice for `linear`."""
    result = gptq_quantize(linear.weight, hessian, fmt, options)
    storage = fmt.encode_int(result.quantized)
    if result.perm is not None:
        return ActOrderQuantLinear.from_permuted_storage(linear, storage, fmt, result.perm, compute_dtype)
    return QuantLinear.from_storage(linear, storage, fmt, compute_dtype)


@register_method("gptq")
def quantize_gptq(model, config, targets, calibration=None, tokenizer=None) -> list[LayerReport]:
    """`lowbit.quantize(model, QuantConfig(method="gptq", format="int4", group_size=128), calibration=…)`."""
    options, calib = split_options(config.options, GPTQOptions, "gptq")
    fmt = config.weight_format
    if fmt.name not in INT_BITS:
        raise ValueError(f"GPTQ chooses integer levels: format must be one of {sorted(INT_BITS)}, got {fmt.name!r}")
    ticker = LayerTicker(targets)
    names = target_linears(model, config)
    if not names:
        return []
    ids = calibration_ids(calibration, tokenizer, calib, "gptq")
    reports = []
    for step in calibration_steps(model, ids, names):
        layers = {n: model.get_submodule(n) for n in step.names}
        observers = step.observe(layers, lambda n, m: HessianObserver(n, m.in_features, m.weight.device))
        for name, linear in layers.items():
            module = gptq_linear(linear, observers.pop(name).hessian(), fmt, options, config.torch_compute_dtype)
            reports.append(swap_in(model, name, linear, module))
            ticker.done()
    return reports
