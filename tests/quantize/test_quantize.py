"""lowbit.quantize on tiny real architectures: which layers are swapped, the report, errors."""

import copy

import pytest
import torch
from torch import nn

import lowbit
from lowbit.nn import QuantLinear
from tests.tiny_models import tiny_bert, tiny_llama, tiny_qwen2

ARCHS = {"llama": tiny_llama, "qwen2": tiny_qwen2, "bert": tiny_bert}


def _inputs(model):
    torch.manual_seed(0)
    return torch.randint(0, model.config.vocab_size, (2, 12))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("fmt", ["nf4", "int8", "fp8_e4m3"])
def test_quantize_swaps_every_linear_but_lm_head(arch, fmt):
    model = ARCHS[arch]()
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    dense = copy.deepcopy(model)
    report = lowbit.quantize(model, lowbit.QuantConfig(format=fmt))
    expected = sorted(n for n in linears if n != "lm_head")
    assert sorted(r.name for r in report.layers) == expected
    for name in expected:
        module = model.get_submodule(name)
        assert isinstance(module, QuantLinear)
        # the stored weight is the format's rounding of the original weight
        w = linears[name].weight.detach()
        err = (module.dequantize(torch.float32) - w).norm() / w.norm()
        assert err == pytest.approx(next(r.relative_error for r in report.layers if r.name == name), rel=1e-5)
        assert err < {"nf4": 0.15, "int8": 0.01, "fp8_e4m3": 0.05}[fmt]
    if "lm_head" in linears:
        assert type(model.lm_head) is nn.Linear
    # the quantized model computes what the same model with the dequantized weights computes
    for name in expected:
        dense.get_submodule(name).weight.data = model.get_submodule(name).dequantize(torch.float32)
    x = _inputs(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, dense(x).logits, rtol=1e-4, atol=1e-4)


def test_report_accounts_bytes_and_bits():
    model = tiny_llama()
    report = lowbit.quantize(model, lowbit.QuantConfig(format="nf4", block_size=64, double_quant=True))
    n = sum(r.shape[0] * r.shape[1] for r in report.layers)
    assert report.n_parameters == n
    assert report.bytes_before == 4 * n
    assert report.bytes_after == sum(m.weight_nbytes() for m in model.modules() if isinstance(m, QuantLinear))
    assert 4.12 < report.bits_per_parameter < 4.2
    assert "model.layers.0.self_attn.q_proj" in report.to_markdown()
    assert "bits/param" in str(report)


def test_include_exclude_are_anchored_patterns():
    model = tiny_llama()
    report = lowbit.quantize(model, lowbit.QuantConfig(include=("q_proj", "model.layers.1.mlp.*"), exclude=("up_proj",)))
    assert sorted(r.name for r in report.layers) == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.mlp.down_proj",
        "model.layers.1.mlp.gate_proj",
        "model.layers.1.self_attn.q_proj",
    ]
    # "proj" is not a module name: substrings never match
    assert lowbit.quantize(tiny_llama(), lowbit.QuantConfig(include=("proj",))).layers == []


def test_quantizing_twice_leaves_quantized_layers_alone():
    model = tiny_llama()
    lowbit.quantize(model, lowbit.QuantConfig())
    assert lowbit.quantize(model, lowbit.QuantConfig(format="int8")).layers == []


def test_bf16_compute_dtype_on_bf16_model():
    model = tiny_llama().to(torch.bfloat16)
    lowbit.quantize(model, lowbit.QuantConfig(compute_dtype=torch.bfloat16))
    out = model(_inputs(model)).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_auto_compute_dtype_follows_each_layers_weights():
    """The default: a bf16 model keeps computing in bf16 (an fp32 matmul would be ~4× slower on a GPU)."""
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        model = tiny_llama().to(dtype)
        lowbit.quantize(model, lowbit.QuantConfig())
        assert {m.compute_dtype for m in model.modules() if isinstance(m, lowbit.QuantLinear)} == {dtype}
    model = tiny_llama().to(torch.bfloat16)
    lowbit.quantize(model, lowbit.QuantConfig(compute_dtype="float32"))
    assert {m.compute_dtype for m in model.modules() if isinstance(m, lowbit.QuantLinear)} == {torch.float32}


def test_config_validation():
    with pytest.raises(ValueError, match="unknown weight format"):
        lowbit.QuantConfig(format="nf3")
    with pytest.raises(ValueError, match="compute_dtype"):
        lowbit.QuantConfig(compute_dtype="int8")
    with pytest.raises(ValueError, match="version"):
        lowbit.QuantConfig(version=99)
    with pytest.raises(ValueError, match="unknown quantization method"):
        lowbit.quantize(tiny_llama(), lowbit.QuantConfig(method="magic"))
    with pytest.raises(TypeError, match="rtn takes no calibration"):
        lowbit.quantize(tiny_llama(), lowbit.QuantConfig(), calibration=["text"])
    cfg = lowbit.QuantConfig(format="int4", group_size=128, symmetric=False)
    assert lowbit.QuantConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown QuantConfig field"):
        lowbit.QuantConfig.from_dict({**cfg.to_dict(), "bogus": 1})


def test_layers_are_swapped_one_at_a_time(monkeypatch):
    """Each layer is replaced before the next is quantized, so two full-precision copies never coexist."""
    model = tiny_llama()
    dense_left = []
    original = QuantLinear.from_linear.__func__

    def spy(cls, linear, fmt, compute_dtype=None):
        dense_left.append(sum(type(m) is nn.Linear for m in model.modules()))
        return original(cls, linear, fmt, compute_dtype)

    monkeypatch.setattr(QuantLinear, "from_linear", classmethod(spy))
    lowbit.quantize(model, lowbit.QuantConfig())
    n = len(dense_left)
    assert n == 14 and dense_left == list(range(n + 1, 1, -1))  # 15 linears (incl. lm_head) counting down
