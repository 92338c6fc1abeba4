"""Every module the PTQ methods produce saves and loads through lowbit.save_quantized / load_quantized."""

import json

import pytest
import torch

import lowbit
from lowbit.io.quantized import META_FILE, CheckpointError
from lowbit.nn import ActOrderQuantLinear, Int8Linear, QuantLinear, SpQRLinear, W8A8Linear
from lowbit.quantize import gptq, spqr
from tests.tiny_models import tiny_llama, tiny_qwen2

IDS = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))

CASES = {
    "gptq-int4-g16": (lowbit.QuantConfig(method="gptq", format="int4", group_size=16, symmetric=False), QuantLinear),
    "gptq-int3-g32-actorder": (lowbit.QuantConfig(method="gptq", format="int3", group_size=32,
                                                  options={"act_order": True}), ActOrderQuantLinear),  # fmt: skip
    "gptq-int2-rows": (lowbit.QuantConfig(method="gptq", format="int2", symmetric=False), QuantLinear),
    "llm_int8": (lowbit.QuantConfig(method="llm_int8", format="int8", options={"threshold": 4.0}), Int8Linear),
    "smoothquant-token": (lowbit.QuantConfig(method="smoothquant", format="int8"), W8A8Linear),
    "smoothquant-tensor": (lowbit.QuantConfig(method="smoothquant", format="int8",
                                              options={"act_scheme": "per_tensor"}), W8A8Linear),  # fmt: skip
    "spqr": (lowbit.QuantConfig(method="spqr", format="int3", group_size=16), SpQRLinear),
    "spqr-no-actorder": (lowbit.QuantConfig(method="spqr", format="int3", group_size=8,
                                            options={"act_order": False, "stat_group_size": 4}),
                         SpQRLinear),  # fmt: skip
}


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("case", CASES)
def test_round_trip_is_exact_without_requantizing(case, tmp_path, monkeypatch):
    config, cls = CASES[case]
    model = tiny_llama()
    lowbit.quantize(model, config, calibration=IDS)
    expected = _logits(model)
    lowbit.save_quantized(model, tmp_path)

    def refuse(*args, **kwargs):
        raise AssertionError("load_quantized must not quantize again")

    for module, name in ((gptq, "gptq_quantize"), (spqr, "spqr_quantize")):
        monkeypatch.setattr(module, name, refuse)
    loaded = lowbit.load_quantized(tmp_path)
    assert loaded.lowbit_quant_config == config
    for name, module in model.named_modules():
        if isinstance(module, (QuantLinear, SpQRLinear)):
            twin = loaded.get_submodule(name)
            assert type(twin) is type(module) is cls
            assert twin.to_meta() == module.to_meta()
            for key, t in module.state_dict().items():
                assert torch.equal(twin.state_dict()[key], t), (name, key)
    torch.testing.assert_close(_logits(loaded), expected, rtol=0, atol=0)
    assert not any(b.is_meta for b in loaded.buffers())


def test_other_architecture_round_trip(tmp_path):
    model = tiny_qwen2()  # q/k/v biases: smoothing leaves them and W8A8 keeps them
    lowbit.quantize(model, lowbit.QuantConfig(method="smoothquant", format="int8"), calibration=IDS)
    lowbit.save_quantized(model, tmp_path)
    torch.testing.assert_close(_logits(lowbit.load_quantized(tmp_path)), _logits(model), rtol=0, atol=0)


def test_checkpoints_without_a_class_are_quantlinear(tmp_path):
    """Files written before layers recorded their class load as QuantLinear, as they were saved."""
    model = tiny_llama()
    lowbit.quantize(model, lowbit.QuantConfig(format="int4", group_size=32))
    lowbit.save_quantized(model, tmp_path)
    meta = json.loads((tmp_path / META_FILE).read_text())
    for layer in meta["layers"].values():
        assert layer.pop("class") == "QuantLinear"
    (tmp_path / META_FILE).write_text(json.dumps(meta))
    torch.testing.assert_close(_logits(lowbit.load_quantized(tmp_path)), _logits(model), rtol=0, atol=0)


def test_unknown_or_broken_layer_descriptions(tmp_path):
    model = tiny_llama()
    lowbit.quantize(model, lowbit.QuantConfig(method="llm_int8", format="int8"))
    lowbit.save_quantized(model, tmp_path)
    meta = json.loads((tmp_path / META_FILE).read_text())
    layer = meta["layers"]["model.layers.0.mlp.up_proj"]
    layer["class"] = "os.system"
    (tmp_path / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="unknown class"):
        lowbit.load_quantized(tmp_path)
    layer["class"] = "Int8Linear"
    layer["threshold"] = -1
    (tmp_path / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="invalid"):
        lowbit.load_quantized(tmp_path)


def test_unregistered_subclass_is_refused_at_save(tmp_path):
    class Custom(QuantLinear):
        pass

    model = tiny_llama()
    lowbit.quantize(model, lowbit.QuantConfig(format="int8"))
    q = model.model.layers[0].mlp.up_proj
    q.__class__ = Custom
    with pytest.raises(ValueError, match="Custom"):
        lowbit.save_quantized(model, tmp_path)
