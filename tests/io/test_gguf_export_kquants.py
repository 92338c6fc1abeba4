"""GGUF export with K-quants and llama.cpp's Q4_K_M mix, read back with gguf and transformers' GGUF loader."""

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from lowbit.io.gguf_export import collect_imatrix, export_gguf, tensor_type, use_more_bits
from lowbit.io.gguf_kquants import quantize_kquant
from tests.tiny_models import tiny_llama

gguf = pytest.importorskip("gguf")

X = torch.randint(0, 300, (2, 11), generator=torch.Generator().manual_seed(0))


def tiny_llama_256(seed: int = 0) -> LlamaForCausalLM:
    """K-quants need rows that are multiples of 256: hidden 256, intermediate 512 (every matrix qualifies)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=300, max_position_embeddings=128,
                      tie_word_embeddings=False)  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def logits(model):
    with torch.no_grad():
        return model(X).logits


# Q4_K_M on 2 layers: llama.cpp's use_more_bits picks layer 1 (≥ 7·2/8); the output matrix is always Q6_K.
MIX_Q6_K = {"model.layers.1.self_attn.v_proj", "model.layers.1.mlp.down_proj", "lm_head"}


def expected_type(module: str, kind: str) -> str:
    if kind == "q4_k_m":
        return "q6_k" if module in MIX_Q6_K else "q4_k"
    return kind


def reference_model(model, kind, importance=None):
    """The source with every matrix replaced by its K-quant values (row-wise: the rope row permutation commutes)."""
    ref = tiny_llama_256()
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if p.dim() == 2:
                module = name.rpartition(".")[0]
                imp = None if importance is None else importance.get(module)
                p.copy_(quantize_kquant(p.detach(), expected_type(module, kind), imp).values)
    return ref


@pytest.mark.parametrize("kind", ["q4_k", "q5_k", "q6_k", "q4_k_m"])
def test_kquant_export_loads_in_transformers_with_the_formats_error(tmp_path, kind):
    model = tiny_llama_256()
    path = export_gguf(model, tmp_path / f"tiny-{kind}.gguf", dtype=kind)
    reader = gguf.GGUFReader(path)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.1.attn_v.weight"] == expected_type("model.layers.1.self_attn.v_proj", kind).upper()
    assert types["blk.0.ffn_down.weight"] == expected_type("model.layers.0.mlp.down_proj", kind).upper()
    assert types["output.weight"] == expected_type("lm_head", kind).upper()
    assert types["blk.0.attn_norm.weight"] == "F32"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name)
    torch.testing.assert_close(logits(loaded), logits(reference_model(model, kind)), atol=2e-5, rtol=1e-4)
    err = (logits(loaded) - logits(model)).abs().max().item()
    assert 1e-4 < err < {"q4_k": 0.5, "q5_k": 0.25, "q6_k": 0.12, "q4_k_m": 0.4}[kind]  # real, and bounded


def test_q4_k_m_recipe_matches_llama_cpp():
    # A 32-layer Llama (7B): the Q6_K layers of attn_v / ffn_down in llama.cpp's Q4_K_M files.
    assert [i for i in range(32) if use_more_bits(i, 32)] == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
    assert tensor_type("blk.6.ffn_down.weight", (4096, 11008), "q4_k_m", 32) == "q6_k"
    assert tensor_type("blk.7.ffn_down.weight", (4096, 11008), "q4_k_m", 32) == "q4_k"
    assert tensor_type("blk.7.attn_q.weight", (4096, 4096), "q4_k_m", 32) == "q4_k"
    assert tensor_type("token_embd.weight", (32000, 4096), "q4_k_m", 32) == "q4_k"
    assert tensor_type("token_embd.weight", (32000, 4096), "q4_k_m", 32, has_output=False) == "q6_k"  # tied
    assert tensor_type("output.weight", (32000, 4096), "q4_k_m", 32) == "q6_k"
    # Rows that are not multiples of 256 (SmolLM2: 576) fall back as llama-quantize does.
    assert tensor_type("blk.0.attn_q.weight", (576, 576), "q4_k_m", 30) == "q5_0"
    assert tensor_type("blk.0.ffn_down.weight", (576, 1536), "q4_k_m", 30) == "q6_k"
    assert tensor_type("output.weight", (49152, 576), "q4_k_m", 30) == "q8_0"
    assert tensor_type("blk.0.attn_q.weight", (576, 576), "q5_k", 30) == "q5_1"
    assert tensor_type("blk.0.attn_q.weight", (576, 576), "q6_k", 30) == "q8_0"
    assert tensor_type("blk.0.attn_q.weight", (40, 40), "q4_k", 1) == "f16"
    assert tensor_type("blk.0.attn_norm.weight", (576,), "q4_k_m", 30) == "f32"


def test_fallback_types_load_in_transformers(tmp_path):
    model = tiny_llama()  # hidden 64, intermediate 160, tied: nothing is a multiple of 256
    path = export_gguf(model, tmp_path / "tiny-mix.gguf", dtype="q4_k_m")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert types["token_embd.weight"] == "Q8_0"  # tied: the output's Q6_K, which falls back to Q8_0
    assert types["blk.0.attn_q.weight"] == types["blk.0.ffn_down.weight"] == "Q5_0"
    assert types["blk.1.ffn_down.weight"] == types["blk.1.attn_v.weight"] == "Q8_0"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name)
    assert (logits(loaded) - logits(model)).abs().max() < 0.05


def test_imatrix_collection_and_weighted_export(tmp_path):
    model = tiny_llama_256()
    imp = collect_imatrix(model, [X[:1], X[1:]])
    assert set(imp) == {f"model.layers.{i}.{m}" for i in range(2) for m in
                        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")} | {"lm_head"}  # fmt: skip
    with torch.no_grad():
        out = model(X, output_hidden_states=True)
        final = out.hidden_states[-1].reshape(-1, 256)  # lm_head's input (after the final norm)
        first = model.model.layers[0].input_layernorm(model.model.embed_tokens(X)).reshape(-1, 256)
    torch.testing.assert_close(imp["lm_head"], final.pow(2).mean(0), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(imp["model.layers.0.self_attn.q_proj"], first.pow(2).mean(0), rtol=1e-5, atol=1e-7)
    plain = export_gguf(model, tmp_path / "plain.gguf", dtype="q4_k_m")
    weighted = export_gguf(model, tmp_path / "weighted.gguf", dtype="q4_k_m", importance=imp)
    a = {t.name: t for t in gguf.GGUFReader(plain).tensors}
    b = {t.name: t for t in gguf.GGUFReader(weighted).tensors}
    assert not np.array_equal(a["blk.0.ffn_down.weight"].data, b["blk.0.ffn_down.weight"].data)
    np.testing.assert_array_equal(a["token_embd.weight"].data, b["token_embd.weight"].data)  # no imatrix for it
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=weighted.name)
    torch.testing.assert_close(logits(loaded), logits(reference_model(model, "q4_k_m", imp)), atol=2e-5, rtol=1e-4)
