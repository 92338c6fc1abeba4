"""bitsandbytes 4-bit checkpoints against the real transformers + bitsandbytes packages (on CPU)."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import lowbit
from lowbit.io.bnb import is_bnb_checkpoint, load_bnb_4bit, save_bnb_4bit
from lowbit.io.quantized import CheckpointError
from tests.tiny_models import tiny_llama

bnb = pytest.importorskip("bitsandbytes")
from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402

X = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(0))
VARIANTS = {"nf4-dq-fp32": ("nf4", True, torch.float32), "fp4-bf16": ("fp4", False, torch.bfloat16)}


def logits(model):
    with torch.no_grad():
        return model(X).logits.float()


def _native_cpu_dequantize_is_exact() -> bool:
    """bitsandbytes' native CPU 4-bit dequantize against its own pure-PyTorch reference (default backend).

    bitsandbytes 0.50.2 on an AMD EPYC with AVX512-BF16 (seen 2026-12-05) returned NF4 weights 26 % off
    (relative) from its reference, which lowbit matches exactly; on such a machine bnb's CPU forward is not
    a reference, and the tests compare lowbit with bnb's reference decoder instead of its model's logits.
    """
    try:
        from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    except ImportError:
        return True
    w = torch.randn(64, 160, generator=torch.Generator().manual_seed(0))  # rows of 2.5 blocks, as down_proj
    packed, state = bnb.functional.quantize_4bit(w, blocksize=64, quant_type="nf4")
    native = bnb.functional.dequantize_4bit(packed, state)
    reference = _dequantize_4bit_compute(packed.reshape(-1), state.absmax, state.code, 64, w.shape, torch.float32)
    return torch.equal(native, reference)


BNB_CPU_EXACT = _native_cpu_dequantize_is_exact()


def bnb_reference_dequantize(packed: torch.Tensor, state) -> torch.Tensor:
    """bitsandbytes' dequantization of `packed`: its native kernel where exact, else its torch reference."""
    if BNB_CPU_EXACT:
        return bnb.functional.dequantize_4bit(packed, state).float()
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    absmax = state.absmax
    if state.nested:
        absmax = bnb.functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    return _dequantize_4bit_compute(packed.reshape(-1), absmax.float(), state.code, state.blocksize, state.shape,
                                    torch.float32)  # fmt: skip


@pytest.fixture(scope="module", params=list(VARIANTS))
def bnb_checkpoint(request, tmp_path_factory):
    """A checkpoint written by transformers' save_pretrained of a BitsAndBytesConfig(load_in_4bit) model."""
    quant_type, dq, compute = VARIANTS[request.param]
    root = tmp_path_factory.mktemp(request.param)
    tiny_llama(tie=False).save_pretrained(root / "fp32")
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=dq,
                                bnb_4bit_compute_dtype=compute)  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(root / "fp32", quantization_config=config, device_map="cpu")
    model.save_pretrained(root / "bnb")
    return root / "bnb", model


def test_loads_a_transformers_bnb_checkpoint_without_requantizing(bnb_checkpoint):
    path, bnb_model = bnb_checkpoint
    assert is_bnb_checkpoint(path)
    ours = load_bnb_4bit(path)
    stored = load_file(path / "model.safetensors")
    layer = ours.model.layers[1].mlp.down_proj
    assert isinstance(layer, lowbit.QuantLinear)
    assert torch.equal(layer.weight, stored["model.layers.1.mlp.down_proj.weight"].reshape(-1))  # the same bytes
    # bitsandbytes' own dequantization of the loaded layer is our dense weight.
    ref = bnb_model.model.layers[1].mlp.down_proj
    dense = bnb_reference_dequantize(ref.weight.data, ref.weight.quant_state)
    torch.testing.assert_close(layer.dequantize(torch.float32), dense, atol=0, rtol=0)
    if BNB_CPU_EXACT:  # else bnb's own CPU forward is off here (see _native_cpu_dequantize_is_exact)
        tol = 1e-5 if layer.compute_dtype == torch.float32 else 1e-2  # bf16 matmuls round differently
        torch.testing.assert_close(logits(ours), logits(bnb_model), atol=tol, rtol=tol)
    assert ours.lowbit_quant_config.format == layer.fmt.name


def test_writes_a_checkpoint_that_transformers_bnb_loads_with_the_same_logits(tmp_path):
    model = tiny_llama()  # tied embeddings; lm_head and down_proj stay dense
    lowbit.quantize(model, lowbit.QuantConfig(format="nf4", exclude=("lm_head", "down_proj")))
    save_bnb_4bit(model, tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, device_map="cpu")
    assert isinstance(loaded.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    assert type(loaded.model.layers[0].mlp.down_proj) is nn.Linear
    if BNB_CPU_EXACT:  # else bnb's own CPU forward is off here (see _native_cpu_dequantize_is_exact)
        torch.testing.assert_close(logits(loaded), logits(model), atol=1e-5, rtol=1e-5)
    for name, module in loaded.named_modules():  # what transformers + bnb loaded is lowbit's weight
        if isinstance(module, bnb.nn.Linear4bit):
            ours = model.get_submodule(name).dequantize(torch.float32)
            torch.testing.assert_close(bnb_reference_dequantize(module.weight.data, module.weight.quant_state),
                                       ours, atol=0, rtol=0)  # fmt: skip
    again = load_bnb_4bit(tmp_path)  # and back into lowbit, byte for byte
    for name, module in model.named_modules():
        if isinstance(module, lowbit.QuantLinear):
            other = again.get_submodule(name)
            assert all(torch.equal(module.storage()[k], other.storage()[k]) for k in module.storage_names)
    torch.testing.assert_close(logits(again), logits(model), atol=1e-6, rtol=1e-6)


def test_refuses_what_bitsandbytes_cannot_store(tmp_path):
    model = tiny_llama()
    with pytest.raises(ValueError, match="no QuantLinear"):
        save_bnb_4bit(model, tmp_path)
    lowbit.quantize(model, lowbit.QuantConfig(format="int4"))
    with pytest.raises(ValueError, match="nf4 or fp4"):
        save_bnb_4bit(model, tmp_path)
    with pytest.raises(CheckpointError, match="config.json"):
        load_bnb_4bit(tmp_path / "nowhere")
    plain = tmp_path / "plain"
    tiny_llama().save_pretrained(plain)
    assert not is_bnb_checkpoint(plain)
    with pytest.raises(CheckpointError, match="not a bitsandbytes"):
        load_bnb_4bit(plain)


def test_rejects_a_foreign_codebook(tmp_path):
    model = tiny_llama()
    lowbit.quantize(model, lowbit.QuantConfig(format="nf4"))
    save_bnb_4bit(model, tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    key = "model.layers.0.self_attn.q_proj.weight.quant_map"
    state[key] = torch.linspace(-1, 1, 16)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="codebook"):
        load_bnb_4bit(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] |= {"load_in_4bit": False, "load_in_8bit": True}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="8-bit"):
        load_bnb_4bit(tmp_path)
