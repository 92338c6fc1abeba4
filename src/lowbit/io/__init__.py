"""Model loading and export: the packaged default model, transformers directories, GGUF files,
merged safetensors, bitsandbytes 4-bit and GPTQ checkpoints; `convert` between them, verified."""

from lowbit.io.auto import checkpoint_kind, load_any
from lowbit.io.bnb import is_bnb_checkpoint, load_bnb_4bit, save_bnb_4bit
from lowbit.io.conversion import ConvertOptions, ConvertReport, convert
from lowbit.io.gguf_export import collect_imatrix, export_gguf
from lowbit.io.gguf_kquants import quantize_kquant
from lowbit.io.gguf_lora import export_lora_gguf, export_peft_lora_gguf, write_lora_gguf
from lowbit.io.gptq_format import is_gptq_checkpoint, load_gptq, save_gptq
from lowbit.io.loading import load_model
from lowbit.io.merged import dequantize_model, merged_copy, save_merged

__all__ = [
    "ConvertOptions",
    "ConvertReport",
    "checkpoint_kind",
    "collect_imatrix",
    "convert",
    "dequantize_model",
    "export_gguf",
    "export_lora_gguf",
    "export_peft_lora_gguf",
    "is_bnb_checkpoint",
    "is_gptq_checkpoint",
    "load_any",
    "load_bnb_4bit",
    "load_gptq",
    "load_model",
    "merged_copy",
    "quantize_kquant",
    "save_bnb_4bit",
    "save_gptq",
    "save_merged",
    "write_lora_gguf",
]
