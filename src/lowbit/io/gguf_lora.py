"""LoRA adapters as GGUF adapter files (what llama.cpp's --lora and llama-export-lora read).

File layout, as llama.cpp's convert_lora_to_gguf.py writes it:

    general.architecture = "llama" (the base model's), general.type = "adapter", adapter.type = "lora",
    adapter.lora.alpha = α (float32)
    <gguf tensor name>.lora_a   numpy (r, in)   = A            e.g. blk.0.attn_q.weight.lora_a
    <gguf tensor name>.lora_b   numpy (out, r)  = B
    token_embd.weight.lora_a    numpy (vocab, r) = Aᵀ           (llama.cpp gathers rows of it per token)
    token_embd.weight.lora_b    numpy (hidden, r) = B

llama.cpp adds scale·B·A·x with scale = user_scale · α / r, one global α and r = that tensor's own rank
(lora_b's row length). Per-module ranks (rank_pattern) therefore come out right by themselves, but rsLoRA
(α/√r) and per-module alphas (alpha_pattern) do not. We keep α = the adapter's own alpha in the header (so a
plain LoRA's tensors are exactly PEFT's, as convert_lora_to_gguf writes them) and fold the remaining factor
c = s·r/α into lora_b, where s is the layer's true scale: llama.cpp then computes (α/r)·(c·B)·A = s·B·A.
The other choice, α = 0 (llama.cpp then uses scale 1) with s folded everywhere, would alter every tensor
and depend on a special case of the reader.

Llama's q/k rows are permuted into llama.cpp's rope order in the base file (see gguf_export); B's rows are
permuted the same way, A (the input side) is not. An adapter on lm_head needs an untied base (the GGUF must
have an output.weight for it to attach to).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lowbit.io.gguf_export import ARCHITECTURES, PERMUTED_ROPE, _check_model, gguf_name, interleave_rope_rows

LORA_GGUF_DTYPES = ("f32", "f16")


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _gguf_pairs(config, arch: str, updates: list[tuple[str, torch.Tensor, torch.Tensor, float]], alpha: float):
    """(module, A (r, in), B (out, r), true scale) → [(gguf name, lora_a array, lora_b array)] in float64."""
    tied = getattr(config, "tie_word_embeddings", False)
    out = []
    for module, a, b, scale in updates:
        name = gguf_name(f"{module}.weight")
        if name is None:
            raise ValueError(f"{module} has no tensor in a GGUF {arch} model: its LoRA cannot be written")
        if name == "output.weight" and tied:
            raise ValueError("the adapter changes lm_head, but the model ties it to the embeddings, so the base GGUF "
                             "has no output.weight to attach it to (llama.cpp's converter refuses this too); "
                             "untie the base model (tie_word_embeddings=False) and export both again")  # fmt: skip
        a, b = a.detach().double().cpu(), b.detach().double().cpu()
        fold = scale * a.shape[0] / alpha  # llama.cpp applies α/r: the rest of the true scale goes into B
        if abs(fold - 1) > 1e-12:
            b = b * fold
        if arch in PERMUTED_ROPE and name.endswith(("attn_q.weight", "attn_k.weight")):
            b = interleave_rope_rows(b, b.shape[0] // _head_dim(config))  # B's rows are the output rows
        if name == "token_embd.weight":
            a = a.T  # (vocab, r): llama.cpp looks rows of lora_a up by token id, then multiplies by lora_b
        out.append((name, a, b))
    return out


def write_lora_gguf(path: str | os.PathLike, config, updates, alpha: float, dtype: str = "f32",
                    name: str | None = None) -> Path:  # fmt: skip
    """Write LoRA ``updates`` [(module name, A (r, in), B (out, r), true scale)] for a base model with
    transformers ``config`` as a GGUF adapter; for an embedding A is (r, vocab) and B (hidden, r), PEFT's
    lora_embedding_A / _B. ``alpha`` goes into the header; see the module docstring for the scale."""
    import gguf

    if dtype not in LORA_GGUF_DTYPES:
        raise ValueError(f"LoRA GGUF dtype must be one of {LORA_GGUF_DTYPES}, got {dtype!r}")
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a positive number, got {alpha!r}")
    if not updates:
        raise ValueError("the adapter has no LoRA update to write")
    arch = ARCHITECTURES.get(getattr(config, "model_type", None))
    if arch is None:
        raise ValueError(f"GGUF export supports {sorted(ARCHITECTURES)} models, not {config.model_type!r}")
    np_dtype = np.float32 if dtype == "f32" else np.float16
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    writer.add_name(str(name or getattr(config, "_name_or_path", "") or arch) + " LoRA")
    for tensor_name, a, b in _gguf_pairs(config, arch, updates, float(alpha)):
        writer.add_tensor(f"{tensor_name}.lora_a", a.numpy().astype(np_dtype))
        writer.add_tensor(f"{tensor_name}.lora_b", b.numpy().astype(np_dtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)


def export_lora_gguf(model: nn.Module, path: str | os.PathLike, adapter_name: str | None = None,
                     dtype: str = "f32") -> Path:  # fmt: skip
    """Write a lowbit LoRA adapter of ``model`` (lowbit.peft.apply_lora / load_adapter) as a GGUF adapter.

    Every LoraLinear layer holding ``adapter_name`` (default: the model's only LoRA adapter) is written with its
    own rank and scale (rsLoRA, rank_pattern and alpha_pattern included). Whole trained modules
    (modules_to_save) have no place in a GGUF LoRA file and are refused.
    """
    from lowbit.peft.lora import LoraConfig, lora_layers, saved_module_wrappers

    _check_model(model)
    configs = {n: c for n, c in (getattr(model, "lowbit_adapters", None) or {}).items() if isinstance(c, LoraConfig)}
    if adapter_name is None:
        if len(configs) != 1:
            raise ValueError(f"the model carries LoRA adapters {sorted(configs)}; pass adapter_name to choose one")
        adapter_name = next(iter(configs))
    if adapter_name not in configs:
        raise ValueError(f"the model has no LoRA adapter named {adapter_name!r} (it has {sorted(configs)})")
    if saved_module_wrappers(model, [adapter_name]):
        raise ValueError("the adapter trains whole modules (modules_to_save), which a GGUF LoRA file cannot hold; "
                         "export the merged model with export_gguf instead")  # fmt: skip
    updates = [(module, layer.lora_A[adapter_name], layer.lora_B[adapter_name], layer.scaling[adapter_name])
               for module, layer in lora_layers(model) if adapter_name in layer.lora_A]  # fmt: skip
    return write_lora_gguf(path, model.config, updates, configs[adapter_name].alpha, dtype)


def export_peft_lora_gguf(adapter_dir: str | os.PathLike, config, path: str | os.PathLike,
                          dtype: str = "f32") -> Path:  # fmt: skip
    """Convert a PEFT-format LoRA adapter directory (adapter_config.json + weights, written by HF peft or
    lowbit.peft.save_adapter) for a base model with transformers ``config`` into a GGUF adapter — the job of
    llama.cpp's convert_lora_to_gguf.py, with each module's true scale folded in. Embedding adapters
    (lora_embedding_A / _B on embed_tokens) become token_embd.weight.lora_a / .lora_b.
    """
    from lowbit.peft.io import read_adapter_config, read_adapter_weights
    from lowbit.peft.lora import lora_config_from_peft

    raw = read_adapter_config(adapter_dir)
    if raw.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"only LoRA adapters convert to GGUF LoRA files, this one is {raw.get('peft_type')!r}")
    lora = lora_config_from_peft(raw)
    weights = read_adapter_weights(adapter_dir)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in weights.items():
        if key.endswith(".base_layer.weight"):  # peft saves targeted embeddings' base weights too: not a delta
            continue
        for suffix, which in ((".lora_A.weight", "A"), (".lora_B.weight", "B"),
                              (".lora_embedding_A", "A"), (".lora_embedding_B", "B")):  # fmt: skip
            if key.endswith(suffix):
                module = key[: -len(suffix)].removeprefix("base_model.model.")
                pairs.setdefault(module, {})[which] = tensor
                break
        else:
            raise ValueError(f"the adapter holds {key!r}, which is not a LoRA A/B tensor; a GGUF LoRA file cannot "
                             "hold whole trained modules (modules_to_save)")  # fmt: skip
    updates = []
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{module}: the adapter has lora_{'A' if 'B' in ab else 'B'} without its partner")
        updates.append((module, ab["A"], ab["B"], lora.scaling_for(module)))
    return write_lora_gguf(path, config, updates, lora.alpha, dtype, name=raw.get("base_model_name_or_path"))
