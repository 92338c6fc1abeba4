"""Export Llama-family models to GGUF (F32, F16, Q8_0, Q4_0, K-quants, Q4_K_M) with the `gguf` package's writer.

Tensor names, metadata keys and the rotary layout follow llama.cpp's converter, so llama.cpp and
transformers' GGUF loader read the file:

    model.embed_tokens              → token_embd          model.norm              → output_norm
    layers.N.self_attn.{q,k,v,o}    → blk.N.attn_{q,k,v,output}
    layers.N.mlp.{gate,up,down}     → blk.N.ffn_{gate,up,down}
    layers.N.input_layernorm        → blk.N.attn_norm     post_attention_layernorm → blk.N.ffn_norm
    lm_head                         → output (left out when tied to the embeddings)

Rotary layout. transformers rotates the two halves of each head (dimension i pairs with i + d/2, "rotate_half");
llama.cpp's Llama rope rotates adjacent pairs (2i, 2i+1). The q and k projection rows are therefore permuted per
head so that row 2i holds the old row i and row 2i+1 the old row i + d/2 — the product q·k and the model's output
are unchanged. Qwen2 files use the NeoX rope (halves), so its rows stay as they are.

Formats (ggml block quantization; one scale per 32 weights of a row):
    Q8_0  w ≈ d·q, q ∈ [-127, 127], d = absmax / 127 (fp16)                 8.5 bits/weight
    Q4_0  w ≈ d·(q - 8), q ∈ [0, 15], d = max-magnitude value / -8 (fp16)   4.5 bits/weight
    Q4_K / Q5_K / Q6_K  super-blocks of 256 (lowbit.io.gguf_kquants)       4.5 / 5.5 / 6.56 bits/weight
    Q4_K_M  llama.cpp's mix: Q4_K, but Q6_K for the output matrix and for attn_v and ffn_down of the layers
            `use_more_bits` picks (first and last eighth, every third in between)
1-D tensors (norms, biases) stay F32. A matrix whose rows are not a multiple of the block (32; 256 for K-quants)
falls back as llama.cpp's quantizer does: Q4_K → Q5_0, Q5_K → Q5_1, Q6_K → Q8_0, and to F16 when even 32 does
not divide the row. SmolLM2 (hidden size 576) is such a case: under q4_k_m its q/k/v/o/gate/up matrices become
Q5_0, its tied embeddings (which take the output's Q6_K) Q8_0, and only ffn_down (rows of 1536) is K-quantized.
`q4_k`/`q5_k`/`q6_k` are "pure" files (every matrix that type, like llama-quantize --pure); `q4_k_m` is the mix.

An importance matrix (`collect_imatrix`: mean x² of each linear layer's input over calibration tokens, llama.cpp's
imatrix) weights the K-quant fits toward the inputs that matter; the fallback types (quantized by the gguf
package) ignore it. Quantized layers (QuantLinear) and LoRA adapters are dequantized / merged first.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lowbit.io.gguf_kquants import QK_K, quantize_kquant
from lowbit.io.merged import merged_copy

GGUF_TYPES = ("f32", "f16", "q8_0", "q4_0", "q4_k", "q5_k", "q6_k", "q4_k_m")
K_FALLBACK = {"q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}  # llama.cpp's type for rows not a multiple of 256
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}  # transformers model_type → GGUF arch
PERMUTED_ROPE = {"llama"}  # archs whose GGUF q/k rows use llama.cpp's interleaved rope layout
LAYER_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}  # fmt: skip
GLOBAL_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def interleave_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(n_heads·d, in) rows in rotate-half order → llama.cpp's adjacent-pair order, per head."""
    d = w.shape[0] // n_heads
    halves = w.reshape(n_heads, 2, d // 2, *w.shape[1:])  # (H, half, d/2, …): row i and row i + d/2
    return halves.transpose(1, 2).reshape(w.shape)  # (H, d/2, 2, …): pairs side by side


def gguf_name(hf_name: str) -> str | None:
    """The GGUF tensor name of a transformers parameter name, or None if it has no place in the file."""
    module, _, leaf = hf_name.rpartition(".")
    if module in GLOBAL_NAMES:
        return f"{GLOBAL_NAMES[module]}.{leaf}"
    parts = module.split(".")
    if len(parts) >= 4 and parts[:2] == ["model", "layers"] and ".".join(parts[3:]) in LAYER_NAMES:
        return f"blk.{parts[2]}.{LAYER_NAMES['.'.join(parts[3:])]}.{leaf}"
    return None


def _check_model(model: nn.Module) -> str:
    config = model.config
    arch = ARCHITECTURES.get(getattr(config, "model_type", None))
    if arch is None:
        raise ValueError(f"GGUF export supports {sorted(ARCHITECTURES)} models, not {config.model_type!r}")
    if getattr(config, "rope_scaling", None) and (config.rope_scaling or {}).get("rope_type", "default") != "default":
        raise ValueError(f"GGUF export does not handle rope scaling {config.rope_scaling}")
    if getattr(config, "mlp_bias", False) or (arch == "llama" and getattr(config, "attention_bias", False)):
        raise ValueError("GGUF export of Llama models with linear-layer biases is not supported")
    return arch


def _rope_theta(config) -> float:
    theta = getattr(config, "rope_theta", None)
    if theta is None:  # transformers 5 keeps it in rope_parameters
        theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    return float(theta)


def use_more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's choice of layers that get more bits in the _M mixes: the first and last eighth, every third."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def tensor_type(name: str, shape: tuple[int, ...], kind: str, n_layers: int, has_output: bool = True) -> str:
    """The GGML type ("f32", "q4_k", …) export_gguf writes GGUF tensor ``name`` of ``shape`` with, for ``kind``."""
    if len(shape) == 1 or kind == "f32":
        return "f32"
    if kind in ("f16", "q8_0", "q4_0"):
        return "f16" if kind == "f16" or shape[-1] % 32 else kind
    chosen = "q4_k" if kind == "q4_k_m" else kind
    if kind == "q4_k_m":
        layer = int(name.split(".")[1]) if name.startswith("blk.") else -1
        if name == "output.weight" or (not has_output and name == "token_embd.weight"):
            chosen = "q6_k" if shape[-1] % QK_K == 0 else "q8_0"
        elif name.endswith(("attn_v.weight", "ffn_down.weight")) and use_more_bits(layer, n_layers):
            chosen = "q6_k"
    if chosen in K_FALLBACK and shape[-1] % QK_K:
        chosen = K_FALLBACK[chosen]
    return "f16" if shape[-1] % 32 else chosen


def _encode(w: torch.Tensor, qtype: str, importance: torch.Tensor | None = None):
    """(array, raw ggml type or None) for one tensor; None type = the writer infers F32/F16 from the array."""
    import gguf

    if qtype in ("q4_k", "q5_k", "q6_k"):
        return quantize_kquant(w, qtype, importance).data, gguf.GGMLQuantizationType[qtype.upper()]
    data = w.detach().float().cpu().numpy()
    if qtype == "f32":
        return data.astype(np.float32), None
    if qtype == "f16":
        return data.astype(np.float16), None
    raw = gguf.GGMLQuantizationType[qtype.upper()]
    return gguf.quants.quantize(data, raw), raw


def export_gguf(model: nn.Module, path: str | os.PathLike, tokenizer=None, dtype: str = "f16",
                tokenizer_pre: str = "default", name: str | None = None,
                importance: dict[str, torch.Tensor] | None = None) -> Path:  # fmt: skip
    """Write ``model`` (a Llama/Mistral/Qwen2 causal LM) as a GGUF v3 file; returns its path.

    ``dtype`` is the type of the weight matrices: f32 | f16 | q8_0 | q4_0 | q4_k | q5_k | q6_k | q4_k_m (see the
    module docstring for the mix and the fallbacks). ``importance`` maps module names ("model.layers.0.mlp.down_proj")
    to per-input-column weights, as `collect_imatrix` returns them, for the K-quants.
    With a byte-level BPE ``tokenizer``
    (GPT-2 style, e.g. SmolLM2's) the vocabulary, merges, special ids and chat template are stored too, so
    llama.cpp can run the file on its own; ``tokenizer_pre`` is llama.cpp's pre-tokenizer name (e.g. "smollm").
    """
    import gguf

    kind = dtype.lower()
    if kind not in GGUF_TYPES:
        raise ValueError(f"GGUF export dtype must be one of {GGUF_TYPES}, got {dtype!r}")
    arch = _check_model(model)
    plain = merged_copy(model)  # LoRA merged, QuantLinear dequantized
    config = plain.config
    writer = gguf.GGUFWriter(str(path), arch)
    _write_metadata(writer, config, arch, kind, name or getattr(config, "_name_or_path", "") or arch)
    if tokenizer is not None:
        _write_tokenizer(writer, tokenizer, config.vocab_size, tokenizer_pre)
    tied = getattr(config, "tie_word_embeddings", False)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    importance = importance or {}
    for hf_name, tensor in plain.state_dict().items():
        out_name = gguf_name(hf_name)
        if out_name is None or (tied and out_name == "output.weight"):
            continue
        if arch in PERMUTED_ROPE and out_name.endswith(("attn_q.weight", "attn_k.weight")):
            tensor = interleave_rope_rows(tensor, tensor.shape[0] // head_dim)  # q: n_heads rows blocks, k: n_kv
        qtype = tensor_type(out_name, tuple(tensor.shape), kind, config.num_hidden_layers, has_output=not tied)
        imp = importance.get(hf_name.rpartition(".")[0]) if hf_name.endswith(".weight") else None
        data, raw = _encode(tensor, qtype, imp)  # row permutation leaves the columns (and their importance) alone
        writer.add_tensor(out_name, data, raw_dtype=raw)
    path = Path(path)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@torch.no_grad()
def collect_imatrix(model: nn.Module, batches) -> dict[str, torch.Tensor]:
    """llama.cpp's importance matrix: for every layer export_gguf writes, the mean of x² per input column over
    all calibration tokens. ``batches``: token-id tensors (B, T) (or one tensor). → {module name: (in,) float32}.

    Weighting a weight's rounding error by E[x_j²] makes the fit minimise E‖(W − Ŵ)x‖² column by column under a
    diagonal approximation of the input covariance (the statistic llama.cpp's imatrix tool collects).
    """
    if isinstance(batches, torch.Tensor):
        batches = [batches]
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []

    def observe(name):
        def hook(_module, args):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])  # (tokens, in)
            sums[name] = sums.get(name, 0) + x.pow(2).sum(0).cpu()
            counts[name] = counts.get(name, 0) + x.shape[0]

        return hook

    for name, module in model.named_modules():  # the linear layers with a GGUF name (LoRA / quantized ones too)
        if gguf_name(f"{name}.weight") is not None and isinstance(getattr(module, "in_features", None), int):
            hooks.append(module.register_forward_pre_hook(observe(name)))
    try:
        for ids in batches:
            model(ids.to(next(model.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
    return {name: sums[name] / counts[name] for name in sums}


def _write_metadata(writer, config, arch: str, kind: str, name: str) -> None:
    import gguf

    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
                 "q4_k": gguf.LlamaFileType.MOSTLY_Q4_K_S, "q5_k": gguf.LlamaFileType.MOSTLY_Q5_K_S,
                 "q6_k": gguf.LlamaFileType.MOSTLY_Q6_K, "q4_k_m": gguf.LlamaFileType.MOSTLY_Q4_K_M}[kind]  # fmt: skip
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_name(str(name))
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_type)
    if kind not in ("f32", "f16"):
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _write_tokenizer(writer, tokenizer, vocab_size: int, pre: str) -> None:
    """Byte-level BPE vocabulary as llama.cpp's "gpt2" tokenizer model."""
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    model = spec.get("model", {})
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        raise ValueError("GGUF tokenizer export supports byte-level BPE tokenizers (GPT-2 style) only; "
                         "export without a tokenizer, or convert with llama.cpp's tools")  # fmt: skip
    vocab = tokenizer.get_vocab()  # token → id, added tokens included
    if max(vocab.values()) >= vocab_size:
        raise ValueError(f"the tokenizer has ids up to {max(vocab.values())} but the model only {vocab_size} rows")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for token, i in vocab.items():
        tokens[i], types[i] = token, gguf.TokenType.NORMAL
    for added in spec.get("added_tokens", []):
        types[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    merges = [" ".join(m) if isinstance(m, list) else m for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for attr, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                      ("unk_token_id", writer.add_unk_token_id), ("pad_token_id", writer.add_pad_token_id)):  # fmt: skip
        token_id = getattr(tokenizer, attr, None)
        if token_id is not None:
            add(int(token_id))
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)
