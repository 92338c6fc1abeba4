"""Export a plain transformers model: LoRA merged, quantized layers dequantized, saved with `save_pretrained`.

The output directory is what ``AutoModelForCausalLM.from_pretrained`` reads without lowbit installed:
config.json + model.safetensors (+ tokenizer files). Everything lowbit-specific is folded away first —
LoRA adapters are merged into their base weights (W + (α/r)·B·A, Hu et al. 2021, eq. 3) and every
`QuantLinear` becomes an ``nn.Linear`` holding its dequantized weight — so the exported model computes what
the lowbit model computed, up to float rounding of the matmul.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from torch import nn

from lowbit.nn.quant_linear import QuantLinear
from lowbit.quantize.api import set_submodule

LOWBIT_ATTRIBUTES = ("lowbit_quant_config", "lowbit_adapters")


def dequantize_linear(module: QuantLinear, dtype: torch.dtype | None = None) -> nn.Linear:
    """An ``nn.Linear`` with ``module``'s dequantized weight (and bias) in ``dtype`` (default: its compute dtype)."""
    dtype = dtype or module.compute_dtype
    device = module.weight.device
    linear = nn.Linear(module.in_features, module.out_features, module.bias is not None, device=device, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(module.dequantize(torch.float32))
        if module.bias is not None:
            linear.bias.copy_(module.bias)
    return linear.requires_grad_(False)


def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every QuantLinear of ``model`` with its dequantized ``nn.Linear``, in place; returns ``model``."""
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantLinear):
            set_submodule(model, name, dequantize_linear(module, dtype))
    if hasattr(model, "lowbit_quant_config"):  # nothing is quantized any more
        del model.lowbit_quant_config
    return model


def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold LoRA adapters (lowbit.peft) into their base layers, in place; other adapter kinds are refused."""
    try:
        from lowbit.peft import lora_layers, remove_lora
    except ImportError:  # lowbit.peft not installed in this build: nothing can be attached
        return model
    if lora_layers(model):
        remove_lora(model, merge=True, mode="dense")
    leftovers = sorted({type(m).__name__ for m in model.modules() if type(m).__module__.startswith("lowbit.peft")})
    if leftovers:
        raise ValueError(f"the model still holds adapter modules {leftovers} that cannot be merged into its weights; "
                         "remove them (or save them as an adapter) before exporting")  # fmt: skip
    return model


def merged_copy(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """A plain transformers copy of ``model``: adapters merged, QuantLinear dequantized; ``model`` is untouched.

    ``dtype`` casts the whole copy (e.g. ``torch.float16`` for a smaller file); default: keep each tensor's dtype.
    """
    plain = merge_adapters(copy.deepcopy(model))
    dequantize_model(plain)
    for attr in LOWBIT_ATTRIBUTES:
        if hasattr(plain, attr):
            delattr(plain, attr)
    if dtype is not None:
        plain = plain.to(dtype)
    return plain.eval()


def save_merged(model: nn.Module, path: str | os.PathLike, tokenizer=None, dtype: torch.dtype | None = None) -> Path:
    """Write ``model`` as a plain transformers checkpoint at ``path`` (see the module docstring); returns the path.

    ``model`` is left as it was (the merge and dequantization happen on a copy).
    """
    if not hasattr(model, "save_pretrained"):
        raise TypeError(f"save_merged needs a transformers model (with save_pretrained), got {type(model).__name__}")
    plain = merged_copy(model, dtype)
    if getattr(plain.config, "quantization_config", None) is not None:
        del plain.config.quantization_config  # the weights are dense now
    path = Path(path)
    plain.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path
