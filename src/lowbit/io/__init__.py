"""Model loading and export: the packaged default model, transformers directories, GGUF files,
merged safetensors, bitsandbytes 4-bit checkpoints."""

from lowbit.io.auto import checkpoint_kind, load_any
from lowbit.io.bnb import is_bnb_checkpoint, load_bnb_4bit, save_bnb_4bit
from lowbit.io.gguf_export import export_gguf
from lowbit.io.loading import load_model
from lowbit.io.merged import dequantize_model, merged_copy, save_merged

__all__ = [
    "checkpoint_kind",
    "dequantize_model",
    "export_gguf",
    "is_bnb_checkpoint",
    "load_any",
    "load_bnb_4bit",
    "load_model",
    "merged_copy",
    "save_bnb_4bit",
    "save_merged",
]
