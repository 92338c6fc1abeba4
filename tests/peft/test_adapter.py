"""Bottleneck adapters: placement (after attention and after the feed-forward block), identity at init, the
adapter formula in float64, a whole-model reference, parameter count, stacking, QuantLinear bases, bf16."""

import pytest
import torch
from torch import nn

import lowbit
from lowbit.peft.adapter import (
    Bottleneck,
    BottleneckConfig,
    BottleneckLinear,
    apply_bottleneck,
    bottleneck_from_peft_dict,
    bottleneck_state_dict,
    bottleneck_to_peft_dict,
    remove_bottleneck,
)
from lowbit.peft.report import parameter_report
from tests.tiny_models import tiny_bert, tiny_llama


def ids(seed=0):
    return torch.randint(0, 300, (2, 7), generator=torch.Generator().manual_seed(seed))


def sites(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, BottleneckLinear)}


@pytest.mark.parametrize("kwargs", [dict(bottleneck_size=0), dict(non_linearity="swish"), dict(dropout=1.0),
                                    dict(target_modules=()), dict(version=2)])  # fmt: skip
def test_config_rejects_bad_values(kwargs):
    with pytest.raises(ValueError):
        BottleneckConfig(**kwargs)


def test_llama_sites_are_attention_output_and_ff_output():
    model = apply_bottleneck(tiny_llama(), BottleneckConfig(bottleneck_size=8))
    assert sorted(sites(model)) == sorted(f"model.layers.{i}.{m}" for i in range(2)
                                          for m in ("self_attn.o_proj", "mlp.down_proj"))  # fmt: skip
    assert model.lowbit_adapters["default"].target_modules == ("o_proj", "down_proj")


def test_bert_sites_are_both_output_dense_layers():
    names = sorted(sites(apply_bottleneck(tiny_bert(), BottleneckConfig(bottleneck_size=8))))
    sites_per_layer = ("attention.output.dense", "output.dense")
    assert names == sorted(f"bert.encoder.layer.{i}.{m}" for i in range(2) for m in sites_per_layer)


def test_unknown_architecture_needs_targets():
    with pytest.raises(ValueError, match="no default bottleneck sites"):
        apply_bottleneck(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(ValueError, match="LlamaRMSNorm"):
        apply_bottleneck(tiny_llama(), BottleneckConfig(target_modules=("input_layernorm",)))


def test_identity_at_init():
    model = apply_bottleneck(tiny_llama(), BottleneckConfig(bottleneck_size=8)).eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids()).logits, tiny_llama()(input_ids=ids()).logits)


@pytest.mark.parametrize("act", ["relu", "gelu", "silu", "tanh"])
def test_adapter_matches_float64_formula(act):
    torch.manual_seed(0)
    adapter = Bottleneck(12, BottleneckConfig(bottleneck_size=4, non_linearity=act))
    nn.init.normal_(adapter.adapter_up.weight)
    nn.init.normal_(adapter.adapter_up.bias)
    h = torch.randn(3, 5, 12)
    f = {"relu": torch.relu, "gelu": nn.functional.gelu, "silu": nn.functional.silu, "tanh": torch.tanh}[act]
    d, u = adapter.adapter_down, adapter.adapter_up
    h64 = h.double()
    expected = h64 + f(h64 @ d.weight.double().T + d.bias.double()) @ u.weight.double().T + u.bias.double()
    torch.testing.assert_close(adapter(h).double(), expected, atol=1e-6, rtol=1e-6)


def test_whole_model_against_a_bias_reference():
    """With W_down = 0 every adapter adds the constant v = W_up f(b_down) + b_up to its projection's output,
    so the model must equal the plain model whose o_proj / down_proj carry bias v (built independently)."""
    model = apply_bottleneck(tiny_llama(), BottleneckConfig(bottleneck_size=4, non_linearity="tanh")).eval()
    reference = tiny_llama().eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, site in sites(model).items():
            a = site.adapters["default"]
            a.adapter_down.weight.zero_()
            for p in (a.adapter_down.bias, a.adapter_up.weight, a.adapter_up.bias):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            v = a.adapter_up.weight @ torch.tanh(a.adapter_down.bias) + a.adapter_up.bias  # (d,)
            old = reference.get_submodule(name)
            new = nn.Linear(old.in_features, old.out_features, bias=True)
            new.weight.copy_(old.weight)
            new.bias.copy_(v)
            reference.set_submodule(name, new)
        expected = reference(input_ids=ids()).logits
        torch.testing.assert_close(model(input_ids=ids()).logits, expected, atol=1e-5, rtol=1e-5)


def test_parameter_count_is_2dm_plus_d_plus_m_per_site():
    base = parameter_report(tiny_llama()).total
    model = apply_bottleneck(tiny_llama(), BottleneckConfig(bottleneck_size=8))
    report = parameter_report(model)
    assert report.trainable == 4 * (2 * 64 * 8 + 64 + 8)
    assert report.total == base + report.trainable


def test_stacked_adapters_apply_in_order_and_remove_one_at_a_time():
    model = apply_bottleneck(tiny_llama(), BottleneckConfig(bottleneck_size=4)).eval()
    apply_bottleneck(model, BottleneckConfig(bottleneck_size=6, non_linearity="gelu"), adapter_name="second")
    with torch.no_grad():
        for site in sites(model).values():
            for a in site.adapters.values():
                nn.init.normal_(a.adapter_up.weight, std=0.1)
    site = model.get_submodule("model.layers.0.self_attn.o_proj")
    x = torch.randn(2, 3, 64)
    with torch.no_grad():
        expected = site.adapters["second"](site.adapters["default"](site.base_layer(x)))
        assert torch.equal(site(x), expected)
    remove_bottleneck(model, "default")
    assert all(list(s.adapters) == ["second"] for s in sites(model).values())
    remove_bottleneck(model, "second")
    assert not sites(model) and model.lowbit_adapters == {}
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids()).logits, tiny_llama()(input_ids=ids()).logits)
    with pytest.raises(ValueError, match="no bottleneck adapter"):
        remove_bottleneck(model, "second")


def test_quantized_base_and_bf16_model():
    model = tiny_llama()
    lowbit.quantize(model, lowbit.QuantConfig(format="nf4"))
    apply_bottleneck(model, BottleneckConfig(bottleneck_size=4))
    out = model(input_ids=ids(), labels=ids())
    out.loss.backward()
    assert all(a.adapter_up.weight.grad is not None for s in sites(model).values() for a in s.adapters.values())
    model = apply_bottleneck(tiny_llama().to(torch.bfloat16), BottleneckConfig(bottleneck_size=4))
    site = model.get_submodule("model.layers.0.mlp.down_proj")
    assert site.adapters["default"].adapter_down.weight.dtype == torch.float32  # adapter weights stay fp32
    assert model(input_ids=ids()).logits.dtype == torch.bfloat16


def test_keys_and_config_round_trip():
    model = apply_bottleneck(tiny_llama(), BottleneckConfig(bottleneck_size=8))
    keys = list(bottleneck_state_dict(model, "default"))
    assert keys[:4] == [f"base_model.model.model.layers.0.self_attn.o_proj.adapter_{w}" for w in
                        ("down.weight", "down.bias", "up.weight", "up.bias")]  # fmt: skip
    config = model.lowbit_adapters["default"]
    d = bottleneck_to_peft_dict(config)
    assert d["peft_type"] == "BOTTLENECK" and d["version"] == 1
    written = {**d, "task_type": "CAUSAL_LM", "peft_version": "0.21.2", "base_model_name_or_path": None}
    assert bottleneck_from_peft_dict(written) == config
    with pytest.raises(ValueError, match="unknown BOTTLENECK config field"):
        bottleneck_from_peft_dict({**d, "reduction_factor": 16})
