"""save_quantized / load_quantized: exact round trips, no re-quantization, clear errors on bad files."""

import json

import pytest
import torch

import lowbit
from lowbit.formats.weight import WeightFormat
from lowbit.io.quantized import META_FILE, WEIGHTS_FILE, CheckpointError
from lowbit.nn import QuantLinear
from tests.tiny_models import tiny_bert, tiny_llama, tiny_qwen2


def _logits(model):
    torch.manual_seed(0)
    x = torch.randint(0, model.config.vocab_size, (2, 10))
    with torch.no_grad():
        return model(x).logits


@pytest.mark.parametrize(
    "config",
    [
        lowbit.QuantConfig(format="nf4"),
        lowbit.QuantConfig(format="fp4", double_quant=False, block_size=128),
        lowbit.QuantConfig(format="int4", group_size=32, symmetric=False),
        lowbit.QuantConfig(format="int8"),
        lowbit.QuantConfig(format="fp8_e5m2", group_size=16, compute_dtype="bfloat16"),
    ],
    ids=lambda c: c.format,
)
def test_round_trip_is_exact_and_does_not_requantize(config, tmp_path, monkeypatch):
    model = tiny_llama()
    lowbit.quantize(model, config)
    expected = _logits(model)
    lowbit.save_quantized(model, tmp_path)

    def refuse(*args, **kwargs):
        raise AssertionError("load_quantized must not quantize again")

    monkeypatch.setattr(WeightFormat, "encode", refuse)
    loaded = lowbit.load_quantized(tmp_path)
    assert loaded.lowbit_quant_config == config
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            twin = loaded.get_submodule(name)
            assert isinstance(twin, QuantLinear) and twin.fmt == module.fmt
            for key, t in module.storage().items():
                assert torch.equal(twin.storage()[key], t), (name, key)
    torch.testing.assert_close(_logits(loaded), expected, rtol=0, atol=0)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # tied again, stored once
    assert not any(p.is_meta for p in loaded.parameters()) and not any(b.is_meta for b in loaded.buffers())


@pytest.mark.parametrize("build", [tiny_qwen2, tiny_bert])
def test_other_architectures_round_trip(build, tmp_path):
    model = build()
    lowbit.quantize(model, lowbit.QuantConfig(format="nf4"))
    lowbit.save_quantized(model, tmp_path)
    torch.testing.assert_close(_logits(lowbit.load_quantized(tmp_path)), _logits(model), rtol=0, atol=0)


@pytest.fixture
def saved(tmp_path):
    model = tiny_llama()
    lowbit.quantize(model, lowbit.QuantConfig())
    lowbit.save_quantized(model, tmp_path)
    return tmp_path


def test_truncated_weights_give_a_clear_error(saved):
    data = (saved / WEIGHTS_FILE).read_bytes()
    (saved / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        lowbit.load_quantized(saved)


def test_garbage_header_gives_a_clear_error(saved):
    (saved / WEIGHTS_FILE).write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        lowbit.load_quantized(saved)


def test_other_format_version_is_refused(saved):
    meta = json.loads((saved / META_FILE).read_text())
    meta["format_version"] = 2
    (saved / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="format version 2"):
        lowbit.load_quantized(saved)


def test_corrupt_or_missing_metadata(saved):
    (saved / META_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt"):
        lowbit.load_quantized(saved)
    (saved / META_FILE).unlink()
    with pytest.raises(CheckpointError, match="not a lowbit quantized model"):
        lowbit.load_quantized(saved)


def test_model_class_must_be_a_transformers_model(saved):
    meta = json.loads((saved / META_FILE).read_text())
    meta["model_class"] = "os.system"
    (saved / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="unknown model class"):
        lowbit.load_quantized(saved)


def test_mismatched_layer_shapes_are_refused(saved):
    meta = json.loads((saved / META_FILE).read_text())
    meta["layers"]["model.layers.0.mlp.up_proj"]["weight_format"]["block_size"] = 32
    (saved / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="do not fit|do not match"):
        lowbit.load_quantized(saved)
