"""The shared-table, float16-pair GEMV (`lut4_gemv_shared`) against float64, under Triton's interpreter.

The interpreter runs the float16 pair arithmetic as float16 NumPy (the PTX `mul.rn.f16x2` / `add.rn.f16x2`
round the same way, per lane); the compiled PTX path is checked to build for sm_90 by test_cuda_compile.py
and timed on the GPU by bench/gpu_kernels.py.
"""

import pytest
import torch

pytest.importorskip("triton", reason="Triton is not installed: pip install 'lowbit[gpu]'")

from lowbit.formats import WeightFormat  # noqa: E402
from lowbit.kernels.lut4 import lut4_weight  # noqa: E402
from lowbit.kernels.lut4_gemv_shared import half_tables, lut4_gemv_shared, prepare_x, supports  # noqa: E402
from tests.kernels.test_triton_interpreted import rel_err  # noqa: E402

CONFIG = {"BN": 8, "BK": 128, "num_warps": 4, "num_stages": 1}
FORMATS = [WeightFormat("nf4", block_size=64, double_quant=True), WeightFormat("nf4", block_size=64),
           WeightFormat("fp4", block_size=64), WeightFormat("e2m1", block_size=32),
           WeightFormat("int4", group_size=128, symmetric=True), WeightFormat("int4", group_size=32, symmetric=False),
           WeightFormat("int4", group_size=128, symmetric=False)]  # fmt: skip  (the last two: GPTQ-style zero points)


def make(fmt, shape, seed):
    torch.manual_seed(seed)
    storage = fmt.encode(torch.randn(shape))
    return lut4_weight(fmt, storage, shape), fmt.decode(storage, shape, torch.float32).double()


@pytest.mark.parametrize("mode", ["byte", "nibble"])
@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f"{f.name}-{f.block_size or f.group_size}-{f.symmetric}")
def test_matches_float64(fmt, mode):
    """N not a multiple of BN, K not a multiple of BK (a masked tail), 16-bit and 32-bit x, 1 and 3 rows."""
    w, dense = make(fmt, (44, 384), 3)
    assert supports(torch.zeros(1, 384), w)
    for dtype, m in ((torch.float32, 1), (torch.bfloat16, 1), (torch.float16, 3), (torch.float32, 6)):  # padded rows
        x = torch.randn(m, 384).to(dtype)
        y = lut4_gemv_shared(x, w, mode, CONFIG)
        assert y.dtype == dtype and y.shape == (m, 44)
        assert torch.equal(lut4_gemv_shared(x, w, mode, CONFIG | {"AHEAD": True}), y)  # loads a step ahead
        # float16 products and group sums; a bfloat16 y also carries the interpreter's truncating cast
        assert rel_err(y, x.double() @ dense.t()) < (8e-3 if dtype == torch.bfloat16 else 4e-3)


def test_large_and_tiny_activations_keep_their_precision():
    """x is scaled by a power of two into float16's range: an activation of 3e5 (beyond float16) or of 1e-6
    everywhere (float16 subnormals) gives the same relative error as x ~ N(0, 1)."""
    w, dense = make(FORMATS[0], (16, 256), 4)
    base = torch.randn(1, 256)
    for scale in (1.0, 3e5, 1e-6):
        x = (base * scale).to(torch.bfloat16)
        assert rel_err(lut4_gemv_shared(x, w, "byte", CONFIG), x.double() @ dense.t()) < 8e-3
    x = base.clone()
    x[0, 7] = 4e4  # one outlier feature
    assert rel_err(lut4_gemv_shared(x, w, "byte", CONFIG), x.double() @ dense.t()) < 4e-3


def test_prepared_x_and_tables():
    x = torch.tensor([[0.75, -3.0, 5.0, 1e-3]])
    x2, inv, _ = prepare_x(x)
    assert inv.item() == 8.0  # max |x| = 5 < 8: x is scaled by 1/8
    halves = x2.view(torch.float16).float().view(1, 4) * inv
    torch.testing.assert_close(halves, x, rtol=1e-3, atol=0)
    x = torch.randn(2, 300)  # group sums for zero points: 3 groups of 128, the last one partial
    x2, inv, sums = prepare_x(x, group_size=128)
    scaled = x2.view(torch.float16).float().view(2, 300)
    want = torch.stack([scaled[:, i : i + 128].sum(1) for i in (0, 128, 256)], 1)
    torch.testing.assert_close(sums, want, rtol=1e-5, atol=1e-5)
    table = torch.linspace(-1, 1, 16)
    pairs = half_tables(table, "byte").view(torch.float16).view(256, 2).float()
    byte = 0x3C  # high nibble 3 (the even column), low nibble 12
    torch.testing.assert_close(pairs[byte], table[[3, 12]], rtol=1e-3, atol=0)
    assert half_tables(table, "nibble").shape == (16,)
    centered = half_tables(torch.arange(16.0), "nibble", 7.5).view(torch.float16)[::2].float()  # int4 0…15
    torch.testing.assert_close(centered, torch.arange(16.0) - 7.5)


def test_what_it_does_not_take():
    w, _ = make(WeightFormat("int4", group_size=None), (8, 64), 5)  # one scale per row
    assert not supports(torch.zeros(1, 64), w)
    w, _ = make(FORMATS[0], (8, 64), 5)
    assert supports(torch.zeros(8, 64), w) and not supports(torch.zeros(9, 64), w)  # up to 8 rows of x
    with pytest.raises(ValueError, match="1 to 8 rows of x"):
        lut4_gemv_shared(torch.zeros(9, 64), w)
    with pytest.raises(ValueError, match="cover a whole group"):
        lut4_gemv_shared(torch.zeros(1, 64), w, "byte", {"BN": 8, "BK": 32, "num_warps": 4, "num_stages": 1})
    with pytest.raises(ValueError, match="mode"):
        half_tables(torch.zeros(16), "word")

