"""QuantLinear against a float64 reference: forward, input gradient, storage, errors."""

import pytest
import torch
from torch import nn

from lowbit.formats import FORMATS, WeightFormat
from lowbit.nn import QuantLinear

NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
       -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
       0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
       0.7229568362236023, 1.0]  # fmt: skip


def reference_nf4(w: torch.Tensor, block: int) -> torch.Tensor:
    """Float64 blockwise-absmax NF4 round trip without double quantization, written from the spec."""
    flat = w.double().reshape(-1, block)
    absmax = flat.abs().amax(dim=1, keepdim=True)
    code = torch.tensor(NF4, dtype=torch.float64)
    idx = (flat / absmax).unsqueeze(-1).sub(code).abs().argmin(dim=-1)
    return (code[idx] * absmax).reshape(w.shape)


def test_forward_and_input_grad_match_float64_reference():
    torch.manual_seed(0)
    linear = nn.Linear(128, 48)
    q = QuantLinear.from_linear(linear, WeightFormat("nf4", block_size=64, double_quant=False))
    w_ref = reference_nf4(linear.weight.detach(), 64)
    x = torch.randn(2, 5, 128, dtype=torch.float32, requires_grad=True)
    y = q(x)
    x64 = x.detach().double().requires_grad_(True)
    y_ref = x64 @ w_ref.t() + linear.bias.detach().double()
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g.double())
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", FORMATS)
def test_every_format_trains_through_its_input(name):
    torch.manual_seed(1)
    linear = nn.Linear(64, 32, bias=True)
    q = QuantLinear.from_linear(linear, WeightFormat(name, group_size=32))
    x = torch.randn(4, 64, requires_grad=True)
    q(x).pow(2).sum().backward()
    dense = q.dequantize(torch.float32)
    x2 = x.detach().requires_grad_(True)
    (x2 @ dense.t() + linear.bias.detach()).pow(2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-5)
    assert all(not t.requires_grad for t in q.storage().values())


def test_backward_does_not_keep_the_dense_weight():
    linear = nn.Linear(256, 192, bias=False)
    q = QuantLinear.from_linear(linear, WeightFormat("nf4"))
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    x = torch.randn(3, 256, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = q(x)
    y.sum().backward()
    assert (192, 256) not in saved and (256, 192) not in saved
    assert x.grad is not None


def test_bf16_compute_returns_input_dtype_and_bias_can_train():
    torch.manual_seed(2)
    linear = nn.Linear(64, 16)
    q = QuantLinear.from_linear(linear, WeightFormat("nf4"), compute_dtype=torch.bfloat16)
    q.bias.requires_grad_(True)
    x = torch.randn(8, 64)
    y = q(x)
    assert y.dtype == torch.float32
    ref = (x.bfloat16() @ q.dequantize(torch.bfloat16).t()).float() + linear.bias.detach()
    torch.testing.assert_close(y, ref, rtol=2e-2, atol=2e-2)
    y.sum().backward()
    torch.testing.assert_close(q.bias.grad.float(), torch.full((16,), 8.0))


def test_state_dict_round_trip_into_empty_module():
    linear = nn.Linear(96, 40)
    fmt = WeightFormat("int4", group_size=32, symmetric=False)
    q = QuantLinear.from_linear(linear, fmt)
    empty = QuantLinear(96, 40, bias=True, fmt=fmt)
    empty.load_state_dict(q.state_dict())
    torch.testing.assert_close(empty.dequantize(), q.dequantize(), rtol=0, atol=0)
    x = torch.randn(2, 96)
    torch.testing.assert_close(empty(x), q(x), rtol=0, atol=0)


def test_bits_and_bytes_of_nf4_double_quant():
    q = QuantLinear.from_linear(nn.Linear(4096, 1024, bias=False), WeightFormat("nf4", 64, True))
    n = 4096 * 1024
    expected_bytes = n // 2 + n // 64 + 4 * (n // 64 // 256) + 4
    assert q.weight_nbytes() == expected_bytes
    assert abs(q.bits_per_parameter() - (4 + 8 / 64 + 32 / (64 * 256) + 32 / n)) < 1e-9


def test_clear_errors():
    q = QuantLinear.from_linear(nn.Linear(32, 8), WeightFormat("int8"))
    with pytest.raises(ValueError, match=r"expects input \(…, 32\)"):
        q(torch.randn(2, 31))
    with pytest.raises(TypeError, match="compute_dtype"):
        QuantLinear(32, 8, compute_dtype=torch.int8)
    with pytest.raises(ValueError, match="NaN"):
        QuantLinear.from_linear(nn.Linear(32, 8).requires_grad_(False).apply(lambda m: m.weight.fill_(float("nan"))),
                                WeightFormat("nf4"))  # fmt: skip


def test_storage_as_parameters_changes_nothing_but_the_kind(tmp_path):
    """FSDP2 shards parameters, not buffers: the storage becomes frozen parameters with the same names,
    shapes, dtypes and bytes, so the forward, the state dict and quantized checkpoints are unchanged."""
    import lowbit
    from tests.tiny_models import tiny_llama

    model = tiny_llama()
    lowbit.quantize(model, lowbit.QuantConfig(format="nf4", block_size=64, double_quant=True))
    x = torch.randint(0, 300, (1, 12))
    before, y = model.state_dict(), model(input_ids=x).logits
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    for m in layers:
        m.storage_as_parameters()
        m.storage_as_parameters()  # twice: no-op
    q = layers[0]
    assert isinstance(q.weight, nn.Parameter) and q.weight.dtype == torch.uint8 and not q.weight.requires_grad
    assert not [n for n in q._buffers if n.startswith("weight")]
    assert not any(p.requires_grad for m in layers for p in m.parameters())
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert torch.equal(model(input_ids=x).logits, y)
    lowbit.save_quantized(model, tmp_path)
    assert torch.equal(lowbit.load_quantized(tmp_path)(input_ids=x).logits, y)  # loads back into buffers


def test_cpu_matmuls_decode_into_a_shared_buffer_without_aliasing():
    """The CPU forward / backward decode 4-bit weights into one reused buffer: interleaved layers of different
    shapes still give x · dequantize(W)ᵀ exactly, and what `dequantize()` returned earlier is left alone."""
    torch.manual_seed(5)
    layers = [QuantLinear.from_linear(torch.nn.Linear(k, n), WeightFormat("nf4", block_size=64))
              for n, k in ((96, 64), (32, 128), (96, 64))]  # fmt: skip
    dense = [layer.dequantize() for layer in layers]
    kept = [d.clone() for d in dense]
    x = [torch.randn(3, layer.in_features, requires_grad=True) for layer in layers]
    outs = [layer(xi) for layer, xi in zip(layers, x)]
    for layer, xi, y, d in zip(layers, x, outs, dense):
        assert torch.equal(y, xi @ d.t() + layer.bias)
    sum(y.square().sum() for y in outs).backward()
    for layer, xi, y, d in zip(layers, x, outs, dense):
        assert torch.allclose(xi.grad, (2 * y) @ d, rtol=1e-6, atol=1e-6)
    assert all(torch.equal(d, k) for d, k in zip(dense, kept))
