"""Merged export: plain transformers loads the output and computes what the lowbit model computed."""

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

import lowbit
from lowbit.io.merged import dequantize_model, merged_copy, save_merged
from tests.tiny_models import tiny_llama, tiny_qwen2

X = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(0))


def logits(model):
    with torch.no_grad():
        return model(X).logits


def test_quantized_model_exports_dense_and_loads_in_plain_transformers(tmp_path):
    model = tiny_llama()
    lowbit.quantize(model, lowbit.QuantConfig(format="nf4"))
    want = logits(model)
    save_merged(model, tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True)
    assert not any(isinstance(m, lowbit.QuantLinear) for m in loaded.modules())
    assert getattr(loaded.config, "quantization_config", None) is None
    torch.testing.assert_close(logits(loaded), want, atol=1e-5, rtol=1e-5)
    assert any(isinstance(m, lowbit.QuantLinear) for m in model.modules())  # the source model is untouched
    # Independent check of one layer: the stored dense weight is the dequantized 4-bit weight.
    q = model.model.layers[0].mlp.up_proj
    torch.testing.assert_close(loaded.model.layers[0].mlp.up_proj.weight, q.dequantize(torch.float32))


def test_lora_merged_into_quantized_base(tmp_path):
    peft = pytest.importorskip("lowbit.peft")
    model = tiny_qwen2()
    lowbit.quantize(model, lowbit.QuantConfig(format="int8"))
    peft.apply_lora(model, peft.LoraConfig(r=4, alpha=8, target_modules=("q_proj", "v_proj", "down_proj"),
                                           init_lora_weights=False))  # fmt: skip
    want = logits(model)
    save_merged(model, tmp_path, dtype=torch.float32)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True)
    assert all(type(m) is nn.Linear for n, m in loaded.named_modules() if n.endswith("_proj"))
    torch.testing.assert_close(logits(loaded), want, atol=1e-4, rtol=1e-4)


def test_dequantize_model_in_place_and_dtype():
    model = tiny_llama()
    lowbit.quantize(model, lowbit.QuantConfig(format="int4", group_size=32))
    want = logits(model)
    half = merged_copy(model, dtype=torch.bfloat16)
    assert half.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    dequantize_model(model)
    assert not hasattr(model, "lowbit_quant_config")
    torch.testing.assert_close(logits(model), want, atol=1e-5, rtol=1e-5)


def test_save_merged_needs_a_transformers_model(tmp_path):
    with pytest.raises(TypeError, match="transformers model"):
        save_merged(nn.Linear(2, 2), tmp_path)
