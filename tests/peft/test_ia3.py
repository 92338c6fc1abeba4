"""(IA)³: target selection, the rescaling against float64 formulas and against HF peft, merging (with bias),
QuantLinear bases, several adapters, removal, PEFT config fields."""

import copy
import warnings

import peft
import pytest
import torch
from torch import nn

import lowbit
from lowbit.peft.ia3 import (
    IA3Config,
    IA3Linear,
    apply_ia3,
    find_ia3_targets,
    ia3_from_peft_dict,
    ia3_state_dict,
    ia3_to_peft_dict,
    load_ia3_state_dict,
    merge_ia3,
    remove_ia3,
)
from tests.tiny_models import tiny_bert, tiny_llama, tiny_qwen2


def ids(seed=0):
    return torch.randint(0, 300, (2, 7), generator=torch.Generator().manual_seed(seed))


def randomize(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ia3_l" in name:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)  # U(0.5, 1.5)


def ia3_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, IA3Linear)}


@pytest.mark.parametrize("kwargs", [dict(target_modules=("k_proj",), feedforward_modules=("down_proj",)),
                                    dict(target_modules=()), dict(target_modules="(unclosed"), dict(version=0),
                                    dict(target_modules=("",))])  # fmt: skip
def test_config_rejects_bad_values(kwargs):
    with pytest.raises(ValueError):
        IA3Config(**kwargs)


def test_default_targets_llama_keys_values_and_ff_input():
    model = apply_ia3(tiny_llama())
    layers = ia3_layers(model)
    assert sorted(layers) == sorted(f"model.layers.{i}.{m}" for i in range(2)
                                    for m in ("self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj"))  # fmt: skip
    shapes = {n.split(".")[-1]: (m.is_feedforward, tuple(m.ia3_l["default"].shape)) for n, m in layers.items()}
    assert shapes == {"k_proj": (False, (32, 1)), "v_proj": (False, (32, 1)), "down_proj": (True, (1, 160))}
    assert all(torch.equal(m.ia3_l["default"], torch.ones_like(m.ia3_l["default"])) for m in layers.values())
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids()).logits, tiny_llama()(input_ids=ids()).logits)  # ones: no change


def test_default_targets_bert_leave_the_attention_output_alone():
    layers = ia3_layers(apply_ia3(tiny_bert(), IA3Config(task_type="SEQ_CLS")))
    names = sorted(n.removeprefix("bert.encoder.layer.0.") for n in layers if ".layer.0." in n)
    assert names == ["attention.self.key", "attention.self.value", "output.dense"]
    assert layers["bert.encoder.layer.0.output.dense"].is_feedforward


def test_unknown_architecture_and_unmatched_patterns_raise():
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="no default IA3 targets"):
        apply_ia3(model)
    with pytest.raises(ValueError, match="match no layer"):
        apply_ia3(tiny_llama(), IA3Config(target_modules=("nope",), feedforward_modules=()))
    with pytest.raises(ValueError, match="LlamaRMSNorm"):
        apply_ia3(tiny_llama(), IA3Config(target_modules=("input_layernorm",), feedforward_modules=()))


@pytest.mark.parametrize("feedforward", [False, True])
def test_ia3_linear_matches_float64_formula(feedforward):
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    layer = IA3Linear(base, feedforward)
    layer.add_adapter("a")
    with torch.no_grad():
        layer.ia3_l["a"].uniform_(0.5, 1.5)
    x = torch.randn(3, 6)
    l = layer.ia3_l["a"].double().flatten()
    w, b, x64 = base.weight.double(), base.bias.double(), x.double()
    expected = (x64 * l) @ w.T + b if feedforward else (x64 @ w.T + b) * l
    torch.testing.assert_close(layer(x).double(), expected, atol=1e-6, rtol=1e-6)


def _peft_ia3(build, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(build(), peft.IA3Config(task_type="CAUSAL_LM", **kwargs)).eval()


@pytest.mark.parametrize("build", [tiny_llama, tiny_qwen2])
def test_logits_equal_peft(build):
    targets = dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    reference = _peft_ia3(build, **targets)
    randomize(reference)
    model = apply_ia3(build(), IA3Config(**{k: tuple(v) for k, v in targets.items()})).eval()
    state = peft.get_peft_model_state_dict(reference)
    assert set(state) == set(ia3_state_dict(model, "default"))
    load_ia3_state_dict(model, state, "default")
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids()).logits, reference(input_ids=ids()).logits)


def test_merge_folds_vectors_into_weights_and_bias():
    """Qwen2's k_proj/v_proj have biases: merged W = diag(l)W, b = l⊙b; down_proj: W diag(l), in float64."""
    model = apply_ia3(tiny_qwen2(), IA3Config(target_modules=("k_proj", "v_proj", "down_proj"),
                                              feedforward_modules=("down_proj",))).eval()  # fmt: skip
    randomize(model)
    before = {n: (copy.deepcopy(m.base_layer), m.ia3_l["default"].detach().clone())
              for n, m in ia3_layers(model).items()}  # fmt: skip
    with torch.no_grad():
        unmerged = model(input_ids=ids()).logits
    merge_ia3(model)
    assert not ia3_layers(model) and model.lowbit_adapters == {}
    for name, (base, l) in before.items():
        merged = model.get_submodule(name)
        assert type(merged) is nn.Linear
        if name.endswith("down_proj"):
            expected_w, expected_b = base.weight.double() * l.double(), base.bias
        else:
            expected_w = base.weight.double() * l.double()
            expected_b = base.bias.double() * l.double().flatten()
        torch.testing.assert_close(merged.weight.double(), expected_w, atol=1e-7, rtol=1e-6)
        if expected_b is not None:
            torch.testing.assert_close(merged.bias.double(), expected_b.double(), atol=1e-7, rtol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids()).logits, unmerged, atol=1e-5, rtol=1e-5)


def test_quantized_base_works_but_does_not_merge():
    model = tiny_llama()
    lowbit.quantize(model, lowbit.QuantConfig(format="nf4"))
    apply_ia3(model)
    randomize(model)
    layer = model.get_submodule("model.layers.0.self_attn.k_proj")
    x = torch.randn(3, 64)
    w = layer.base_layer.dequantize(torch.float32).double()  # the NF4 weight, decoded
    expected = (x.double() @ w.T) * layer.ia3_l["default"].double().flatten()
    torch.testing.assert_close(layer(x).double(), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="QuantLinear"):
        merge_ia3(model)
    assert "default" in model.lowbit_adapters and len(ia3_layers(model)) == 6  # nothing was changed


def test_two_adapters_multiply():
    model = apply_ia3(tiny_llama())
    apply_ia3(model, adapter_name="second")
    randomize(model, seed=3)
    product = apply_ia3(tiny_llama())
    with torch.no_grad():
        for name, layer in ia3_layers(model).items():
            product.get_submodule(name).ia3_l["default"].copy_(layer.ia3_l["default"] * layer.ia3_l["second"])
        torch.testing.assert_close(model(input_ids=ids()).logits, product(input_ids=ids()).logits, atol=1e-6, rtol=1e-6)
    remove_ia3(model, "second")
    assert all(list(m.ia3_l) == ["default"] for m in ia3_layers(model).values())


def test_remove_restores_the_base_model():
    model = apply_ia3(tiny_llama())
    randomize(model)
    remove_ia3(model)
    assert not ia3_layers(model) and model.lowbit_adapters == {}
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids()).logits, tiny_llama()(input_ids=ids()).logits)
    with pytest.raises(ValueError, match="no IA3 adapter"):
        remove_ia3(model)


def test_peft_dict_fields_and_round_trip():
    config = apply_ia3(tiny_llama()).lowbit_adapters["default"]
    d = ia3_to_peft_dict(config)
    assert set(d) <= set(peft.IA3Config.__dataclass_fields__)
    assert d["target_modules"] == ["k_proj", "v_proj", "down_proj"] and d["feedforward_modules"] == ["down_proj"]
    assert ia3_from_peft_dict(d) == config
    # a config peft itself wrote (its to_dict: sets become lists) loads
    theirs = _peft_ia3(tiny_llama).peft_config["default"].to_dict()
    theirs = {k: (sorted(v) if isinstance(v, set) else v) for k, v in theirs.items()}
    theirs["peft_type"] = "IA3"
    assert ia3_from_peft_dict(theirs).target_modules == ("down_proj", "k_proj", "v_proj")


def test_glob_patterns_become_a_regex_that_peft_selects_identically():
    config = IA3Config(target_modules=("model.layers.1.*_proj",), feedforward_modules=("model.layers.1.mlp.down_proj",),
                       exclude_modules=("q_proj", "o_proj", "gate_proj", "up_proj"))  # fmt: skip
    ours = sorted(n for n, _, _ in find_ia3_targets(tiny_llama(), config))
    d = ia3_to_peft_dict(config)
    assert isinstance(d["target_modules"], str)
    fields = {k: v for k, v in d.items() if k not in ("peft_type", "inference_mode", "task_type")}
    reference = _peft_ia3(tiny_llama, **fields)
    theirs = sorted(n.removeprefix("base_model.model.") for n, m in reference.named_modules()
                    if isinstance(m, peft.tuners.ia3.Linear))  # fmt: skip
    assert ours == theirs == ["model.layers.1.mlp.down_proj", "model.layers.1.self_attn.k_proj",
                              "model.layers.1.self_attn.v_proj"]  # fmt: skip
