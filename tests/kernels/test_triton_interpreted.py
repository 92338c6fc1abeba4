"""The Triton kernels themselves, run by Triton's interpreter on the CPU (TRITON_INTERPRET=1, see conftest).

Every layout branch of the tile reader is reached: the paired fast path with grouped scales (one or
several groups per tile, and groups longer than a tile), per-row scales, zero points and double
quantization, and the generic path for odd K and flat blocks that span rows. Each kernel is checked
against x · Wᵀ in float64 with W decoded by `lowbit.formats` (the storage format's own decoder, tested
against bitsandbytes), never by the kernels' code.
"""

import pytest
import torch

triton = pytest.importorskip("triton", reason="Triton is not installed: pip install 'lowbit[gpu]' (make test installs it)")


def _interpreter_runs_loops() -> bool:
    """Triton ≤ 3.6's interpreter cannot use a run-time loop bound with NumPy ≥ 2.4 (int() of a 1-element array)."""
    import triton.language as tl

    @triton.jit
    def probe(out_ptr, n):
        for i in range(0, n, 1):
            tl.store(out_ptr + i, i)

    try:
        probe[(1,)](torch.zeros(2), 2)
        return True
    except Exception:  # noqa: BLE001 - any failure means the interpreter cannot run our kernels
        return False


if not _interpreter_runs_loops():
    pytest.skip(f"Triton {triton.__version__}'s interpreter cannot run loops with this NumPy; "
                "install a newer Triton (3.9 works)", allow_module_level=True)  # fmt: skip

from lowbit.formats import WeightFormat  # noqa: E402
from lowbit.kernels.int8_gemm import int8_scaled_mm  # noqa: E402
from lowbit.kernels.lut4 import lut4_weight  # noqa: E402
from lowbit.kernels.lut4_gemm import lut4_dequantize, lut4_gemm, lut4_gemm_grad_input  # noqa: E402
from lowbit.kernels.lut4_gemv import lut4_gemv  # noqa: E402
from lowbit.kernels.lut4_tile import kernel_args  # noqa: E402

# (format, (N, K), expected tile layout): SCALES 0 flat / 1 grouped / 2 per row, PAIRED fast path.
CASES = [
    (WeightFormat("nf4", block_size=64, double_quant=True), (48, 128), dict(SCALES=1, PAIRED=True)),
    (WeightFormat("nf4", block_size=128, double_quant=True), (16, 256), dict(SCALES=1, PAIRED=True)),  # GS > BK
    (WeightFormat("nf4", block_size=64, double_quant=True), (37, 77), dict(SCALES=0, PAIRED=False)),  # odd K
    (WeightFormat("fp4", block_size=64, double_quant=False), (40, 96), dict(SCALES=0, PAIRED=False)),  # spans rows
    (WeightFormat("e2m1", block_size=32, double_quant=False), (9, 64), dict(SCALES=1, PAIRED=True)),
    (WeightFormat("int4", group_size=32, symmetric=False), (24, 96), dict(SCALES=1, PAIRED=True, HAS_ZP=True)),
    (WeightFormat("int4", group_size=None, symmetric=True), (24, 100), dict(SCALES=2, PAIRED=True)),
    (WeightFormat("int4", group_size=16, symmetric=False), (10, 35), dict(SCALES=1, PAIRED=False, HAS_ZP=True)),
]
GEMV = {"BN": 4, "BK": 64, "num_warps": 4, "num_stages": 1}
GEMM = {"BM": 16, "BN": 16, "BK": 64, "num_warps": 4, "num_stages": 1}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def make(fmt: WeightFormat, shape: tuple[int, int], seed: int):
    torch.manual_seed(seed)
    storage = fmt.encode(torch.randn(shape))
    dense = fmt.decode(storage, shape, torch.float32).double()  # (N, K) reference weight
    return lut4_weight(fmt, storage, shape), dense


@pytest.mark.parametrize("case", range(len(CASES)))
def test_every_lut4_kernel_matches_float64(case):
    fmt, (n, k), layout = CASES[case]
    w, dense = make(fmt, (n, k), case)
    assert layout.items() <= kernel_args(w)[2].items()  # the case reaches the branch it is meant for
    for m in (1, 3):  # decode: batch 1 and a ragged batch
        x = torch.randn(m, k)
        assert rel_err(lut4_gemv(x, w, GEMV), x.double() @ dense.t()) < 1e-5
    x = torch.randn(19, k)  # M not a multiple of the tile
    for swap in (True, False):  # decoded weight as the left (register) or right (shared-memory) operand
        assert rel_err(lut4_gemm(x, w, GEMM | {"SWAP": swap}), x.double() @ dense.t()) < 1e-5
    g = torch.randn(19, n)
    assert rel_err(lut4_gemm_grad_input(g, w, GEMM), g.double() @ dense) < 1e-5
    torch.testing.assert_close(lut4_dequantize(w, torch.float32, (8, 32)).double(), dense, rtol=0, atol=0)
    # several tiles a program (the autotuner's looping launches), K not a multiple of BK · TILES
    torch.testing.assert_close(lut4_dequantize(w, torch.float32, (8, 32), tiles=3).double(), dense, rtol=0, atol=0)


def test_16_bit_gemv_within_rounding():
    # Only the GEMV: the interpreter's bf16 tl.dot is broken (Triton 3.9 gives ~1e10 on a plain bf16
    # dot), so the bf16 GEMM is checked on the GPU by bench/gpu_kernels.py instead.
    w, dense = make(WeightFormat("nf4"), (32, 128), 11)
    for dtype in (torch.bfloat16, torch.float16):  # 16-bit x is read as 32-bit words and split by bit ops
        x = torch.randn(4, 128).to(dtype)
        y = lut4_gemv(x, w, GEMV)
        assert y.dtype == dtype
        assert rel_err(y, x.double() @ dense.t()) < 1e-2


def test_int8_scaled_mm_kernel_is_exact_before_scaling():
    torch.manual_seed(12)
    a = torch.randint(-127, 128, (19, 72), dtype=torch.int8)
    b = torch.randint(-127, 128, (24, 72), dtype=torch.int8)
    sa, sb = torch.rand(19) + 0.5, torch.rand(24) + 0.5
    y = int8_scaled_mm(a, b, sa, sb, torch.float32, config={"BM": 16, "BN": 16, "BK": 32, "num_warps": 4,
                                                              "num_stages": 1})  # fmt: skip
    exact = a.double() @ b.double().t()  # integers below 2^53: exact in float64
    torch.testing.assert_close(y.double(), exact * sa.double()[:, None] * sb.double()[None, :], rtol=1e-6, atol=0)


def test_kernel_launchers_reject_bad_shapes():
    w, _ = make(WeightFormat("nf4"), (8, 64), 13)
    with pytest.raises(ValueError, match="at most 8 rows"):
        lut4_gemv(torch.randn(9, 64), w, GEMV)
    with pytest.raises(ValueError, match=r"row-major \(M, 64\)"):
        lut4_gemm(torch.randn(4, 63), w, GEMM)
    with pytest.raises(ValueError, match=r"row-major \(M, 8\)"):
        lut4_gemm_grad_input(torch.randn(4, 7), w, GEMM)


def test_the_cuda_forward_and_grad_input_pick_their_kernels_and_match_float64():
    """`ops.linear_cuda` (GEMV up to GEMV_MAX_M rows, else decode + matmul) and `linear_grad_input_cuda`: what
    the CUDA custom ops run, and what the fused QLoRA linear calls directly on a GPU."""
    from lowbit.kernels import ops

    w, dense = make(WeightFormat("nf4", block_size=64, double_quant=True), (48, 128), 0)
    for m in (1, ops.GEMV_MAX_M, ops.GEMV_MAX_M + 1, 0):
        x = torch.randn(m, 128)
        y = ops.linear_cuda(x, w, GEMV)
        assert y.shape == (m, 48)
        if m:
            assert rel_err(y, x.double() @ dense.t()) < 1e-5
    g = torch.randn(7, 48)
    assert rel_err(ops.linear_grad_input_cuda(g, w), g.double() @ dense) < 1e-5


def test_the_cuda_forward_and_grad_input_add_a_scaled_term_on_every_path():
    """beta·add rides in the matmul (the fused QLoRA linear's LoRA term): GEMV rows and decode + matmul rows."""
    from lowbit.kernels import ops

    w, dense = make(WeightFormat("nf4", block_size=64, double_quant=True), (48, 128), 2)
    for m in (1, ops.GEMV_MAX_M + 1):
        x, add = torch.randn(m, 128), torch.randn(m, 48)
        assert rel_err(ops.linear_cuda(x, w, GEMV, add=add, beta=0.5), x.double() @ dense.t() + 0.5 * add.double()) < 1e-5
    g, add = torch.randn(7, 48), torch.randn(7, 128)
    assert rel_err(ops.linear_grad_input_cuda(g, w, add=add, beta=2.0), g.double() @ dense + 2.0 * add.double()) < 1e-5


@pytest.mark.parametrize("capturing", [False, True], ids=["eager", "for graph replay"])
def test_the_cuda_forward_takes_the_half2_gemv_for_16_bit_x(capturing):
    """2 to 8 rows of 16-bit x always; one row only for a step made to be replayed as a CUDA graph (eagerly the
    register GEMV's single launch costs less host time)."""
    import contextlib

    from lowbit.kernels import ops
    from lowbit.kernels.lut4_gemv_half2 import lut4_gemv_half2

    w, dense = make(WeightFormat("nf4", block_size=64, double_quant=True), (48, 128), 1)
    for m, dtype in ((1, torch.bfloat16), (2, torch.bfloat16), (5, torch.float16), (8, torch.bfloat16),
                     (9, torch.bfloat16), (1, torch.float32)):  # fmt: skip
        x = torch.randn(m, 128).to(dtype)
        with ops.for_graph_replay() if capturing else contextlib.nullcontext():
            y = ops.linear_cuda(x, w, GEMV)
        assert y.dtype == dtype and rel_err(y, x.double() @ dense.t()) < 1e-2
        # bit-identical to the half2 kernel exactly where the ops route to it (its float16-pair rounding
        # differs from the register GEMV's and cuBLAS's)
        if m <= 8:
            routed = dtype != torch.float32 and (m > 1 or capturing)
            assert torch.equal(y, lut4_gemv_half2(x, w, config=GEMV)) == routed, m


def test_launch_tuned_reuses_the_chosen_config_per_tuning_key():
    """After the first launch per key the kernel runs directly with the config the autotuner chose; another key
    (here another N) goes through the autotuner again and gets its own choice."""
    import triton.language as tl

    from lowbit.kernels import autotune as tuning

    @triton.jit
    def fill(out_ptr, N, VALUE: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(out_ptr + offs, VALUE + BLOCK, mask=offs < N)

    def keep_one(configs, named_args, **kwargs):  # one config per N: the autotuner need not time anything
        return [c for c in configs if c.kwargs["BLOCK"] == (16 if kwargs["N"] < 50 else 32)]

    configs = [triton.Config({"BLOCK": 16}), triton.Config({"BLOCK": 32})]
    tuned = tuning.autotune(configs, ["N"], prune_configs_by={"early_config_prune": keep_one})(fill)
    for n, block in ((40, 16), (40, 16), (70, 32), (70, 32)):
        out = torch.zeros(n)
        tuning.launch_tuned(tuned, lambda meta: (triton.cdiv(n, meta["BLOCK"]),), out, N=n, VALUE=1.0)
        assert torch.equal(out, torch.full((n,), 1.0 + block)), (n, out)
    chosen = {k[1]: (launch["BLOCK"], grid) for k, (launch, grid) in tuning._CHOSEN.items() if k[0] == id(tuned)}
    assert chosen == {40: (16, (3,)), 70: (32, (3,))}  # the config and its grid, kept per key


def test_a_quant_linear_without_gradients_calls_the_cuda_kernels_directly(monkeypatch):
    """Inference skips the custom op's dispatch (host time a token pays once per linear); with an input that
    wants its gradient the op (differentiable) stays. CUDA stood in by the interpreter: `direct_cuda` forced."""
    from lowbit.kernels import dispatch, ops
    from lowbit.nn.quant_linear import QuantLinear

    calls = []
    real = ops.linear_cuda
    monkeypatch.setattr(dispatch, "direct_cuda", lambda x: True)
    monkeypatch.setattr(ops, "linear_cuda", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    fmt = WeightFormat("nf4", block_size=64, double_quant=True)
    layer = QuantLinear.from_linear(torch.nn.Linear(128, 48, bias=True), fmt)
    layer.kernel = "fused"
    dense = layer.dequantize(torch.float64)
    x = torch.randn(2, 3, 128)  # 6 rows: decode + matmul on this path (no autotuning under the interpreter)
    with torch.no_grad():
        y = layer(x)
    assert calls == [(6, 128)]
    want = x.double() @ dense.t() + layer.bias.double()
    assert y.shape == (2, 3, 48) and rel_err(y, want) < 1e-5
    x.requires_grad_(True)
    y = layer(x)  # the op: its CPU reference here, differentiable
    assert calls == [(6, 128)] and rel_err(y, want) < 1e-5
    y.sum().backward()
    assert rel_err(x.grad, torch.ones(2, 3, 48, dtype=torch.float64) @ dense) < 1e-5
