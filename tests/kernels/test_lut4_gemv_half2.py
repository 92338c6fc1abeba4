"""The half2 word GEMV (`lut4_gemv_half2`) against float64, under Triton's interpreter.

The interpreter has no PTX: the kernel then computes each word's float16 pair from the 16-entry table in
memory with float16 NumPy, in the same lanes as `lut4_asm.dot_asm`, whose PTX is run instruction by
instruction in test_lut4_asm.py; test_cuda_compile.py builds the kernel for sm_90 and bench/gemv_sweep.py
checks and times it on the GPU.
"""

import pytest
import torch

pytest.importorskip("triton", reason="Triton is not installed: pip install 'lowbit[gpu]'")

from lowbit.formats import WeightFormat  # noqa: E402
from lowbit.kernels.lut4 import lut4_weight  # noqa: E402
from lowbit.kernels.lut4_gemv_half2 import (  # noqa: E402
    SLICE,
    hopper_single_row_launch,
    lut4_gemv_half2,
    nibble_table,
    prepare_x,
    supports,
)
from tests.kernels.test_triton_interpreted import rel_err  # noqa: E402

CONFIG = {"BN": 8, "BK": 128, "num_warps": 4}
FORMATS = [WeightFormat("nf4", block_size=64, double_quant=True), WeightFormat("nf4", block_size=64),
           WeightFormat("fp4", block_size=64), WeightFormat("e2m1", block_size=32),
           WeightFormat("int4", group_size=128, symmetric=True), WeightFormat("int4", group_size=32, symmetric=False),
           WeightFormat("int4", group_size=128, symmetric=False)]  # fmt: skip  (the last two: GPTQ-style zero points)


def make(fmt, shape, seed):
    torch.manual_seed(seed)
    storage = fmt.encode(torch.randn(shape))
    return lut4_weight(fmt, storage, shape), fmt.decode(storage, shape, torch.float32).double()


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f"{f.name}-{f.block_size or f.group_size}-{f.symmetric}")
def test_matches_float64(fmt):
    """N not a multiple of BN, K not a multiple of BK (a masked tail), 16-bit and 32-bit x, 1 to 8 rows."""
    w, dense = make(fmt, (44, 384), 3)
    assert supports(torch.zeros(1, 384), w)
    for dtype, m in ((torch.float32, 1), (torch.bfloat16, 1), (torch.float16, 3), (torch.float32, 6),
                     (torch.bfloat16, 8)):  # fmt: skip
        x = torch.randn(m, 384).to(dtype)
        y = lut4_gemv_half2(x, w, CONFIG)
        assert y.dtype == dtype and y.shape == (m, 44)
        # float16 products and group sums; a bfloat16 y also carries the interpreter's truncating cast
        assert rel_err(y, x.double() @ dense.t()) < (8e-3 if dtype == torch.bfloat16 else 4e-3)


def test_unmasked_tiles_give_the_masked_result():
    """K and N multiples of the tile take the loads without masks (EVEN); other tiles of the same weight the
    masked ones: the same numbers."""
    w, dense = make(FORMATS[0], (64, 512), 6)
    x = torch.randn(2, 512).to(torch.bfloat16)
    even = lut4_gemv_half2(x, w, {"BN": 8, "BK": 256, "num_warps": 4})
    masked = lut4_gemv_half2(x, w, {"BN": 32, "BK": 1024, "num_warps": 4})  # BK > K: masked
    assert torch.equal(even, masked)
    assert rel_err(even, x.double() @ dense.t()) < 8e-3


@pytest.mark.parametrize("fmt", [FORMATS[0], FORMATS[5]], ids=["nf4-dq", "int4-zero-points"])
def test_loads_ahead_and_shared_table_launches_give_the_same_numbers(fmt):
    """AHEAD loads each step's successor while computing it (past the last step it reloads the last one); SMEM
    keeps the byte table in shared memory (on the GPU; here the same lanes from memory). Over tiles that leave a
    masked tail in K (384 = 256 + 128) and in N (44 rows), with one step or several, they give the plain
    launch's numbers exactly: the same products in the same order."""
    w, dense = make(fmt, (44, 384), 8)
    for m in (1, 3):
        x = torch.randn(m, 384).to(torch.bfloat16)
        for tile in ({"BN": 8, "BK": 128}, {"BN": 16, "BK": 256}, {"BN": 4, "BK": 512}):
            plain = lut4_gemv_half2(x, w, tile | {"num_warps": 4})
            for extra in ({"AHEAD": True}, {"SMEM": True}, {"SMEM": True, "AHEAD": True, "COPIES": 16}):
                assert torch.equal(lut4_gemv_half2(x, w, tile | extra | {"num_warps": 4}), plain), (tile, extra)
            assert rel_err(plain, x.double() @ dense.t()) < 8e-3


def test_large_and_tiny_activations_keep_their_precision():
    """x is scaled by a power of two into float16's range: an activation of 3e5 (beyond float16) or of 1e-6
    everywhere (float16 subnormals) gives the same relative error as x ~ N(0, 1)."""
    w, dense = make(FORMATS[0], (16, 256), 4)
    base = torch.randn(1, 256)
    for scale in (1.0, 3e5, 1e-6):
        x = (base * scale).to(torch.bfloat16)
        assert rel_err(lut4_gemv_half2(x, w, CONFIG), x.double() @ dense.t()) < 8e-3
    x = base.clone()
    x[0, 7] = 4e4  # one outlier feature
    assert rel_err(lut4_gemv_half2(x, w, CONFIG), x.double() @ dense.t()) < 4e-3


def test_prepared_x_in_word_order():
    """Pair q of 8-column word v is (x[8v + 2q + 1], x[8v + 2q]), stored in plane q at q·K/8 + v."""
    x = torch.arange(16.0).view(1, 16) / 16
    x2, inv, _ = prepare_x(x)
    assert inv.item() == 1.0
    halves = x2.view(torch.float16).float().view(1, 4, 2, 2) * inv  # (plane q, word v, lane)
    for q in range(4):
        for v in range(2):
            torch.testing.assert_close(halves[0, q, v], x[0, [8 * v + 2 * q + 1, 8 * v + 2 * q]], rtol=1e-3, atol=0)
    with pytest.raises(ValueError, match="divisible by 8"):
        prepare_x(torch.zeros(1, 12))
    x = torch.randn(2, 320)  # group sums for zero points: 3 groups of 128, the last one partial
    x2, inv, sums = prepare_x(x, group_size=128)
    scaled = x2.view(torch.float16).float().view(2, 4, 40, 2).sum(3)  # pair sums, plane q, word v
    words = scaled.permute(0, 2, 1).reshape(2, 160)  # back to column-pair order: (v, q) → 4v + q
    want = torch.stack([words[:, i : i + 64].sum(1) for i in (0, 64, 128)], 1)
    torch.testing.assert_close(sums, want, rtol=1e-4, atol=1e-4)
    centered = nibble_table(torch.arange(16.0), 7.5).to(torch.int16).view(torch.float16).float()  # int4 0…15
    torch.testing.assert_close(centered, torch.arange(16.0) - 7.5)


def test_each_slice_of_x_gets_its_own_scale():
    """x is scaled by a power of two per SLICE columns: a slice of activations ~1e4 next to one of ~1e-3 keeps
    both at float16's relative precision (one scale for the row would leave the small ones 2^-24-sized
    subnormals), and the GEMV over a row that mixes them matches float64."""
    x = torch.cat([torch.randn(1, SLICE) * 1e4, torch.randn(1, SLICE) * 1e-3, torch.randn(1, 256)], 1)
    x2, inv, _ = prepare_x(x)
    assert inv.shape == (1, 3) and inv[0, 0] > 2**13 and inv[0, 1] < 2**-6  # each slice: its max·2^e < 1
    halves = x2.view(torch.float16).float().view(4, -1, 2)  # (plane q, word v, lane): pair q of word v
    pairs = halves.permute(1, 0, 2).reshape(-1, 2)  # pair j = 4v + q, lanes (x[2j + 1], x[2j])
    back = torch.stack([pairs[:, 1], pairs[:, 0]], 1).reshape(1, -1) * inv.repeat_interleave(SLICE, 1)[:, : x.shape[1]]
    assert torch.allclose(back, x, rtol=2**-10, atol=0)
    w, dense = make(FORMATS[0], (16, x.shape[1]), 9)
    assert rel_err(lut4_gemv_half2(x, w, CONFIG), x.double() @ dense.t()) < 4e-3


def test_what_it_does_not_take():
    w, _ = make(WeightFormat("int4", group_size=None), (8, 64), 5)  # one scale per row
    assert not supports(torch.zeros(1, 64), w)
    w, _ = make(WeightFormat("nf4", block_size=64), (8, 36), 5)  # K not a multiple of 8
    assert not supports(torch.zeros(1, 36), w)
    w, _ = make(FORMATS[0], (8, 64), 5)
    assert supports(torch.zeros(8, 64), w) and not supports(torch.zeros(9, 64), w)  # up to 8 rows of x
    with pytest.raises(ValueError, match="1 to 8 rows of x"):
        lut4_gemv_half2(torch.zeros(9, 64), w)
    with pytest.raises(ValueError, match="whole groups"):
        lut4_gemv_half2(torch.zeros(1, 64), w, {"BN": 8, "BK": 32, "num_warps": 4})
    with pytest.raises(ValueError, match="unpipelined"):  # the shared table with the software pipeliner
        lut4_gemv_half2(torch.zeros(1, 64), w, {"BN": 8, "BK": 64, "num_warps": 4, "SMEM": True, "STAGES": 3})


def test_hopper_single_row_launches_by_aspect():
    """One row of x on Hopper takes a fixed launch by the weight's aspect (tall, wide, square); each is correct
    on a weight of that aspect (here with the interpreter's lanes), and a group larger than its step sends
    the call back to the autotuner."""
    for n, k in ((128, 64), (32, 512), (64, 64)):
        launch = hopper_single_row_launch(n, k, 64)
        w, dense = make(FORMATS[0], (n, k), 9)
        x = torch.randn(1, k).to(torch.bfloat16)
        assert rel_err(lut4_gemv_half2(x, w, launch), x.double() @ dense.t()) < 8e-3, (n, k)
    assert hopper_single_row_launch(8192, 1024, 64)["BK"] == 512  # tall: short steps, many rows a block
    assert hopper_single_row_launch(1024, 8192, 64)["BK"] == 2048  # wide: long steps
    assert hopper_single_row_launch(8192, 1024, 1024) is None  # a 1,024-column group spans two 512-column steps
