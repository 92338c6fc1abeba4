"""Scaled integer and FP8 quantization at every granularity against float64 references."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.formats import (
    FP8_DTYPES,
    Granularity,
    ScaledTensor,
    dequantize_scaled,
    from_groups,
    int_range,
    n_groups,
    quantize_fp8,
    quantize_int,
    to_groups,
)

from ._reference import fp8_ref, group_ids, int_affine_ref, int_symmetric_ref, near_half

# (shape, kind, size): non-divisible group and block sizes included on purpose
CASES = [
    ((12, 40), "tensor", None),
    ((12, 40), "row", None),
    ((12, 40), "column", None),
    ((12, 40), "group", 8),
    ((12, 40), "group", 16),  # 40 = 2·16 + 8: short last group in every row
    ((12, 40), "group", 64),  # larger than a row
    ((12, 40), "block", 7),  # 480 = 68·7 + 4
    ((12, 40), "block", 64),
    ((4, 6, 10), "group", 7),  # read as (4, 60)
    ((4, 6, 10), "column", None),
    ((4, 6, 10), "block", 11),
    ((50,), "row", None),
    ((50,), "group", 7),
    ((50,), "column", None),
]
CASE_IDS = [f"{'x'.join(map(str, s))}-{k}{'' if n is None else n}" for s, k, n in CASES]


def make_weight(shape, seed, dtype=torch.float32):
    """Values with very different scales per row (so per-row/per-group scales matter)."""
    g = torch.Generator().manual_seed(seed)
    rows = shape[0] if len(shape) > 1 else 1
    row_scale = torch.exp(torch.randn(rows, generator=g)).reshape(rows, *([1] * (len(shape) - 1)))
    x = torch.randn(*shape, generator=g) * (row_scale if len(shape) > 1 else row_scale.reshape(()))
    return x.to(dtype)


def check_int(x: torch.Tensor, bits: int, symmetric: bool, g: Granularity) -> None:
    t = quantize_int(x, bits, symmetric, g)
    gid = group_ids(tuple(x.shape), g.kind, g.size)
    assert t.shape == tuple(x.shape) and t.dtype == x.dtype and t.kind == "int" and t.bits == bits
    assert t.scale.dtype == torch.float32 and t.scale.numel() == int(gid.max()) + 1
    assert t.data.dtype == (torch.uint8 if (not symmetric and bits == 8) else torch.int8)
    levels = t.data.to(torch.int64).reshape(-1).double()
    qmin, qmax = (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)
    assert levels.min() >= qmin and levels.max() <= qmax

    if symmetric:
        assert t.zero_point is None
        q_ref, s_ref, ratio = int_symmetric_ref(x, bits, gid)
        z_ref = torch.zeros_like(s_ref)
        tie = near_half(ratio)
    else:
        q_ref, s_ref, z_ref, ratio, zero_arg = int_affine_ref(x, bits, gid)
        assert t.zero_point.dtype == torch.int16
        z_tie = near_half(zero_arg)
        z = t.zero_point.double()
        assert torch.all((z == z_ref) | (z_tie & ((z - z_ref).abs() == 1)))
        tie = near_half(ratio) | z_tie[gid]

    nonzero = s_ref > 0
    torch.testing.assert_close(t.scale.double()[nonzero], s_ref[nonzero], rtol=1e-6, atol=0)
    assert torch.all(torch.isfinite(t.scale)) and torch.all(t.scale > 0)  # all-zero groups: tiny, finite

    # Same levels as the float64 reference; float32 may round the other way only at (near) .5 ties.
    diff = (levels - q_ref).abs()
    assert torch.all((diff == 0) | (tie & (diff == 1))), f"{(diff > 0).sum()} levels differ"
    assert (diff > 0).sum() <= max(2, 1e-3 * x.numel())

    # Dequantized values: S·(q − Z) in float64 from the reference, within float32 rounding.
    out = dequantize_scaled(t, torch.float32).double().reshape(-1)
    expected = s_ref[gid] * (q_ref - z_ref[gid])
    same = diff == 0
    span = s_ref[gid] * (qmax - qmin)
    assert torch.all((out - expected).abs()[same] <= 1e-6 * span[same] + 1e-30)
    assert torch.all((out - expected).abs()[~same] <= 1.01 * s_ref[gid][~same])


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "affine"])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape, kind, size", CASES, ids=CASE_IDS)
def test_int_matches_float64_reference(shape, kind, size, bits, symmetric):
    check_int(make_weight(shape, seed=len(shape) + bits), bits, symmetric, Granularity(kind, size))


@pytest.mark.parametrize("bits", [2, 3, 5])
def test_other_bit_widths(bits):
    for symmetric in (True, False):
        check_int(make_weight((16, 24), seed=bits), bits, symmetric, Granularity("group", 5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "affine"])
def test_int_low_precision_inputs(dtype, symmetric):
    # fp16/bf16 values sit on a coarse grid, where exact .5 ties are possible; check_int allows
    # off-by-one only at such ties.
    x = make_weight((16, 96), seed=3, dtype=dtype)
    check_int(x, 4, symmetric, Granularity("group", 32))
    check_int(x, 8, symmetric, Granularity("row"))
    assert dequantize_scaled(quantize_int(x, 8, symmetric)).dtype == dtype


def test_int_range_spec():
    assert int_range(8, True) == (-127, 127)
    assert int_range(4, True) == (-7, 7)
    assert int_range(8, False) == (0, 255)
    assert int_range(4, False) == (0, 15)
    for bad in (1, 9, 16):
        with pytest.raises(ValueError):
            int_range(bad, True)


def test_affine_hand_computed_example():
    # rmin = -1, rmax = 2 → S = 3/15 = 0.2, Z = round(0 + 1/0.2) = 5
    x = torch.tensor([[-1.0, 0.0, 0.5, 2.0, 0.31]])
    t = quantize_int(x, 4, symmetric=False, granularity=Granularity("row"))
    assert t.scale.item() == pytest.approx(0.2, rel=1e-6)
    assert t.zero_point.tolist() == [5]
    # q = round(x / 0.2) + 5: -5+5, 0+5, 2.5→2 (half to even)+5, 10+5, 1.55→2+5
    assert t.data.tolist() == [[0, 5, 7, 15, 7]]
    torch.testing.assert_close(dequantize_scaled(t), torch.tensor([[-1.0, 0.0, 0.4, 2.0, 0.4]]))


def test_affine_range_widened_to_include_zero():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])  # all positive: rmin widened to 0 → Z = qmin = 0
    t = quantize_int(x, 8, symmetric=False)
    assert t.zero_point.tolist() == [0]
    assert t.scale.item() == pytest.approx(4.0 / 255, rel=1e-6)
    x = -x  # all negative: rmax widened to 0 → Z = qmax
    t = quantize_int(x, 8, symmetric=False)
    assert t.zero_point.tolist() == [255]


def test_n_groups_matches_reference():
    for shape, kind, size in CASES:
        g = Granularity(kind, size)
        assert n_groups(shape, g) == int(group_ids(shape, kind, size).max()) + 1


def test_bits_per_parameter():
    x = make_weight((64, 256), seed=0)
    t = quantize_int(x, 4, True, Granularity("group", 128))
    assert t.bits_per_parameter() == pytest.approx(4 + 32 / 128)
    t = quantize_int(x, 4, False, Granularity("group", 128))
    assert t.bits_per_parameter() == pytest.approx(4 + 32 / 128 + 4 / 128)
    t = quantize_fp8(x, "fp8_e4m3", Granularity("row"))
    assert t.bits_per_parameter() == pytest.approx(8 + 32 / 256)


# -------------------------------------------------------------------------------------------- FP8


@pytest.mark.parametrize("kind", ["fp8_e4m3", "fp8_e5m2"])
@pytest.mark.parametrize("shape, gkind, size", CASES, ids=CASE_IDS)
def test_fp8_matches_float64_reference(shape, gkind, size, kind):
    x = make_weight(shape, seed=5)
    g = Granularity(gkind, size)
    t = quantize_fp8(x, kind, g)
    dtype = FP8_DTYPES[kind]
    assert t.data.dtype == dtype and t.shape == tuple(shape) and t.zero_point is None
    gid = group_ids(tuple(shape), gkind, size)
    q_ref, s_ref = fp8_ref(x, dtype, gid)
    torch.testing.assert_close(t.scale.double(), s_ref, rtol=1e-6, atol=0)
    # S computed in float32 by lowbit and float64 here: x/S can only round differently when it sits
    # within float32 rounding of an fp8 midpoint, which this seeded data does not hit.
    assert torch.equal(t.data.double().reshape(-1), q_ref)
    out = dequantize_scaled(t).double().reshape(-1)
    expected = q_ref * s_ref[gid]
    torch.testing.assert_close(out, expected, rtol=2e-7, atol=1e-30)
    # the group absmax lands exactly on the format's largest finite value
    fmax = torch.finfo(dtype).max
    per_group_max = torch.zeros(t.scale.numel(), dtype=torch.float64).scatter_reduce(
        0, gid, t.data.double().reshape(-1).abs(), "amax")  # fmt: skip
    assert torch.all(per_group_max == fmax)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("kind", ["fp8_e4m3", "fp8_e5m2"])
def test_fp8_input_dtypes(dtype, kind):
    x = make_weight((8, 64), seed=6, dtype=dtype)
    t = quantize_fp8(x, kind, Granularity("group", 32))
    gid = group_ids((8, 64), "group", 32)
    q_ref, s_ref = fp8_ref(x, FP8_DTYPES[kind], gid)
    assert torch.equal(t.data.double().reshape(-1), q_ref)
    out = dequantize_scaled(t)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double().reshape(-1), q_ref * s_ref[gid], rtol=torch.finfo(dtype).eps, atol=0)


def test_fp8_unknown_kind():
    with pytest.raises(ValueError, match="unknown FP8"):
        quantize_fp8(torch.randn(4, 4), "fp8_e3m4")


# --------------------------------------------------------------------------------- properties

granularities = st.one_of(
    st.sampled_from([Granularity("tensor"), Granularity("row"), Granularity("column")]),
    st.builds(Granularity, st.just("group"), st.integers(1, 20)),
    st.builds(Granularity, st.just("block"), st.integers(1, 40)),
)
shapes = st.lists(st.integers(1, 12), min_size=1, max_size=3).map(tuple)


def random_tensor(shape, seed, log_scale=0.0, zero_fraction=0.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g) * 10.0**log_scale
    if zero_fraction:
        x = torch.where(torch.rand(*shape, generator=g) < zero_fraction, torch.zeros_like(x), x)
    return x


@settings(max_examples=60, deadline=None)
@given(shape=shapes, g=granularities, bits=st.sampled_from([2, 4, 8]), symmetric=st.booleans(),
       log_scale=st.floats(-25, 25), seed=st.integers(0, 2**31 - 1))  # fmt: skip
def test_int_rtn_error_at_most_half_a_step(shape, g, bits, symmetric, log_scale, seed):
    x = random_tensor(shape, seed, log_scale)
    t = quantize_int(x, bits, symmetric, g)
    gid = group_ids(shape, g.kind, g.size)
    scale = t.scale.double()[gid]  # the step of each element's group
    err = (dequantize_scaled(t, torch.float32).double() - x.double()).reshape(-1).abs()
    # RTN: |x − x̂| ≤ S/2 (no element is clamped by more than float32 rounding), plus float32 slack
    bound = scale / 2 * (1 + 1e-5) + 1e-6 * x.double().abs().reshape(-1)
    assert torch.all(err <= bound), (err - bound).max()


@settings(max_examples=60, deadline=None)
@given(shape=shapes, g=granularities, fmt=st.sampled_from(["int4", "int8", "int4a", "int8a", "fp8_e4m3", "fp8_e5m2"]),
       log_scale=st.floats(-20, 20), seed=st.integers(0, 2**31 - 1))  # fmt: skip
def test_exact_zero_preserved(shape, g, fmt, log_scale, seed):
    x = random_tensor(shape, seed, log_scale, zero_fraction=0.3)
    if fmt.startswith("fp8"):
        t = quantize_fp8(x, fmt, g)
    else:
        t = quantize_int(x, int(fmt[3]), not fmt.endswith("a"), g)
    out = dequantize_scaled(t)
    assert torch.all(out[x == 0] == 0)
    assert torch.isfinite(out).all() and torch.isfinite(t.scale).all()


@settings(max_examples=60, deadline=None)
@given(kind=st.sampled_from(["fp8_e4m3", "fp8_e5m2"]), shape=shapes, g=granularities,
       log_scale=st.floats(-20, 20), seed=st.integers(0, 2**31 - 1))  # fmt: skip
def test_fp8_relative_error_bound(kind, shape, g, log_scale, seed):
    # round to nearest with m mantissa bits: |x − x̂| ≤ |x|·2^−(m+1) for normals, half the subnormal
    # spacing below; in units of the group's scale S.
    mant, min_sub = {"fp8_e4m3": (3, 2.0**-9), "fp8_e5m2": (2, 2.0**-16)}[kind]
    x = random_tensor(shape, seed, log_scale)
    t = quantize_fp8(x, kind, g)
    scale = t.scale.double()[group_ids(shape, g.kind, g.size)]
    xd = x.double().reshape(-1)
    err = (dequantize_scaled(t).double().reshape(-1) - xd).abs()
    bound = torch.maximum(xd.abs() * 2.0 ** -(mant + 1), scale * min_sub / 2) * (1 + 1e-5) + 1e-6 * xd.abs()
    assert torch.all(err <= bound)


@settings(max_examples=80, deadline=None)
@given(shape=shapes, g=granularities, seed=st.integers(0, 2**31 - 1))
def test_to_groups_from_groups_round_trip_and_layout(shape, g, seed):
    x = random_tensor(shape, seed)
    groups = to_groups(x, g)
    assert groups.dim() == 2 and groups.shape[0] == n_groups(shape, g)
    assert torch.equal(from_groups(groups, g, shape), x)
    # layout against the reference numbering: row k holds group k's values in order, then padding
    # that repeats the group's last value (leaving min / max / absmax unchanged)
    gid = group_ids(shape, g.kind, g.size)
    flat = x.reshape(-1)
    for k in range(groups.shape[0]):
        members = flat[gid == k]
        row = groups[k]
        assert torch.equal(row[: members.numel()], members)
        assert torch.all(row[members.numel() :] == members[-1])


@pytest.mark.parametrize("kind, size", [("tensor", None), ("row", None), ("group", 4), ("block", 8), ("column", None)])
def test_all_zero_groups_give_zeros_and_finite_scales(kind, size):
    x = make_weight((6, 16), seed=9)
    x[2] = 0.0
    x[:, 3] = 0.0
    g = Granularity(kind, size)
    for t in (quantize_int(x, 8, True, g), quantize_int(x, 4, False, g), quantize_fp8(x, "fp8_e4m3", g),
              quantize_fp8(x, "fp8_e5m2", g)):  # fmt: skip
        out = dequantize_scaled(t)
        assert torch.isfinite(t.scale).all() and torch.all(t.scale > 0)
        assert torch.all(out[2] == 0) and torch.all(out[:, 3] == 0)
    for t in (quantize_int(torch.zeros(4, 8), 8, s, g) for s in (True, False)):
        assert torch.equal(dequantize_scaled(t), torch.zeros(4, 8))
        assert torch.isfinite(t.scale).all()


# ------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_rejected(bad):
    x = torch.randn(4, 8)
    x[1, 1] = bad
    with pytest.raises(ValueError, match="NaN/inf"):
        quantize_int(x)
    with pytest.raises(ValueError, match="NaN/inf"):
        quantize_int(x, 4, symmetric=False)
    with pytest.raises(ValueError, match="NaN/inf"):
        quantize_fp8(x)


def test_bad_inputs_rejected():
    with pytest.raises(ValueError, match="empty"):
        quantize_int(torch.empty(0, 4))
    with pytest.raises(TypeError):
        quantize_int(torch.ones(4, 4, dtype=torch.int32))
    with pytest.raises(TypeError):
        quantize_fp8(torch.ones(4, 4, dtype=torch.int8))
    with pytest.raises(ValueError):
        quantize_int(torch.randn(4, 4), bits=1)


@pytest.mark.parametrize(
    "kind, size", [("group", None), ("group", 0), ("block", -3), ("row", 4), ("tensor", 1), ("diag", None)]
)
def test_invalid_granularity(kind, size):
    with pytest.raises(ValueError):
        Granularity(kind, size)


def test_scaled_tensor_is_plain_data():
    # dequantize_scaled only needs the fields: a hand-built ScaledTensor decodes as S·(q − Z)
    data = torch.tensor([[1, -2, 3]], dtype=torch.int8)
    zero = torch.tensor([1], dtype=torch.int16)
    t = ScaledTensor(data, torch.tensor([0.5]), zero, "int", 4, Granularity("row"), torch.float32)
    assert dequantize_scaled(t).tolist() == [[0.0, -1.5, 1.0]]
    assert math.isclose(t.bits_per_parameter(), 8 * (2 + 4 + 1) / 3)
