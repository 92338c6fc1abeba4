"""The kernel ops' torch references, their torch.library registration, and QuantLinear's kernel choice.

No Triton needed: on the CPU the ops run their pure-PyTorch implementation. References here are
float64 and written from the format spec (QLoRA NF4 + double quantization; int4 groups), sharing no
code with `lowbit.kernels`.
"""

import math

import pytest
import torch
from torch import nn

from lowbit import kernels
from lowbit.formats import WeightFormat
from lowbit.kernels import ops
from lowbit.kernels.lut4 import lut4_weight
from lowbit.nn import QuantLinear

NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
       -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
       0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
       0.7229568362236023, 1.0]  # fmt: skip


def dynamic_map_f64() -> torch.Tensor:
    """Dettmers' signed 8-bit dynamic tree map: ±10^(e-6)·midpoints of 2^e + 1 points on [0.1, 1], 0, 1."""
    vals = [0.0, 1.0]
    for e in range(7):
        edges = torch.linspace(0.1, 1.0, 2**e + 1, dtype=torch.float32)
        mids = ((edges[:-1] + edges[1:]) / 2 * 10.0 ** (e - 6)).tolist()
        vals += mids + [-v for v in mids]
    return torch.tensor(sorted(vals), dtype=torch.float32).double()


def nf4_dq_weight_f64(storage: dict, shape: tuple[int, int], block: int) -> torch.Tensor:
    """Decode NF4 + double quant storage in float64, straight from the QLoRA / bitsandbytes layout."""
    n = math.prod(shape)
    packed = storage["weight"].long()
    codes = torch.empty(2 * packed.numel(), dtype=torch.long)
    codes[0::2], codes[1::2] = packed // 16, packed % 16  # first value in the high nibble
    values = torch.tensor(NF4, dtype=torch.float64)[codes[:n]]
    nested = storage["nested_absmax"].double()
    absmax = torch.stack([dynamic_map_f64()[int(c)] * nested[i // 256] for i, c in enumerate(storage["absmax"])])
    absmax = absmax + storage["offset"].double()
    return (values * absmax[torch.arange(n) // block]).view(shape)


def int4_group_weight_f64(w: torch.Tensor, group: int) -> torch.Tensor:
    """Symmetric int4 round trip per group of `group` along each row, in float64 (last group short)."""
    out = torch.empty_like(w, dtype=torch.float64)
    for g0 in range(0, w.shape[1], group):
        blk = w[:, g0 : g0 + group].double()
        scale = blk.abs().amax(dim=1, keepdim=True).float().double() / 7
        out[:, g0 : g0 + group] = torch.clamp(torch.round(blk / scale), -7, 7) * scale
    return out


def op_args(fmt: WeightFormat, storage: dict, shape: tuple[int, int]):
    w = lut4_weight(fmt, storage, shape)
    return w, (w.packed, w.table, w.scale, w.zero_point, w.nested_code, w.nested_scale, w.offset)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("shape", [(48, 128), (37, 77)])  # a block-aligned matrix and an odd one
def test_lut4_linear_reference_matches_float64_nf4_double_quant(shape):
    torch.manual_seed(0)
    fmt = WeightFormat("nf4", block_size=64, double_quant=True)
    storage = fmt.encode(torch.randn(shape))
    _, wargs = op_args(fmt, storage, shape)
    x = torch.randn(5, shape[1])
    y = ops.lut4_linear(x, *wargs, shape[0], 64, True)
    ref = x.double() @ nf4_dq_weight_f64(storage, shape, 64).t()
    assert rel_err(y, ref) < 1e-6
    g = torch.randn(5, shape[0])
    dx = ops.lut4_linear_grad_input(g, *wargs, shape[1], 64, True)
    assert rel_err(dx, g.double() @ nf4_dq_weight_f64(storage, shape, 64)) < 1e-6


def test_lut4_reference_int4_groups_with_a_short_last_group():
    torch.manual_seed(1)
    w = torch.randn(12, 40)
    fmt = WeightFormat("int4", group_size=16, symmetric=True)  # 40 = 16 + 16 + 8
    storage = fmt.encode(w)
    weight, _ = op_args(fmt, storage, (12, 40))
    torch.testing.assert_close(kernels.dequantize(weight).double(), int4_group_weight_f64(w, 16), rtol=1e-6, atol=1e-6)


def test_opcheck_lut4_ops_on_cpu():
    torch.manual_seed(2)
    for fmt, shape in [(WeightFormat("nf4"), (24, 64)), (WeightFormat("int4", group_size=16, symmetric=False), (8, 48))]:
        w, wargs = op_args(fmt, fmt.encode(torch.randn(shape)), shape)
        x = torch.randn(3, shape[1], requires_grad=True)
        torch.library.opcheck(ops.lut4_linear, (x, *wargs, shape[0], w.group_size, w.flat))
        g = torch.randn(3, shape[0])
        torch.library.opcheck(ops.lut4_linear_grad_input, (g, *wargs, shape[1], w.group_size, w.flat))


def test_opcheck_int8_scaled_mm_and_exact_integer_product():
    torch.manual_seed(3)
    a = torch.randint(-127, 128, (6, 40), dtype=torch.int8)
    b = torch.randint(-127, 128, (10, 40), dtype=torch.int8)
    sa, sb = torch.rand(6) + 0.1, torch.rand(10) + 0.1
    torch.library.opcheck(ops.int8_scaled_mm, (a, b, sa, sb, torch.float32))
    exact = torch.tensor([[sum(int(a[i, k]) * int(b[j, k]) for k in range(40)) for j in range(10)] for i in range(6)],
                         dtype=torch.float64)  # fmt: skip
    y = ops.int8_scaled_mm(a, b, sa, sb, torch.float32)
    torch.testing.assert_close(y.double(), exact * sa.double()[:, None] * sb.double()[None, :], rtol=1e-6, atol=0)
    with pytest.raises(TypeError, match="int8"):
        ops.int8_scaled_mm(a.float(), b, sa, sb, torch.float32)
    with pytest.raises(ValueError, match="scales"):
        ops.int8_scaled_mm(a, b, sb, sa, torch.float32)


def test_lut4_linear_autograd_matches_float64_and_saves_no_dense_weight():
    torch.manual_seed(4)
    fmt = WeightFormat("nf4")
    storage = fmt.encode(torch.randn(32, 64))
    _, wargs = op_args(fmt, storage, (32, 64))
    x = torch.randn(4, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        y = ops.lut4_linear(x, *wargs, 32, 64, True)
    assert (32, 64) not in saved
    g = torch.randn(4, 32)
    y.backward(g)
    torch.testing.assert_close(x.grad.double(), g.double() @ nf4_dq_weight_f64(storage, (32, 64), 64),
                               rtol=1e-5, atol=1e-6)  # fmt: skip


def test_bad_storage_gets_a_clear_error():
    fmt = WeightFormat("nf4")
    w, wargs = op_args(fmt, fmt.encode(torch.randn(8, 64)), (8, 64))
    with pytest.raises(ValueError, match="packed must be"):
        ops.lut4_linear(torch.randn(2, 64), wargs[0][:-1], *wargs[1:], 8, 64, True)
    with pytest.raises(ValueError, match="scale must hold"):
        ops.lut4_linear(torch.randn(2, 64), *wargs, 8, 32, True)
    with pytest.raises(ValueError, match="not a 4-bit lookup format"):
        lut4_weight(WeightFormat("int8"), {}, (8, 64))


def test_select_is_explicit_and_keeps_the_cpu_path():
    nf4, int8 = WeightFormat("nf4"), WeightFormat("int8")
    assert kernels.select("auto", nf4, "cpu") == "dequant"
    assert kernels.select("dequant", nf4, "cuda") == "dequant"
    assert kernels.select("fused", nf4, "cpu") == "fused"
    assert kernels.select("auto", int8, "cuda") == "dequant"
    if kernels.triton_available():
        assert kernels.select("auto", nf4, "cuda") == "fused"
    with pytest.raises(ValueError, match="4-bit lookup formats"):
        kernels.select("fused", int8, "cpu")
    with pytest.raises(ValueError, match="unknown kernel"):
        kernels.select("cublas", nf4, "cpu")
    with pytest.raises(ValueError, match="kernel must be one of"):
        QuantLinear(64, 8, kernel="triton")


@pytest.mark.parametrize("fmt", [WeightFormat("nf4", double_quant=True), WeightFormat("fp4", double_quant=False),
                                 WeightFormat("int4", group_size=32, symmetric=False)])  # fmt: skip
def test_quant_linear_fused_kernel_equals_its_dequant_path(fmt):
    torch.manual_seed(5)
    linear = nn.Linear(96, 40)
    dequant = QuantLinear.from_linear(linear, fmt)
    fused = QuantLinear.from_linear(linear, fmt)
    fused.kernel = "fused"
    x = torch.randn(2, 3, 96, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    y, y2 = dequant(x), fused(x2)
    assert y2.shape == (2, 3, 40)
    torch.testing.assert_close(y2, y, rtol=1e-5, atol=1e-5)
    y.square().sum().backward()
    y2.square().sum().backward()
    torch.testing.assert_close(x2.grad, x.grad, rtol=1e-5, atol=1e-5)
