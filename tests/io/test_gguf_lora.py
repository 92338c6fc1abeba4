"""LoRA adapters as GGUF adapter files: read back with gguf's GGUFReader, rebuilt as W + (α/r)·B·A the way
llama.cpp applies them, and compared with lowbit's (and HF peft's) merged weights and a float64 merge."""

import math

import numpy as np
import pytest
import torch

from lowbit.io.gguf_export import export_gguf
from lowbit.io.gguf_lora import export_lora_gguf, export_peft_lora_gguf
from lowbit.io.merged import merged_copy
from lowbit.peft import LoraConfig, apply_lora
from tests.tiny_models import tiny_llama

gguf = pytest.importorskip("gguf")


def read_adapter(path):
    """({base tensor name: (lora_a, lora_b) float64}, alpha, header) from a GGUF adapter file."""
    reader = gguf.GGUFReader(path)
    header = {k: reader.fields[k].contents() for k in ("general.type", "adapter.type", "general.architecture")}
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for t in reader.tensors:
        base, _, which = t.name.rpartition(".")
        pairs.setdefault(base, {})[which] = torch.from_numpy(np.array(t.data, dtype=np.float64))
    alpha = reader.fields["adapter.lora.alpha"].contents()
    return {k: (v["lora_a"], v["lora_b"]) for k, v in pairs.items()}, alpha, header


def read_base(path):
    reader = gguf.GGUFReader(path)
    return {t.name: torch.from_numpy(np.array(t.data, dtype=np.float64)) for t in reader.tensors}


def apply_like_llama_cpp(base, adapter, alpha):
    """W + (α / r)·lora_b·lora_a with r = lora_b's row length (llama.cpp); token_embd: rows of lora_a·lora_bᵀ."""
    out = dict(base)
    for name, (a, b) in adapter.items():
        scale = alpha / b.shape[1]
        out[name] = base[name] + scale * (a @ b.T if name == "token_embd.weight" else b @ a)
    return out


def gguf_rows(w, n_heads):
    """Rows of a q/k projection in llama.cpp's rope order: within each head, i and i + d/2 side by side."""
    d = w.shape[0] // n_heads
    order = [h * d + (j // 2) + (j % 2) * (d // 2) for h in range(n_heads) for j in range(d)]
    return w[order]


CASES = {  # name: (LoraConfig kwargs, {module suffix: true scale})
    "plain": (dict(r=4, alpha=8), lambda m: 8 / 4),
    "rslora": (dict(r=4, alpha=8, use_rslora=True), lambda m: 8 / math.sqrt(4)),
    "patterns": (dict(r=4, alpha=8, rank_pattern={r"layers\.1\.self_attn\.v_proj": 2, "lm_head": 3},
                      alpha_pattern={"down_proj": 3}),
                 lambda m: 3 / 4 if m.endswith("down_proj") else 8 / 2 if m.endswith("layers.1.self_attn.v_proj")
                 else 8 / 3 if m == "lm_head" else 8 / 4),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CASES))
def test_lowbit_adapter_rebuilds_the_merged_weights(tmp_path, case):
    kwargs, true_scale = CASES[case]
    model = tiny_llama(tie=False)
    base_path = export_gguf(model, tmp_path / "base.gguf", dtype="f32")
    source = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    apply_lora(model, LoraConfig(target_modules=("q_proj", "k_proj", "v_proj", "down_proj", "lm_head"),
                                 init_lora_weights=False, **kwargs))  # fmt: skip
    path = export_lora_gguf(model, tmp_path / "adapter.gguf")
    adapter, alpha, header = read_adapter(path)
    assert header == {"general.type": "adapter", "adapter.type": "lora", "general.architecture": "llama"}
    assert alpha == 8.0 and len(adapter) == 2 * 4 + 1
    rebuilt = apply_like_llama_cpp(read_base(base_path), adapter, alpha)
    # float64 reference: W0 + s·B·A with each layer's true scale, in GGUF row order.
    n_heads = {"attn_q": model.config.num_attention_heads, "attn_k": model.config.num_key_value_heads}
    for module, layer in [(n, m) for n, m in model.named_modules() if hasattr(m, "lora_A")]:
        a, b = layer.lora_A["default"].detach().double(), layer.lora_B["default"].detach().double()
        want = source[f"{module}.weight"] + true_scale(module) * b @ a
        name = {"lm_head": "output"}.get(module, module.replace("model.layers.", "blk."))
        name = name.replace("self_attn.q_proj", "attn_q").replace("self_attn.k_proj", "attn_k")
        name = name.replace("self_attn.v_proj", "attn_v").replace("mlp.down_proj", "ffn_down") + ".weight"
        kind = name.split(".")[-2]
        if kind in n_heads:
            want = gguf_rows(want, n_heads[kind])
        torch.testing.assert_close(rebuilt[name], want, rtol=1e-6, atol=1e-8)
        if case == "plain":  # nothing to fold: the tensors are PEFT's own, as llama.cpp's converter writes them
            torch.testing.assert_close(adapter[name][0], a, rtol=0, atol=0)
    # ... and lowbit's own merge (float32), exported as a plain GGUF, is the same model.
    merged = read_base(export_gguf(merged_copy(model), tmp_path / "merged.gguf", dtype="f32"))
    for name, w in merged.items():
        torch.testing.assert_close(rebuilt[name], w, rtol=1e-5, atol=1e-6)


def test_peft_adapter_with_embeddings_and_lm_head(tmp_path):
    peft = pytest.importorskip("peft")
    model = tiny_llama(tie=False)
    base = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    base_path = export_gguf(model, tmp_path / "base.gguf", dtype="f32")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj", "lm_head"], use_rslora=True,
                             rank_pattern={"q_proj": 2}, init_lora_weights=False)  # fmt: skip
    peft_model = peft.get_peft_model(model, config)
    peft_model.save_pretrained(tmp_path / "adapter")
    state = {k: v.detach().double() for k, v in peft_model.state_dict().items()}
    merged = {n: p.detach().double() for n, p in peft_model.merge_and_unload().named_parameters()}
    path = export_peft_lora_gguf(tmp_path / "adapter", model.config, tmp_path / "adapter.gguf")
    adapter, alpha, _ = read_adapter(path)
    assert alpha == 8.0
    assert set(adapter) == {"token_embd.weight", "output.weight", "blk.0.attn_q.weight", "blk.1.attn_q.weight"}
    vocab, hidden = model.config.vocab_size, model.config.hidden_size
    assert adapter["token_embd.weight"][0].shape == (vocab, 4) and adapter["token_embd.weight"][1].shape == (hidden, 4)
    rebuilt = apply_like_llama_cpp(read_base(base_path), adapter, alpha)
    key = "base_model.model.model.embed_tokens.lora_embedding_{}.default"
    emb_a, emb_b = state[key.format("A")], state[key.format("B")]  # (r, vocab), (hidden, r)
    want_emb = base["model.embed_tokens.weight"] + 8 / math.sqrt(4) * (emb_b @ emb_a).T
    torch.testing.assert_close(rebuilt["token_embd.weight"], want_emb, rtol=1e-6, atol=1e-8)
    head = "base_model.model.lm_head.lora_{}.default.weight"
    want_head = base["lm_head.weight"] + 8 / math.sqrt(4) * state[head.format("B")] @ state[head.format("A")]
    torch.testing.assert_close(rebuilt["output.weight"], want_head, rtol=1e-6, atol=1e-8)
    q = "base_model.model.model.layers.1.self_attn.q_proj.lora_{}.default.weight"
    want_q = base["model.layers.1.self_attn.q_proj.weight"]
    want_q = want_q + 8 / math.sqrt(2) * state[q.format("B")] @ state[q.format("A")]
    torch.testing.assert_close(rebuilt["blk.1.attn_q.weight"], gguf_rows(want_q, 4), rtol=1e-6, atol=1e-8)
    # HF peft's own merge agrees (float32).
    torch.testing.assert_close(rebuilt["token_embd.weight"], merged["model.embed_tokens.weight"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rebuilt["output.weight"], merged["lm_head.weight"], rtol=1e-5, atol=1e-6)


def test_refusals(tmp_path):
    tied = apply_lora(tiny_llama(tie=True), LoraConfig(r=2, target_modules=("lm_head",)))
    with pytest.raises(ValueError, match="ties it to the embeddings"):
        export_lora_gguf(tied, tmp_path / "a.gguf")
    saved = apply_lora(tiny_llama(tie=False), LoraConfig(r=2, target_modules=("q_proj",), modules_to_save=("lm_head",)))
    with pytest.raises(ValueError, match="modules_to_save"):
        export_lora_gguf(saved, tmp_path / "b.gguf")
    with pytest.raises(ValueError, match="dtype"):
        export_lora_gguf(apply_lora(tiny_llama(), LoraConfig(r=2)), tmp_path / "c.gguf", dtype="q4_0")
