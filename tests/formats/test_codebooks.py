"""Codebooks against published tables, an independent float64 derivation, and bitsandbytes' own maps."""

import bitsandbytes.functional as bnbF
import pytest
import torch

from lowbit.formats import (
    FP8_DTYPES,
    NF4_TABLE,
    bnb_fp4_codebook,
    dynamic_codebook,
    e2m1_codebook,
    get_codebook,
    nearest_code,
    nf4_codebook,
    nf4_from_quantiles,
)

from ._reference import NF4_PUBLISHED, nearest_index, nf4_from_normal_quantiles


def test_nf4_table_equals_published_values():
    published = torch.tensor(NF4_PUBLISHED, dtype=torch.float64)
    torch.testing.assert_close(torch.tensor(NF4_TABLE, dtype=torch.float64), published, rtol=0, atol=1e-7)
    torch.testing.assert_close(nf4_codebook().double(), published, rtol=0, atol=1e-7)
    assert nf4_codebook().dtype == torch.float32


def test_nf4_table_equals_bitsandbytes_exactly():
    assert torch.equal(nf4_codebook(), bnbF.get_4bit_type("nf4", device="cpu"))


def test_nf4_from_quantiles_matches_table_and_independent_derivation():
    derived = nf4_from_quantiles()
    assert derived.dtype == torch.float64
    # Independent float64 derivation (statistics.NormalDist, no torch.special): same construction,
    # so it agrees to float64 rounding.
    torch.testing.assert_close(derived, nf4_from_normal_quantiles(), rtol=0, atol=1e-12)
    # The published table was computed through a float32 linspace, so the exact float64 quantiles
    # differ from it by up to ~1.1e-7: 1e-7 is too tight by ~1e-8, 2e-7 is the honest bound.
    table = torch.tensor(NF4_TABLE, dtype=torch.float64)
    err = (derived - table).abs().max().item()
    assert err <= 2e-7
    assert err > 0  # it really is a derivation, not the table itself


def test_nf4_structure():
    code = nf4_codebook()
    assert code.numel() == 16
    assert torch.all(code[1:] > code[:-1])  # strictly sorted ascending
    assert (code == 0).sum() == 1 and code[7] == 0.0
    assert (code > 0).sum() == 8 and (code < 0).sum() == 7
    assert code[0] == -1.0 and code[-1] == 1.0


def test_bnb_fp4_codebook_equals_bitsandbytes_exactly():
    ours, theirs = bnb_fp4_codebook(), bnbF.get_4bit_type("fp4", device="cpu")
    assert ours.dtype == theirs.dtype == torch.float32
    assert torch.equal(ours, theirs)
    assert not torch.signbit(ours[8])  # bitsandbytes' "negative zero" slot holds +0.0


def test_e2m1_codebook_is_ocp_fp4():
    # OCP MX spec, E2M1: bit pattern s e1 e0 m; magnitudes 0, 0.5 (subnormal), 1, 1.5, 2, 3, 4, 6.
    mags = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64) / 6
    expected = torch.cat([mags, -mags])
    code = e2m1_codebook()
    assert code.numel() == 16
    # lowbit stores float32, so each value is the float32 rounding of the exact one (half an ulp <= 3e-8).
    torch.testing.assert_close(code.double(), expected, rtol=0, atol=3e-8)
    assert torch.equal(code, expected.float())
    assert torch.equal(torch.signbit(code), torch.arange(16) >= 8)  # index 8 is -0.0: sign bit set


def test_dynamic_codebook_equals_bitsandbytes_exactly():
    ours, theirs = dynamic_codebook(), bnbF.create_dynamic_map(signed=True)
    assert ours.dtype == theirs.dtype == torch.float32
    assert torch.equal(ours, theirs)
    assert ours.numel() == 256
    assert torch.all(ours[1:] > ours[:-1])
    assert (ours == 0).any() and (ours == 1).any() and ours.max() == 1.0
    assert ours.min() > -1.0  # the signed map has +1 but its most negative value is -0.99...


@pytest.mark.parametrize("kind, fmax", [("fp8_e4m3", 448.0), ("fp8_e5m2", 57344.0)])
def test_fp8_dtypes_max(kind, fmax):
    dtype = FP8_DTYPES[kind]
    assert dtype == {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}[kind]
    assert torch.finfo(dtype).max == fmax
    # round trip of the largest finite value through the dtype
    assert torch.tensor([fmax]).to(dtype).float().item() == fmax


def test_get_codebook_names():
    assert torch.equal(get_codebook("nf4"), nf4_codebook())
    assert torch.equal(get_codebook("fp4"), bnbF.get_4bit_type("fp4", device="cpu"))
    assert torch.equal(get_codebook("e2m1"), e2m1_codebook())
    with pytest.raises(ValueError, match="unknown 4-bit codebook"):
        get_codebook("int3")


@pytest.mark.parametrize("name", ["nf4", "fp4", "e2m1"])
def test_nearest_code_matches_float64_argmin(name):
    code = get_codebook(name)
    torch.manual_seed(0)
    x = torch.rand(20_000) * 2 - 1
    x = torch.cat([x, torch.tensor([-1.0, 1.0, 0.0])])
    ours = nearest_code(x, code)
    ref = nearest_index(x, code)
    # Compare values, not indices: fp4/e2m1 hold zero twice (+0 and the sign-bit slot).
    assert torch.equal(code[ours].double(), code.double()[ref])


@pytest.mark.parametrize("name", ["nf4", "fp4"])
def test_nearest_code_ties_go_to_smaller_value(name):
    code = get_codebook(name)
    values = code.unique()  # sorted distinct values
    mids = (values[:-1] + values[1:]) / 2  # exactly representable midpoints, computed in float32
    assert torch.equal(code[nearest_code(mids, code)], values[:-1])
