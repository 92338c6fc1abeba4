"""WeightFormat: every format's encode → decode against an independent float64 dequantization."""

import json
import math

import bitsandbytes.functional as bnbF
import pytest
import torch

from lowbit.formats import FORMATS, WeightFormat

from ._reference import (
    blockwise_4bit_ref,
    boundary_distance,
    double_quant_ref,
    fp8_ref,
    group_ids,
    int_affine_ref,
    int_symmetric_ref,
    near_half,
)

CODEBOOK_TABLES = {  # published / peer tables, float64
    "nf4": lambda: bnbF.get_4bit_type("nf4", device="cpu").double(),
    "fp4": lambda: bnbF.get_4bit_type("fp4", device="cpu").double(),
    "e2m1": lambda: torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6, 0, -0.5, -1, -1.5, -2, -3, -4, -6]).double() / 6,
}
FP8 = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def configs():
    out = []
    for name in ("nf4", "fp4", "e2m1"):
        for dq in (True, False):
            for block in (64, 32):
                out.append(WeightFormat(name, block_size=block, double_quant=dq))
    for name in ("int2", "int3", "int4", "int8"):
        for group in (None, 32):
            for sym in (True, False):
                out.append(WeightFormat(name, group_size=group, symmetric=sym))
    for name in ("fp8_e4m3", "fp8_e5m2"):
        for group in (None, 32):
            out.append(WeightFormat(name, group_size=group))
    return out


CONFIGS = configs()
CONFIG_IDS = [f"{c.name}-b{c.block_size}-dq{int(c.double_quant)}-g{c.group_size}-{'sym' if c.symmetric else 'aff'}"
              for c in CONFIGS]  # fmt: skip


def test_formats_are_the_documented_set():
    assert set(FORMATS) == {"nf4", "fp4", "e2m1", "int2", "int3", "int4", "int8", "fp8_e4m3", "fp8_e5m2"}
    assert {c.name for c in CONFIGS} == set(FORMATS)


def weight(out_features, in_features, seed=0):
    g = torch.Generator().manual_seed(seed)
    row_scale = torch.exp(0.5 * torch.randn(out_features, 1, generator=g))
    return torch.randn(out_features, in_features, generator=g) * 0.02 * row_scale


def reference_decode(fmt: WeightFormat, w: torch.Tensor):
    """(float64 dequantized weight, per-element tolerance mask for ties) from the spec alone."""
    shape = tuple(w.shape)
    if fmt.name in CODEBOOK_TABLES:
        table = CODEBOOK_TABLES[fmt.name]()
        idx, absmax, scaled = blockwise_4bit_ref(w, table, fmt.block_size)
        if fmt.double_quant:
            absmax = double_quant_ref(absmax)
        values = table[idx] * absmax.repeat_interleave(fmt.block_size)[: w.numel()]
        tie = boundary_distance(scaled, table) < 1e-6
        return values.reshape(shape), tie.reshape(shape)
    gid = group_ids(shape, "row") if fmt.group_size is None else group_ids(shape, "group", fmt.group_size)
    if fmt.name in FP8:
        q, s = fp8_ref(w, FP8[fmt.name], gid)
        return (q * s[gid]).reshape(shape), torch.zeros(shape, dtype=torch.bool)
    bits = {"int2": 2, "int3": 3, "int4": 4, "int8": 8}[fmt.name]
    if fmt.symmetric:
        q, s, ratio = int_symmetric_ref(w, bits, gid)
        return (q * s[gid]).reshape(shape), near_half(ratio).reshape(shape)
    q, s, z, ratio, zero_arg = int_affine_ref(w, bits, gid)
    tie = near_half(ratio) | near_half(zero_arg)[gid]
    return (s[gid] * (q - z[gid])).reshape(shape), tie.reshape(shape)


def step_size(fmt: WeightFormat, w: torch.Tensor) -> float:
    """A generous one-level step, for values that may round either way at a tie."""
    return w.abs().max().item() / (2 if fmt.name in CODEBOOK_TABLES else {"int2": 0.5, "int3": 1.5, "int4": 3, "int8": 63}.get(fmt.name, 8))


@pytest.mark.parametrize("in_features", [64, 97])
@pytest.mark.parametrize("fmt", CONFIGS, ids=CONFIG_IDS)
def test_decode_encode_matches_reference(fmt, in_features):
    w = weight(24, in_features, seed=in_features)
    tensors = fmt.encode(w)
    out = fmt.decode(tensors, tuple(w.shape), torch.float32)
    assert out.shape == w.shape and out.dtype == torch.float32
    expected, tie = reference_decode(fmt, w)
    err = (out.double() - expected).abs()
    tol = 2e-6 * w.abs().max().item()  # float32 rounding of S·q / absmax·code, and of DQ constants
    bad = err > tol
    assert torch.all(tie[bad]), f"{bad.sum()} values differ from the reference away from a tie"
    assert torch.all(err[bad] <= step_size(fmt, w))
    assert bad.sum() <= 2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("name", ["nf4", "int4", "int8", "fp8_e4m3"])
def test_decode_dtype_and_low_precision_weights(name, dtype):
    fmt = WeightFormat(name, group_size=32 if name != "nf4" else None)
    w = weight(16, 64, seed=1).to(dtype)
    out = fmt.decode(fmt.encode(w), (16, 64), dtype)
    assert out.dtype == dtype
    expected, tie = reference_decode(fmt, w)
    err = (out.double() - expected).abs()
    bad = err > torch.finfo(dtype).eps * w.double().abs().max().item()
    assert torch.all(tie[bad])


@pytest.mark.parametrize("in_features", [64, 97])
@pytest.mark.parametrize("fmt", CONFIGS, ids=CONFIG_IDS)
def test_empty_has_the_layout_of_encode(fmt, in_features):
    shape = (24, in_features)
    encoded = fmt.encode(weight(*shape))
    empty = fmt.empty(shape)
    assert set(empty) == set(encoded)
    for key in encoded:
        assert empty[key].shape == encoded[key].shape, key
        assert empty[key].dtype == encoded[key].dtype, key


def test_int4_storage_is_packed_levels():
    fmt = WeightFormat("int4", group_size=32, symmetric=True)
    w = weight(8, 97, seed=3)
    t = fmt.encode(w)
    n = w.numel()
    assert t["weight"].dtype == torch.uint8 and t["weight"].numel() == math.ceil(n / 2)
    b = t["weight"].to(torch.int64)
    nibbles = torch.stack([b // 16, b % 16], dim=1).reshape(-1)[:n]  # high nibble first
    q, _, _ = int_symmetric_ref(w, 4, group_ids((8, 97), "group", 32))
    levels = nibbles - 7  # stored as level − qmin
    assert torch.equal(levels.double(), q)
    assert t["scale"].shape == (8 * math.ceil(97 / 32),)


def test_int8_affine_storage():
    fmt = WeightFormat("int8", symmetric=False)
    t = fmt.encode(weight(8, 40))
    assert t["weight"].dtype == torch.uint8 and t["weight"].shape == (8, 40)
    assert t["zero_point"].dtype == torch.int16 and t["zero_point"].shape == (8,)


def test_nf4_storage_equals_bitsandbytes():
    w = weight(32, 128, seed=4)
    fmt = WeightFormat("nf4", block_size=64, double_quant=True)
    t = fmt.encode(w)
    packed_b, state_b = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    assert torch.equal(t["weight"], packed_b.flatten())
    assert torch.equal(t["nested_absmax"], state_b.state2.absmax)
    assert torch.equal(t["offset"], state_b.offset.reshape(1))
    # (uint8 absmax codes: compared in test_bnb_parity, where bnb's C kernel may differ by a code)
    t = WeightFormat("nf4", block_size=64, double_quant=False).encode(w)
    packed_b, state_b = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")
    assert torch.equal(t["weight"], packed_b.flatten()) and torch.equal(t["absmax"], state_b.absmax)


def test_config_serialises():
    for fmt in CONFIGS:
        d = json.loads(json.dumps(fmt.to_dict()))
        assert WeightFormat(**d) == fmt


@pytest.mark.parametrize(
    "kwargs",
    [
        {"name": "int5"},
        {"name": "NF4"},
        {"name": "fp8_e4m3", "symmetric": False},
        {"name": "fp8_e5m2", "symmetric": False},
        {"name": "nf4", "block_size": 1},
        {"name": "nf4", "block_size": 0},
        {"name": "int4", "group_size": 0},
        {"name": "int8", "group_size": -32},
    ],
)
def test_invalid_configs(kwargs):
    with pytest.raises(ValueError):
        WeightFormat(**kwargs)


@pytest.mark.parametrize("name", sorted({"nf4", "int4", "int8", "fp8_e4m3", "e2m1", "fp4", "fp8_e5m2"}))
def test_non_matrix_weight_rejected(name):
    fmt = WeightFormat(name)
    for bad in (torch.randn(64), torch.randn(2, 4, 8)):
        with pytest.raises(ValueError, match="2-D"):
            fmt.encode(bad)


def test_non_finite_weight_rejected():
    w = weight(4, 64)
    w[0, 0] = float("nan")
    for name in FORMATS:
        with pytest.raises(ValueError, match="NaN/inf"):
            WeightFormat(name).encode(w)
