"""GGUF K-quants against gguf's dequantizer (byte layout) and a float64 block-by-block reference (values).

The `gguf` package dequantizes Q4_K/Q5_K/Q6_K but has no quantizer for them, so the reference here is ggml's
algorithm (ggml-quants.c: make_qkx2_quants / make_qkx3_quants, make_qx_quants, make_qp_quants and the
quantize_row_q*_K paths) written out again one block at a time in float64: simple, slow, sharing no code with
lowbit's vectorised float32 version.
"""

import numpy as np
import pytest
import torch

from lowbit.io.gguf_kquants import quantize_kquant

gguf = pytest.importorskip("gguf")
QTYPE = {"q4_k": gguf.GGMLQuantizationType.Q4_K, "q5_k": gguf.GGMLQuantizationType.Q5_K,
         "q6_k": gguf.GGMLQuantizationType.Q6_K}  # fmt: skip


def f16(v):
    return float(np.float16(v))


def ref_min_fit(x, w, nmax, rmin, rdelta, nstep):
    """make_qkx2_quants: x ≈ s·L + m (m ≤ 0); returns s, -m."""
    lo, hi = min(x.min(), 0.0), x.max()
    if hi == lo:
        return 0.0, -lo
    iscale = nmax / (hi - lo)
    levels = np.clip(np.rint(iscale * (x - lo)), 0, nmax)
    best, best_s, best_m = np.sum(w * (levels / iscale + lo - x) ** 2), 1 / iscale, lo
    for k in range(nstep + 1):
        levels = np.clip(np.rint((rmin + rdelta * k + nmax) / (hi - lo) * (x - lo)), 0, nmax)
        sw, sl, sl2, sx, sxl = w.sum(), (w * levels).sum(), (w * levels**2).sum(), (w * x).sum(), (w * x * levels).sum()
        det = sw * sl2 - sl * sl
        if det > 0:
            s, m = (sw * sxl - sx * sl) / det, (sl2 * sx - sl * sxl) / det
            if m > 0:
                s, m = sxl / sl2, 0.0
            err = np.sum(w * (s * levels + m - x) ** 2)
            if err < best:
                best, best_s, best_m = err, s, m
    return best_s, -best_m


def ref_positive_fit(x, w, nmax=63):
    """make_qp_quants: x ≥ 0 ≈ d·L; returns d, L."""
    if x.max() < 1e-15:
        return 0.0, np.zeros_like(x)
    best_iscale = nmax / x.max()
    best = np.sum(w * (x - np.rint(best_iscale * x) / best_iscale) ** 2)
    for k in (-4, -3, -2, -1, 1, 2, 3, 4):
        iscale = (0.1 * k + nmax) / x.max()
        err = np.sum(w * (x - np.minimum(nmax, np.rint(iscale * x)) / iscale) ** 2)
        if err < best:
            best, best_iscale = err, iscale
    levels = np.minimum(nmax, np.rint(best_iscale * x))
    sumlx, suml2 = np.sum(w * x * levels), np.sum(w * levels**2)
    for _ in range(5):
        for i in range(len(x)):
            slx, sl2 = sumlx - w[i] * x[i] * levels[i], suml2 - w[i] * levels[i] ** 2
            if slx > 0 and sl2 > 0:
                new = min(nmax, np.rint(x[i] * sl2 / slx))
                if new != levels[i]:
                    slx, sl2 = slx + w[i] * x[i] * new, sl2 + w[i] * new * new
                    if slx * slx * suml2 > sumlx * sumlx * sl2:
                        levels[i], sumlx, suml2 = new, slx, sl2
    return (sumlx / suml2 if suml2 > 0 else 0.0), levels


def ref_q45k(sb, imp, nmax):
    """One super-block of Q4_K (nmax 15) / Q5_K (nmax 31) → its decoded 256 values."""
    subs = sb.reshape(8, 32)
    scales, mins, sws = np.zeros(8), np.zeros(8), np.zeros(8)
    for j, x in enumerate(subs):
        if imp is None:
            w = np.sqrt(np.mean(x * x)) + np.abs(x)
            args = (-1.0, 0.1, 20) if nmax == 15 else (-0.5, 0.1, 15)
        else:
            w = imp.reshape(8, 32)[j] * np.sqrt(2 * np.mean(sb * sb) + x * x)
            args = (-0.9, 0.05, 36)
        scales[j], mins[j] = ref_min_fit(x, w, nmax, *args)
        sws[j] = w.sum()
    if imp is None:
        top_s, top_m = max(scales.max(), 0), max(mins.max(), 0)
        sc = np.minimum(63, np.rint(scales * (63 / top_s if top_s > 0 else 0)))
        m = np.minimum(63, np.rint(mins * (63 / top_m if top_m > 0 else 0)))
        d, dmin = f16(top_s / 63), f16(top_m / 63)
    else:
        (d, sc), (dmin, m) = ref_positive_fit(scales, sws), ref_positive_fit(mins, sws)
        d, dmin = f16(d), f16(dmin)
    out = np.zeros((8, 32))
    for j, x in enumerate(subs):
        step, low = d * sc[j], dmin * m[j]
        out[j] = -low if step == 0 else step * np.clip(np.rint((x + low) / step), 0, nmax) - low
    return out.reshape(-1)


def ref_q6k(sb, imp):
    """One super-block of Q6_K → its decoded 256 values."""
    subs, scales = sb.reshape(16, 16), np.zeros(16)
    for j, x in enumerate(subs):
        w = x * x if imp is None else imp.reshape(16, 16)[j]
        peak = x[np.argmax(np.abs(x))]
        if abs(peak) < 1e-15:
            continue
        best_gain = None
        for k in [0] + list(range(-9, 0)) + list(range(1, 10)):
            levels = np.clip(np.rint(-(32 + 0.1 * k) / peak * x), -32, 31)
            sxl, sl2 = np.sum(w * x * levels), np.sum(w * levels**2)
            if sl2 > 0 and (best_gain is None or sxl * sxl / sl2 > best_gain):
                best_gain, scales[j] = sxl * sxl / sl2, sxl / sl2
    top = scales[np.argmax(np.abs(scales))]
    if abs(top) < 1e-15:
        return np.zeros(256)
    iscale = -128 / top
    d = f16(1 / iscale)
    sc = np.minimum(127, np.rint(iscale * scales))
    out = np.zeros((16, 16))
    for j, x in enumerate(subs):
        step = d * sc[j]
        out[j] = 0 if step == 0 else step * np.clip(np.rint(x / step), -32, 31)
    return out.reshape(-1)


def reference(w: torch.Tensor, kind: str, imp=None) -> np.ndarray:
    x = w.double().numpy()
    imp_sb = None if imp is None else imp.double().numpy().reshape(-1, 256)
    out = np.zeros_like(x).reshape(-1, 256)
    for i, sb in enumerate(x.reshape(-1, 256)):
        block_imp = None if imp_sb is None else imp_sb[i % imp_sb.shape[0]]
        out[i] = ref_q6k(sb, block_imp) if kind == "q6_k" else ref_q45k(sb, block_imp, 15 if kind == "q4_k" else 31)
    return out.reshape(x.shape)


def test_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    normal = torch.randn(4, 512, generator=g) * 0.02
    chi2 = torch.randn(2, 4, 512, generator=g).pow(2).sum(0)
    heavy = torch.randn(4, 512, generator=g) / (chi2 / 2).sqrt() * 0.01  # Student's t, 2 degrees of freedom
    special = torch.randn(6, 512, generator=g) * 0.05
    special[0, :256] = 0  # an all-zero super-block
    special[1, 256:] = 0.3  # constant positive, and constant negative (the flat-min branch)
    special[2, :256] = -0.2
    special[3, 32:64] = 0  # one all-zero sub-block inside a live super-block
    special[4, 16:32] = 1e-20  # a sub-block far below the super-block's scale
    special[5] = special[5] + 0.5  # all positive: the min clamps at zero
    return {"normal": normal, "heavy-tailed": heavy, "special": special}


test_tensors.__test__ = False  # a helper, not a test


def rms(a) -> float:
    return float(np.sqrt(np.mean(np.square(a))))


@pytest.mark.parametrize("kind", ["q4_k", "q5_k", "q6_k"])
@pytest.mark.parametrize("weighted", [False, True])
def test_bytes_decode_to_values_and_match_the_float64_reference(kind, weighted):
    imp_gen = torch.Generator().manual_seed(1)
    for name, w in test_tensors().items():
        imp = torch.rand(w.shape[1], generator=imp_gen) ** 2 if weighted else None
        q = quantize_kquant(w, kind, importance=imp)
        rows, cols = w.shape
        assert q.data.dtype == np.uint8 and q.data.shape == (rows, cols // 256 * gguf.GGML_QUANT_SIZES[QTYPE[kind]][1])
        # The layout: gguf's own dequantizer reads back exactly the values lowbit computed.
        np.testing.assert_array_equal(gguf.quants.dequantize(q.data, QTYPE[kind]), q.values.numpy())
        ref, got, x = reference(w, kind, imp), q.values.double().numpy(), w.double().numpy()
        # The algorithm: the same values as the float64 reference up to float32 rounding, except where float
        # rounding tipped a near-tie between two candidate grids (or a rounding boundary) the other way.
        peak = np.abs(x).reshape(-1, 256).max(axis=1, keepdims=True) + 1e-30
        same = np.abs(got - ref).reshape(-1, 256) <= 1e-5 * peak
        # (With an importance matrix the 6-bit scales come from a coordinate descent whose float-rounding flips
        # move whole super-blocks: fewer equal values, the same error; measured ≥ 0.64 over 5 seeds.)
        assert same.mean() >= (0.5 if weighted else 0.8), (name, same.mean())
        # ... and those differences cost nothing: per super-block the error is the reference's (constant
        # blocks, where every grid ties, may differ by 0.2 % of the block's magnitude), overall within 1 %.
        err_sb = np.sqrt(np.mean((got - x).reshape(-1, 256) ** 2, axis=1))
        ref_sb = np.sqrt(np.mean((ref - x).reshape(-1, 256) ** 2, axis=1))
        assert (np.abs(err_sb - ref_sb) <= 0.05 * ref_sb + 2e-3 * peak[:, 0]).all(), name
        assert rms(got - x) <= rms(ref - x) * 1.01, name


def test_special_blocks_decode_exactly():
    w = test_tensors()["special"]
    for kind in ("q4_k", "q5_k", "q6_k"):
        v = quantize_kquant(w, kind).values
        assert torch.equal(v[0, :256], torch.zeros(256)), kind  # zeros stay zeros
        assert torch.equal(v[3, 32:64], torch.zeros(32)) or kind != "q6_k"  # symmetric: an exact zero
        torch.testing.assert_close(v[1, 256:], torch.full((256,), 0.3), rtol=2e-3, atol=0)  # constants survive
        torch.testing.assert_close(v[2, :256], torch.full((256,), -0.2), rtol=2e-3, atol=0)
        # 1e-20s: a Q6_K sub-block of their own (scale rounds to 0: exact zeros); in Q4_K/Q5_K they share a
        # sub-block of 32 with N(0, 0.05²) values, so they land within a grid step (~0.1 / 15) of zero.
        tiny = v[4, 16:32].abs().max()
        assert tiny == 0 if kind == "q6_k" else tiny < 0.01


# Relative RMS error of N(0, σ²) weights (measured ≈ 0.072 / 0.036 / 0.0177), and the gguf package's own
# quantizers of the type that a K-quant must beat (same or fewer bits per weight) and the one it may not.
RMS_BOUND = {"q4_k": 0.075, "q5_k": 0.038, "q6_k": 0.019}
PEERS = {"q4_k": ("Q4_1", "Q5_0"), "q5_k": ("Q5_1", "Q8_0"), "q6_k": ("Q5_1", "Q8_0")}


@pytest.mark.parametrize("kind", ["q4_k", "q5_k", "q6_k"])
def test_error_bounds_peers_and_importance(kind):
    """Every weight within ~1 grid step, RMS error between the gguf package's neighbouring formats, and an
    importance matrix lowers the importance-weighted error."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(64, 768, generator=g) * 0.02
    q = quantize_kquant(w, kind)
    bits, sub = {"q4_k": (4, 32), "q5_k": (5, 32), "q6_k": (6, 16)}[kind]
    span = w.reshape(-1, sub).amax(1) - w.reshape(-1, sub).amin(1).clamp(max=0)
    # Half a step plus what the stretched grids clip at the extremes and the 6-bit scales round: ≤ 1.1 measured.
    assert ((q.values - w).abs().reshape(-1, sub).amax(1) <= 1.5 * span / (2**bits - 1)).all()
    rel = rms((q.values - w).numpy()) / w.std().item()
    assert rel < RMS_BOUND[kind]
    better, worse = (getattr(gguf.GGMLQuantizationType, t) for t in PEERS[kind])
    peer_err = lambda t: rms(gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), t), t) - w.numpy())  # noqa: E731
    assert rms((q.values - w).numpy()) < peer_err(better)
    assert rms((q.values - w).numpy()) > peer_err(worse)
    imp = torch.exp(2 * torch.randn(768, generator=g))  # log-normal: some inputs matter far more than others
    weighted = quantize_kquant(w, kind, importance=imp).values
    cost = lambda v: (imp * (v - w).pow(2)).sum().item()  # noqa: E731  the output error the imatrix stands for
    assert cost(weighted) < 0.8 * cost(q.values)  # about half, measured


def test_shapes_and_bad_input():
    for shape in [(1, 256), (3, 768), (5, 1280)]:  # odd row counts are fine
        w = torch.randn(shape)
        q = quantize_kquant(w, "q4_k")
        assert q.values.shape == shape
        np.testing.assert_array_equal(gguf.quants.dequantize(q.data, QTYPE["q4_k"]), q.values.numpy())
    with pytest.raises(ValueError, match="multiple of 256"):
        quantize_kquant(torch.randn(4, 576), "q6_k")
    with pytest.raises(ValueError, match="matrices"):
        quantize_kquant(torch.randn(512), "q4_k")
    with pytest.raises(ValueError, match="one of"):
        quantize_kquant(torch.randn(4, 256), "q3_k")
    with pytest.raises(ValueError, match="NaN"):
        quantize_kquant(torch.full((1, 256), float("nan")), "q5_k")
    with pytest.raises(ValueError, match="importance"):
        quantize_kquant(torch.randn(2, 256), "q4_k", importance=torch.ones(255))
