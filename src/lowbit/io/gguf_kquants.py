"""GGUF K-quants (Q4_K, Q5_K, Q6_K) in vectorised PyTorch, bit-compatible with ggml's block layout.

Super-blocks of QK_K = 256 weights along a row (so a row must be a multiple of 256 long):

    Q4_K  8 sub-blocks of 32, w ≈ d·sc_j·q − dmin·m_j, q ∈ [0, 15]        144 bytes = 4.5 bits/weight
          d, dmin fp16; sc_j, m_j 6-bit, packed into 12 bytes; two 4-bit q per byte
    Q5_K  the same with q ∈ [0, 31]: the fifth bits in 32 extra bytes    176 bytes = 5.5 bits/weight
    Q6_K  16 sub-blocks of 16, w ≈ d·sc_j·(q − 32), q ∈ [0, 63]           210 bytes = 6.5625 bits/weight
          d fp16, sc_j int8; low 4 bits of q in 128 bytes, high 2 bits in 64

How the values are chosen follows ggml's reference quantizers (ggml-quants.c, learned from the source and
re-derived here over whole tensors at once instead of block by block):

* Q4_K/Q5_K sub-block fit (ggml's make_qkx2_quants): w ≈ s·L + m with m ≤ 0. Start from the min/max grid
  (s = (max − min)/nmax); then for nstep+1 slightly stretched grids (iscale = (nmax + rmin + k·rdelta)/(max − min))
  round L, solve weighted least squares for (s, m) in closed form, and keep the candidate with the smallest
  weighted squared error. Weights are |x| + rms(sub-block) without an importance matrix.
* The 8 sub-block scales and mins are then quantized to 6 bits against the super-block's largest
  (d = max/63, dmin = max_min/63, both fp16), and every weight is re-rounded against the stored scale.
* Q6_K sub-block fit (make_qx_quants, rmse_type 1): symmetric grid through the largest-magnitude value
  (which lands on −32), 18 perturbed grids iscale = −(32 + 0.1·k)/max, k = ±1…±9, each scored by the
  weighted least-squares gain (Σw·x·L)²/Σw·L² with w = x²; the 16 scales are stored as int8 against the
  largest one (d = −max_scale/128, fp16).
* With an importance matrix (llama.cpp's imatrix: per input column, e.g. mean x² of the activations) the
  weights become imp_i·√(σ² + x_i²), σ² = 2·mean(x²) over the super-block, the grid search widens
  (rmin −0.9, rdelta 0.05, 37 grids) and the 6-bit scales/mins come from ggml's make_qp_quants (weighted grid
  search plus coordinate descent) instead of plain rounding. Q6_K uses the importances as its weights directly.

Arithmetic is float32 like ggml's. Sums run in a different order (vectorised), and the candidate errors use
the closed form Σw(sL + m − x)² = s²Σwl² + 2smΣwl − 2sΣwlx + m²Σw − 2mΣwx + Σwx²,
so a near-tie between two candidates can resolve the other way than ggml does: the chosen values differ in
rare sub-blocks, with the same error to float precision. Everything after the fit (scale quantization,
re-rounding, packing) is exact.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

QK_K = 256
KQUANT_TYPES = ("q4_k", "q5_k", "q6_k")
TYPE_SIZES = {"q4_k": 144, "q5_k": 176, "q6_k": 210}  # bytes per super-block of 256 weights
GROUP_MAX_EPS = 1e-15  # ggml: a Q6_K sub-block (or super-block) whose largest |value| is below this is zero
ROWS_ELEMENTS = 1 << 18  # weights per chunk of rows (amortises the sequential scale fit of the imatrix path)
SLICE = 4096  # sub-blocks per candidate search: (SLICE, ≤38, 32) temporaries of a few MB


class KQuantized(NamedTuple):
    data: np.ndarray  # (rows, row_bytes) uint8, what the GGUF writer stores with raw_dtype Q4_K/Q5_K/Q6_K
    values: torch.Tensor  # (rows, cols) float32: the weights those bytes decode to (gguf's dequantizer agrees)


def _f32(v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float32)


def _fp16(t: torch.Tensor) -> torch.Tensor:
    """Round to fp16 and back (GGML_FP32_TO_FP16 rounds to nearest even, as .half() does)."""
    return t.half().float()


# --- sub-block fits ---------------------------------------------------------------------------------------------


def _in_slices(fit):
    """Run a sub-block fit over SLICE sub-blocks at a time (same results, cache-sized temporaries)."""

    def sliced(x, w, *args):
        if x.shape[0] <= SLICE:
            return fit(x, w, *args)
        parts = [fit(x[i : i + SLICE], None if w is None else w[i : i + SLICE], *args)
                 for i in range(0, x.shape[0], SLICE)]  # fmt: skip
        return tuple(torch.cat(p) for p in zip(*parts))

    return sliced


@_in_slices
def fit_min_scale(x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int):
    """ggml's make_qkx2_quants over every sub-block at once. x, w: (B, n) → scale (B,), min (B,) ≥ 0, L (B, n).

    The model is x ≈ scale·L − min with L ∈ [0, nmax]; the grid through [min(x, 0), max(x)] and nstep+1
    stretched grids are each least-squares fitted, the smallest weighted squared error wins (first on ties).
    """
    lo = x.amin(-1).clamp(max=0)  # (B,)  ggml keeps the min ≤ 0: zero is always representable
    hi = x.amax(-1)
    span = hi - lo
    flat = span == 0  # a constant block (≤ 0): scale 0, everything is the min
    span = torch.where(flat, torch.ones_like(span), span)
    stretch = (_f32(rmin) + _f32(rdelta) * torch.arange(nstep + 1, dtype=torch.float32)) + nmax  # (C,)
    iscale = torch.cat([nmax / span[:, None], stretch / span[:, None]], dim=1)  # (B, C+1): the plain grid first
    shifted = x - lo[:, None]  # (B, n)
    levels = torch.mul(iscale[:, :, None], shifted[:, None, :]).round_().clamp_(0, nmax)  # (B, C+1, n)
    sum_w, sum_x, sum_x2 = w.sum(-1)[:, None], (w * x).sum(-1)[:, None], (w * x * x).sum(-1)[:, None]
    # The per-candidate sums as batched mat-vecs (far fewer passes over the (B, C+1, n) tensor than w·L, …):
    sum_l, sum_xl = torch.bmm(levels, torch.stack([w, w * x], dim=2)).unbind(2)  # Σw·L, Σw·x·L: (B, C+1)
    sum_l2 = torch.bmm(levels.square_(), w[:, :, None])[:, :, 0]  # Σw·L² (levels is spent)
    det = sum_w * sum_l2 - sum_l * sum_l
    scale = (sum_w * sum_xl - sum_x * sum_l) / det
    offset = (sum_l2 * sum_x - sum_l * sum_xl) / det  # the additive term, ≤ 0 once clamped
    positive = offset > 0  # a positive offset is not storable: refit the scale alone through zero
    scale = torch.where(positive, sum_xl / sum_l2, scale)
    offset = torch.where(positive, torch.zeros_like(offset), offset)
    scale[:, 0], offset[:, 0] = 1 / iscale[:, 0], lo  # the plain grid is scored as it stands, not refitted
    err = (scale * scale * sum_l2 + 2 * scale * offset * sum_l - 2 * scale * sum_xl
           + offset * offset * sum_w - 2 * offset * sum_x + sum_x2)  # fmt: skip
    valid = det > 0
    valid[:, 0] = True
    err = torch.where(valid & torch.isfinite(err), err, torch.full_like(err, float("inf")))
    best = err.argmin(-1, keepdim=True)  # (B, 1): first minimum = ggml's "strictly better" update rule
    scale, offset = scale.gather(1, best)[:, 0], offset.gather(1, best)[:, 0]
    levels = torch.round(iscale.gather(1, best) * shifted).clamp_(0, nmax)  # the winner's L, again: (B, n)
    zero = torch.zeros_like(scale)
    return torch.where(flat, zero, scale), -torch.where(flat, lo, offset), torch.where(flat[:, None], 0, levels)


@_in_slices
def fit_symmetric_scale(x: torch.Tensor, w: torch.Tensor | None, nmax: int = 32):
    """ggml's make_qx_quants (rmse_type 1) over every sub-block. x: (B, n) → signed scale (B,), L + nmax (B, n).

    x ≈ scale·L, L ∈ [−nmax, nmax − 1]; the value of largest magnitude sits on −nmax (so the scale's sign is
    opposite to it). Weights w default to x². Of the plain grid and 18 perturbed ones, the largest
    least-squares gain (Σw·x·L)² / Σw·L² wins (first on ties).
    """
    w = x * x if w is None else w
    pick = x.abs().argmax(-1, keepdim=True)
    peak = x.gather(1, pick)  # (B, 1) signed value of largest magnitude
    tiny = peak[:, 0].abs() < GROUP_MAX_EPS
    peak = torch.where(tiny[:, None], torch.ones_like(peak), peak)
    k = torch.tensor([0] + list(range(-9, 0)) + list(range(1, 10)), dtype=torch.float32)  # the plain grid first
    iscale = -(nmax + _f32(0.1) * k) / peak  # (B, 19)
    levels = torch.mul(iscale[:, :, None], x[:, None, :]).round_().clamp_(-nmax, nmax - 1)  # (B, 19, n)
    sum_xl = torch.bmm(levels, (w * x)[:, :, None])[:, :, 0]  # Σw·x·L: (B, 19)
    sum_l2 = torch.bmm(levels.square_(), w[:, :, None])[:, :, 0]  # Σw·L² (levels is spent)
    gain = torch.where(sum_l2 > 0, sum_xl * sum_xl / sum_l2, torch.full_like(sum_l2, -float("inf")))
    gain[:, 0] = torch.where(sum_l2[:, 0] > 0, gain[:, 0], torch.zeros_like(gain[:, 0]))
    best = gain.argmax(-1, keepdim=True)
    sum_xl, sum_l2 = sum_xl.gather(1, best)[:, 0], sum_l2.gather(1, best)[:, 0]
    scale = torch.where(sum_l2 > 0, sum_xl / sum_l2, torch.zeros_like(sum_l2))
    levels = torch.round(iscale.gather(1, best) * x).clamp_(-nmax, nmax - 1) + nmax  # the winner's L, again
    return torch.where(tiny, torch.zeros_like(scale), scale), torch.where(tiny[:, None], 0, levels)


def fit_positive_levels(x: torch.Tensor, w: torch.Tensor, nmax: int = 63):
    """ggml's make_qp_quants: x ≥ 0 (B, n) ≈ d·L, L ∈ [0, nmax], weighted. → d (B,), L (B, n).

    A grid search over 9 scales near max/nmax, then 5 sweeps of coordinate descent that move one L at a time
    when that raises the least-squares gain (Σw·x·L)² / Σw·L² (sequential within a block, as in ggml).
    """
    hi = x.amax(-1, keepdim=True)
    zero = hi[:, 0] < GROUP_MAX_EPS
    hi = torch.where(zero[:, None], torch.ones_like(hi), hi)
    k = torch.tensor([0, -4, -3, -2, -1, 1, 2, 3, 4], dtype=torch.float32)
    iscale = (_f32(0.1) * k + nmax) / hi  # (B, 9)
    levels = torch.round(iscale[:, :, None] * x[:, None, :])
    levels[:, 1:] = levels[:, 1:].clamp(max=nmax)  # ggml leaves the plain grid unclamped (it cannot exceed nmax)
    err = (w[:, None, :] * (x[:, None, :] - (1 / iscale)[:, :, None] * levels) ** 2).sum(-1)
    best = err.argmin(-1, keepdim=True)
    levels = torch.round(iscale.gather(1, best) * x).clamp_(max=nmax)  # (B, n)
    sum_xl, sum_l2 = (w * x * levels).sum(-1), (w * levels * levels).sum(-1)
    for _ in range(5):
        for i in range(x.shape[1]):
            wi, xi, li = w[:, i], x[:, i], levels[:, i]
            slx, sl2 = sum_xl - wi * xi * li, sum_l2 - wi * li * li
            ok = (slx > 0) & (sl2 > 0)
            new = torch.round(xi * sl2 / torch.where(ok, slx, torch.ones_like(slx))).clamp_(max=nmax)
            slx, sl2 = slx + wi * xi * new, sl2 + wi * new * new
            take = ok & (new != li) & (slx * slx * sum_l2 > sum_xl * sum_xl * sl2)
            levels[:, i] = torch.where(take, new, li)
            sum_xl, sum_l2 = torch.where(take, slx, sum_xl), torch.where(take, sl2, sum_l2)
    d = torch.where(sum_l2 > 0, sum_xl / sum_l2, torch.zeros_like(sum_l2))
    return torch.where(zero, torch.zeros_like(d), d), torch.where(zero[:, None], 0, levels)


# --- super-blocks ------------------------------------------------------------------------------------------------


def _min_scale_superblocks(x: torch.Tensor, imp: torch.Tensor | None, nmax: int):
    """Q4_K / Q5_K values of super-blocks x (S, 256) → d, dmin (S,) fp16-exact, sc, m (S, 8), L (S, 256)."""
    s = x.shape[0]
    sub = x.reshape(s * 8, 32)
    if imp is None:
        rms = (sub * sub).mean(-1, keepdim=True).sqrt()
        weights = rms + sub.abs()
        rmin, rdelta, nstep = (-1.0, 0.1, 20) if nmax == 15 else (-0.5, 0.1, 15)
    else:
        sigma2 = 2 * (x * x).sum(-1, keepdim=True) / QK_K  # (S, 1)
        weights = (imp * torch.sqrt(sigma2 + x * x)).reshape(s * 8, 32)
        rmin, rdelta, nstep = -0.9, 0.05, 36
    scale, mins, fit_levels = fit_min_scale(sub, weights, nmax, rmin, rdelta, nstep)
    scale, mins = scale.reshape(s, 8), mins.reshape(s, 8)
    if imp is None:  # 6-bit scales against the largest: plain rounding
        top_s, top_m = scale.amax(-1).clamp(min=0), mins.amax(-1).clamp(min=0)
        inv_s = torch.where(top_s > 0, 63 / top_s, torch.zeros_like(top_s))
        inv_m = torch.where(top_m > 0, 63 / top_m, torch.zeros_like(top_m))
        sc = torch.round(inv_s[:, None] * scale).clamp_(0, 63)
        m = torch.round(inv_m[:, None] * mins).clamp_(0, 63)
        d, dmin = _fp16(top_s / 63), _fp16(top_m / 63)
    else:  # importance-weighted: each sub-block's scale and min count by its total weight
        sw = weights.reshape(s, 8, 32).sum(-1)
        d, sc = fit_positive_levels(scale, sw)
        dmin, m = fit_positive_levels(mins, sw)
        d, dmin = _fp16(d), _fp16(dmin)
    step, low = (d[:, None] * sc)[:, :, None], (dmin[:, None] * m)[:, :, None]  # (S, 8, 1)
    xs = x.reshape(s, 8, 32)
    safe = torch.where(step != 0, step, torch.ones_like(step))
    levels = torch.round((xs + low) / safe).clamp_(0, nmax)
    levels = torch.where(step != 0, levels, fit_levels.reshape(s, 8, 32))  # ggml keeps the fit's L there
    values = step * levels - low
    return d, dmin, sc, m, levels.reshape(s, QK_K), values.reshape(s, QK_K)


def _pack_scales_mins(sc: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """8 six-bit scales and mins → 12 bytes (S, 12): bytes 0-3 sc0-3, 4-7 m0-3 (top 2 bits: sc4-7, m4-7's
    high bits), bytes 8-11 low nibbles of sc4-7 | m4-7 << 4."""
    sc, m = sc.to(torch.uint8), m.to(torch.uint8)
    first = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    second = m[:, :4] | ((m[:, 4:] >> 4) << 6)
    third = (sc[:, 4:] & 0xF) | ((m[:, 4:] & 0xF) << 4)
    return torch.cat([first, second, third], dim=1)


def _half_bytes(t: torch.Tensor) -> torch.Tensor:
    """(S,) float → (S, 2) little-endian fp16 bytes."""
    return t.half().view(torch.int16).numpy().astype("<i2").view(np.uint8).reshape(-1, 2).copy()


def _encode_q4_k(x, imp):
    d, dmin, sc, m, levels, values = _min_scale_superblocks(x, imp, 15)
    q = levels.to(torch.uint8).reshape(-1, 4, 2, 32)  # 64-weight chunks: first 32 low nibble, next 32 high
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)
    parts = [torch.from_numpy(_half_bytes(d)), torch.from_numpy(_half_bytes(dmin)), _pack_scales_mins(sc, m), qs]
    return torch.cat(parts, dim=1), values


def _encode_q5_k(x, imp):
    d, dmin, sc, m, levels, values = _min_scale_superblocks(x, imp, 31)
    q = levels.to(torch.uint8).reshape(-1, 4, 2, 32)
    qs = ((q[:, :, 0] & 0xF) | ((q[:, :, 1] & 0xF) << 4)).reshape(-1, 128)
    high = (q >> 4).reshape(-1, 8, 32)  # fifth bit of sub-block j goes to bit j of byte l
    shifts = torch.arange(8, dtype=torch.uint8)[None, :, None]
    qh = (high << shifts).sum(1, dtype=torch.uint8)  # bits are disjoint: the sum is an OR
    parts = [torch.from_numpy(_half_bytes(d)), torch.from_numpy(_half_bytes(dmin)), _pack_scales_mins(sc, m), qh, qs]
    return torch.cat(parts, dim=1), values


def _encode_q6_k(x, imp):
    s = x.shape[0]
    sub = x.reshape(s * 16, 16)
    scale, fit_levels = fit_symmetric_scale(sub, None if imp is None else imp.reshape(s * 16, 16))
    scale = scale.reshape(s, 16)
    pick = scale.abs().argmax(-1, keepdim=True)
    top = scale.gather(1, pick)[:, 0]  # signed scale of largest magnitude
    empty = top.abs() < GROUP_MAX_EPS
    iscale = -128 / torch.where(empty, torch.ones_like(top), top)
    d = torch.where(empty, torch.zeros_like(top), _fp16(1 / iscale))
    sc = torch.round(iscale[:, None] * scale).clamp_(max=127)
    sc = torch.where(empty[:, None], torch.zeros_like(sc), sc)
    step = (d[:, None] * sc)[:, :, None]  # (S, 16, 1)
    xs = x.reshape(s, 16, 16)
    levels = torch.round(xs / torch.where(step != 0, step, torch.ones_like(step))).clamp_(-32, 31) + 32
    levels = torch.where(step != 0, levels, fit_levels.reshape(s, 16, 16))
    levels = torch.where(empty[:, None, None], torch.zeros_like(levels), levels)  # ggml zeroes the whole block
    values = (step * (levels - 32)).reshape(s, QK_K)
    q = levels.to(torch.uint8).reshape(s, 2, 4, 32)  # per 128 weights: four runs of 32
    ql = torch.cat([q[:, :, 0] & 0xF | (q[:, :, 2] & 0xF) << 4, q[:, :, 1] & 0xF | (q[:, :, 3] & 0xF) << 4], dim=2)
    hi = q >> 4
    qh = hi[:, :, 0] | hi[:, :, 1] << 2 | hi[:, :, 2] << 4 | hi[:, :, 3] << 6  # (S, 2, 32)
    scales = sc.to(torch.int8).view(torch.uint8)
    parts = [ql.reshape(s, 128), qh.reshape(s, 64), scales, torch.from_numpy(_half_bytes(d))]
    return torch.cat(parts, dim=1), values


ENCODERS = {"q4_k": _encode_q4_k, "q5_k": _encode_q5_k, "q6_k": _encode_q6_k}


def quantize_kquant(w: torch.Tensor, kind: str, importance: torch.Tensor | None = None) -> KQuantized:
    """Quantize a matrix (rows, cols) to GGUF Q4_K / Q5_K / Q6_K; cols must be a multiple of 256.

    ``importance`` (cols,) ≥ 0 weights each input column (llama.cpp's imatrix, e.g. the mean squared
    activation of that input over calibration tokens); None = ggml's reference quantizer without one.
    Returns the bytes (rows, cols/256 · type size) and the float32 values they decode to.
    """
    kind = kind.lower()
    if kind not in ENCODERS:
        raise ValueError(f"K-quant type must be one of {KQUANT_TYPES}, got {kind!r}")
    if w.dim() != 2:
        raise ValueError(f"K-quants quantize matrices (rows, cols), got shape {tuple(w.shape)}")
    rows, cols = w.shape
    if cols % QK_K:
        raise ValueError(f"{kind.upper()} needs rows that are a multiple of {QK_K} long; this matrix has rows of {cols}"
                         " (llama.cpp falls back to another type for such tensors)")  # fmt: skip
    x = w.detach().to("cpu", torch.float32).contiguous()
    if not torch.isfinite(x).all():
        raise ValueError("cannot quantize a matrix with NaN or infinite values")
    if importance is not None:
        importance = importance.detach().to("cpu", torch.float32).reshape(-1)
        if importance.numel() != cols or (importance < 0).any() or not torch.isfinite(importance).all():
            raise ValueError(f"importance must be {cols} finite values ≥ 0 (one per input column)")
    nsb = cols // QK_K
    chunk = max(1, ROWS_ELEMENTS // cols)
    data = torch.empty(rows, nsb * TYPE_SIZES[kind], dtype=torch.uint8)
    values = torch.empty(rows, cols, dtype=torch.float32)
    with torch.no_grad():
        for r0 in range(0, rows, chunk):
            block = x[r0 : r0 + chunk]
            n = block.shape[0]
            imp = None if importance is None else importance.reshape(1, cols).expand(n, cols).reshape(n * nsb, QK_K)
            packed, vals = ENCODERS[kind](block.reshape(n * nsb, QK_K), imp)
            data[r0 : r0 + n] = packed.reshape(n, -1)
            values[r0 : r0 + n] = vals.reshape(n, cols)
    return KQuantized(data.numpy(), values)
