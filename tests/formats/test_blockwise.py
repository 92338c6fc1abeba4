"""Blockwise absmax 4-bit quantization, packing and double quantization against float64 references."""

import math

import bitsandbytes.functional as bnbF
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.formats import (
    dequantize_4bit,
    dequantize_blockwise,
    pack_4bit,
    quantize_4bit,
    quantize_blockwise,
    unpack_4bit,
)

from ._reference import (
    NF4_PUBLISHED,
    blockwise_4bit_ref,
    boundary_distance,
    double_quant_ref,
    dynamic_map_bnb,
    nearest_index,
)

CODEBOOK_REFS = {
    # published / peer tables, not lowbit's
    "nf4": lambda: bnbF.get_4bit_type("nf4", device="cpu").double(),
    "fp4": lambda: bnbF.get_4bit_type("fp4", device="cpu").double(),
    "e2m1": lambda: torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6]).double() / 6,
}


def codes_of(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Unpack high-nibble-first bytes written out by hand here (not lowbit's unpack)."""
    b = packed.reshape(-1).to(torch.int64)
    return torch.stack([b // 16, b % 16], dim=1).reshape(-1)[:n]


def assert_codes_match_reference(codes, x, name, block):
    """lowbit's codes stand for the same codebook value as the float64 argmin, except at ties.

    Returns (codebook value of each code, float64, validated against the reference; reference absmax).
    On random float32 data ties are measure-zero, but fp16/bf16 inputs sit on a coarse grid, so
    x / absmax can fall exactly on (or within float32 rounding of) a decision boundary; lowbit scales
    by a float32 reciprocal, as bitsandbytes does, and either neighbour is then a nearest entry.
    """
    ref_table = CODEBOOK_REFS[name]()
    ref_idx, ref_absmax, scaled = blockwise_4bit_ref(x, ref_table, block)
    values = ref_table[codes.long()]
    mismatch = values != ref_table[ref_idx]
    if mismatch.any():
        near = boundary_distance(scaled[mismatch], ref_table) < 1e-6
        assert near.all(), f"{(~near).sum()} codes differ from the float64 nearest entry away from a tie"
        assert mismatch.sum() <= max(2, 5e-3 * x.numel())
    return values, ref_absmax


@pytest.mark.parametrize("name", ["nf4", "fp4", "e2m1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("block", [64, 128, 32])
def test_quantize_4bit_codes_match_float64_reference(name, dtype, block):
    torch.manual_seed(1)
    w = torch.randn(48, 96).to(dtype)
    packed, state = quantize_4bit(w, name, block, double_quant=False)
    assert packed.dtype == torch.uint8 and packed.shape == (w.numel() // 2,)
    codes = codes_of(packed, w.numel())
    values, ref_absmax = assert_codes_match_reference(codes, w, name, block)
    assert state.absmax.dtype == torch.float32
    torch.testing.assert_close(state.absmax.double(), ref_absmax, rtol=0, atol=0)  # absmax is exact
    # dequantized: codebook value × absmax, computed by the reference in float64
    expected = values * ref_absmax.repeat_interleave(block)[: w.numel()]
    out = dequantize_4bit(packed, state)
    assert out.dtype == dtype and out.shape == w.shape
    tol = torch.finfo(dtype).eps * ref_absmax.max().item()
    torch.testing.assert_close(out.double().reshape(-1), expected, rtol=0, atol=tol)


@pytest.mark.parametrize("name", ["nf4", "fp4", "e2m1"])
@pytest.mark.parametrize(
    "shape, block", [((7, 13), 64), ((3, 37), 64), ((1,), 64), ((5, 64), 128), ((129,), 64), ((2, 3, 11), 16)]
)
def test_odd_and_non_divisible_sizes(name, shape, block):
    torch.manual_seed(2)
    w = torch.randn(*shape)
    n = w.numel()
    packed, state = quantize_4bit(w, name, block, double_quant=False)
    assert packed.numel() == math.ceil(n / 2)
    assert state.absmax.numel() == math.ceil(n / block)
    values, ref_absmax = assert_codes_match_reference(codes_of(packed, n), w, name, block)
    # short last block: its absmax is the absmax of its own few values
    torch.testing.assert_close(state.absmax.double(), ref_absmax, rtol=0, atol=0)
    if n % 2:  # the spare low nibble of the last byte holds the code of 0.0
        spare = int(packed[-1]) % 16
        assert CODEBOOK_REFS[name]()[spare] == 0.0
    out = dequantize_4bit(packed, state)
    expected = values * ref_absmax.repeat_interleave(block)[:n]
    torch.testing.assert_close(out.double().reshape(-1), expected, rtol=0, atol=1e-6 * ref_absmax.max().item())


@pytest.mark.parametrize("name", ["nf4", "fp4"])
def test_all_zero_blocks_give_exact_zeros(name):
    w = torch.randn(4, 64)
    w[1] = 0.0  # one full block of zeros
    w[3, 32:] = 0.0  # half a block
    for double_quant in (False, True):
        packed, state = quantize_4bit(w, name, 64, double_quant)
        out = dequantize_4bit(packed, state)
        assert torch.all(out[1] == 0)
        assert torch.all(out[3, 32:] == 0)
        assert torch.isfinite(out).all()
    packed, state = quantize_4bit(torch.zeros(3, 64), name, 64, double_quant=False)
    assert torch.equal(state.absmax, torch.zeros(3))
    assert torch.equal(dequantize_4bit(packed, state), torch.zeros(3, 64))


@pytest.mark.parametrize("magnitude", [1e-30, 1e30, 1e-20, 1e20])
@pytest.mark.parametrize("name", ["nf4", "fp4"])
def test_tiny_and_huge_values(name, magnitude):
    torch.manual_seed(3)
    w = torch.randn(8, 64) * magnitude
    packed, state = quantize_4bit(w, name, 64, double_quant=False)
    values, ref_absmax = assert_codes_match_reference(codes_of(packed, w.numel()), w, name, 64)
    out = dequantize_4bit(packed, state)
    assert torch.isfinite(out).all()
    expected = values * ref_absmax.repeat_interleave(64)
    torch.testing.assert_close(out.double().reshape(-1), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_double_quant_reconstructs_absmax_within_dynamic_map_error(name, dtype):
    torch.manual_seed(4)
    # 700 blocks of 64: three nested blocks of 256, the last one short
    w = (torch.randn(700, 64) * torch.rand(700, 1) * 3).to(dtype)
    packed_dq, state = quantize_4bit(w, name, 64, double_quant=True)
    packed, plain = quantize_4bit(w, name, 64, double_quant=False)
    assert torch.equal(packed_dq, packed)  # double quant changes the constants, never the codes
    assert state.absmax.dtype == torch.uint8 and state.absmax.shape == (700,)
    assert state.nested.absmax.dtype == torch.float32 and state.nested.absmax.shape == (3,)
    assert state.nested.block_size == 256
    assert state.offset.dtype == torch.float32 and state.offset.dim() == 0

    true_absmax = w.double().reshape(700, 64).abs().amax(dim=1)
    torch.testing.assert_close(state.offset.double(), true_absmax.mean(), rtol=1e-6, atol=0)
    centred = true_absmax - true_absmax.mean()
    nested_ref = torch.stack([centred[i : i + 256].abs().max() for i in range(0, 700, 256)])
    torch.testing.assert_close(state.nested.absmax.double(), nested_ref, rtol=1e-6, atol=0)

    # each reconstructed constant is within the nearest-dynamic-map-entry error of the true one
    dyn = dynamic_map_bnb()
    nested_per = nested_ref.repeat_interleave(256)[:700]
    c = centred / nested_per
    nearest_err = (c[:, None] - dyn[None, :]).abs().min(dim=1).values * nested_per
    recon = state.block_absmax().double()
    err = (recon - true_absmax).abs()
    assert torch.all(err <= nearest_err + 1e-6 * true_absmax.max())
    # the dynamic map's largest gap is 0.9 / 64 near ±1, so the error is at most ~0.7 % of the nested scale
    assert torch.all(err <= 0.0071 * nested_per + 1e-6)
    torch.testing.assert_close(recon, double_quant_ref(true_absmax), rtol=0, atol=1e-6 * true_absmax.max().item())

    # dequantization uses the reconstructed constants
    out = dequantize_4bit(packed_dq, state)
    values, _ = assert_codes_match_reference(codes_of(packed_dq, w.numel()), w, name, 64)
    expected = values.reshape(700, 64) * recon[:, None]
    tol = torch.finfo(dtype).eps * true_absmax.max().item() * 2
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=tol)


def test_bits_per_parameter_nf4_double_quant():
    w = torch.randn(4096, 4096)
    n = w.numel()
    n_blocks = n // 64
    n_nested = math.ceil(n_blocks / 256)
    # 4-bit codes + uint8 per block of 64 + fp32 per 256 blocks + one fp32 offset, per parameter
    expected = (4 * n + 8 * n_blocks + 32 * n_nested + 32) / n
    assert math.isclose(expected, 4 + 8 / 64 + 32 / (64 * 256) + 32 / n)
    _, state = quantize_4bit(w, "nf4", 64, double_quant=True)
    assert state.bits_per_parameter() == pytest.approx(expected, rel=1e-12)
    assert state.bits_per_parameter() == pytest.approx(4.127, abs=5e-4)
    _, plain = quantize_4bit(w[:256], "nf4", 64, double_quant=False)
    assert plain.bits_per_parameter() == pytest.approx(4 + 32 / 64, rel=1e-12)


@settings(max_examples=25, deadline=None)
@given(
    name=st.sampled_from(["nf4", "fp4", "e2m1"]),
    shape=st.lists(st.integers(1, 40), min_size=1, max_size=3),
    block=st.sampled_from([2, 3, 16, 64, 100]),
    log_scale=st.floats(-20, 20),
    seed=st.integers(0, 2**31 - 1),
)
def test_quantize_4bit_property_random_shapes(name, shape, block, log_scale, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g) * 10.0**log_scale
    packed, state = quantize_4bit(w, name, block, double_quant=False)
    values, ref_absmax = assert_codes_match_reference(codes_of(packed, w.numel()), w, name, block)
    out = dequantize_4bit(packed, state)
    expected = values * ref_absmax.repeat_interleave(block)[: w.numel()]
    torch.testing.assert_close(out.double().reshape(-1), expected, rtol=1e-6, atol=0)


# ------------------------------------------------------------------------------------ packing


def test_pack_high_nibble_first_on_hand_written_bytes():
    codes = torch.tensor([1, 2, 3, 4, 15, 0, 10, 11], dtype=torch.uint8)
    assert pack_4bit(codes).tolist() == [0x12, 0x34, 0xF0, 0xAB]
    assert unpack_4bit(torch.tensor([0x12, 0x34, 0xF0, 0xAB], dtype=torch.uint8), 8).tolist() == codes.tolist()
    # odd count: the last byte's low nibble is padding
    assert pack_4bit(torch.tensor([1, 2, 3, 4, 5], dtype=torch.uint8)).tolist() == [0x12, 0x34, 0x50]
    assert unpack_4bit(torch.tensor([0x12, 0x34, 0x5F], dtype=torch.uint8), 5).tolist() == [1, 2, 3, 4, 5]
    assert unpack_4bit(torch.tensor([0xFF], dtype=torch.uint8), 1).tolist() == [15]


def test_dequantize_rejects_wrong_packed_size():
    packed, state = quantize_4bit(torch.randn(4, 64), "nf4", 64, double_quant=False)
    with pytest.raises(ValueError):
        dequantize_4bit(packed[:-1], state)
    with pytest.raises(ValueError):
        dequantize_4bit(torch.cat([packed, packed[:1]]), state)


def test_unpack_rejects_wrong_count():
    packed = torch.tensor([0x12, 0x34], dtype=torch.uint8)
    for n in (0, 1, 2, 5, 6):
        with pytest.raises(ValueError):
            unpack_4bit(packed, n)


def test_unpack_accepts_bnb_shaped_and_int8_storage():
    packed = torch.tensor([[0x12], [0xF0]], dtype=torch.uint8)  # bitsandbytes returns (n/2, 1)
    assert unpack_4bit(packed, 4).tolist() == [1, 2, 15, 0]
    assert unpack_4bit(packed.view(torch.int8), 4).tolist() == [1, 2, 15, 0]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 15), min_size=1, max_size=300))
def test_pack_unpack_round_trip(values):
    codes = torch.tensor(values, dtype=torch.uint8)
    packed = pack_4bit(codes)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(len(values) / 2)
    assert codes_of(packed, len(values)).tolist() == values  # independent unpacking
    assert torch.equal(unpack_4bit(packed, len(values)), codes)


# --------------------------------------------------------------------- quantize_blockwise (8-bit)


@pytest.mark.parametrize("block", [256, 64, 100])
def test_quantize_blockwise_dynamic_map_matches_float64_nearest(block):
    torch.manual_seed(5)
    x = torch.randn(3000) * torch.rand(3000)
    dyn = dynamic_map_bnb()
    codes, absmax = quantize_blockwise(x, dyn.float(), block)
    assert codes.dtype == torch.uint8 and codes.shape == (3000,)
    ref_idx, ref_absmax, scaled = blockwise_4bit_ref(x, dyn, block)
    torch.testing.assert_close(absmax.double(), ref_absmax, rtol=0, atol=0)
    mismatch = codes.long() != ref_idx
    assert (boundary_distance(scaled[mismatch], dyn) < 1e-6).all()
    assert mismatch.sum() <= 3
    out = dequantize_blockwise(codes, absmax, dyn.float(), block)
    expected = dyn[codes.long()] * ref_absmax.repeat_interleave(block)[:3000]
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=0)


def test_nf4_reference_table_is_published():
    # guard for the reference itself: the bitsandbytes table used above is the published one
    torch.testing.assert_close(CODEBOOK_REFS["nf4"](), torch.tensor(NF4_PUBLISHED).double(), rtol=0, atol=1e-7)
    assert nearest_index(torch.tensor([0.0]), CODEBOOK_REFS["nf4"]()).item() == 7


# ------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_rejected(bad):
    w = torch.randn(4, 64)
    w[2, 5] = bad
    with pytest.raises(ValueError, match="NaN/inf"):
        quantize_4bit(w)
    with pytest.raises(ValueError, match="NaN/inf"):
        quantize_blockwise(w, dynamic_map_bnb().float(), 64)


def test_empty_rejected():
    with pytest.raises(ValueError, match="empty"):
        quantize_4bit(torch.empty(0, 64))


@pytest.mark.parametrize("dtype", [torch.int8, torch.int32, torch.int64, torch.uint8, torch.bool])
def test_integer_input_rejected(dtype):
    with pytest.raises(TypeError, match="dtype"):
        quantize_4bit(torch.ones(4, 64, dtype=dtype))


def test_non_tensor_and_bad_arguments_rejected():
    with pytest.raises(TypeError):
        quantize_4bit([[1.0, 2.0]])
    with pytest.raises(ValueError, match="unknown 4-bit codebook"):
        quantize_4bit(torch.randn(4, 64), quant_type="int4")
    with pytest.raises(ValueError, match="block_size"):
        quantize_blockwise(torch.randn(64), dynamic_map_bnb().float(), 0)


@pytest.mark.parametrize("double_quant", [False, True])
def test_dequantize_into_a_buffer_is_bit_identical(double_quant):
    torch.manual_seed(4)
    w = torch.randn(48, 128)
    packed, state = quantize_4bit(w, "nf4", 64, double_quant=double_quant)
    want = dequantize_4bit(packed, state)
    out = torch.full((48 * 128 + 10,), float("nan"))  # larger than needed: the head is used
    got = dequantize_4bit(packed, state, out=out)
    assert torch.equal(got, want) and got.data_ptr() == out.data_ptr()
    assert torch.equal(dequantize_4bit(packed, state, torch.bfloat16, out=out), want.to(torch.bfloat16))
    for bad in (torch.empty(48 * 128 - 1), torch.empty(48 * 128, dtype=torch.float64), torch.empty(2, 48 * 128).t()):
        with pytest.raises(ValueError, match="out must be"):
            dequantize_4bit(packed, state, out=bad)
    odd_packed, odd_state = quantize_4bit(torch.randn(5, 13), "nf4", 64)  # blocks do not tile it: no buffer
    assert torch.equal(dequantize_4bit(odd_packed, odd_state, out=out), dequantize_4bit(odd_packed, odd_state))
