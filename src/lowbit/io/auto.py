"""Open whatever a user points lowbit at: a packaged name, a transformers / lowbit / bnb / GPTQ directory, a GGUF.

    model, tokenizer = load_any("smollm2-nf4")   # written by `lowbit quantize`: QuantLinear layers, no re-quantizing

The checks look only at file names and config.json: a lowbit checkpoint has ``lowbit_quant_config``'s JSON file,
a bitsandbytes one a ``quantization_config`` with ``quant_method: "bitsandbytes"``, a GPTQ one ``quant_method: "gptq"``
(or AutoGPTQ's quantize_config.json); anything else goes to
`lowbit.load_model` (packaged name, plain transformers directory, .gguf file).
"""

from __future__ import annotations

import os
from pathlib import Path

from lowbit.io.bnb import is_bnb_checkpoint, load_bnb_4bit
from lowbit.io.gptq_format import is_gptq_checkpoint, load_gptq
from lowbit.io.loading import PACKAGED_NAMES, load_model
from lowbit.io.quantized import META_FILE, load_quantized


def checkpoint_kind(name_or_path: str | os.PathLike) -> str:
    """"packaged", "lowbit", "bnb-4bit", "gptq", "transformers", "gguf" or "unknown"."""
    if isinstance(name_or_path, str) and name_or_path.strip().lower() in PACKAGED_NAMES:
        return "packaged"
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return "gguf"
    if not path.is_dir():
        return "unknown"
    if (path / META_FILE).is_file():
        return "lowbit"
    if is_bnb_checkpoint(path):
        return "bnb-4bit"
    if is_gptq_checkpoint(path):
        return "gptq"
    return "transformers" if (path / "config.json").is_file() else "unknown"


def load_any(name_or_path: str | os.PathLike):
    """``(model, tokenizer)`` for any source `checkpoint_kind` recognises; quantized checkpoints stay quantized."""
    kind = checkpoint_kind(name_or_path)
    if kind in ("lowbit", "bnb-4bit", "gptq"):
        from transformers import AutoTokenizer

        path = Path(name_or_path).expanduser()
        model = {"lowbit": load_quantized, "bnb-4bit": load_bnb_4bit, "gptq": load_gptq}[kind](path)
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as e:
            raise FileNotFoundError(f"{path} holds no tokenizer files; save the model with its tokenizer") from e
        return model, tokenizer
    return load_model(name_or_path)
