"""Parameter-efficient fine-tuning: LoRA / QLoRA, bottleneck adapters, IA3, prompt / P- / prefix tuning.

    model = lowbit.peft.apply_lora(model, lowbit.peft.LoraConfig(r=8, alpha=16, target_modules="all-linear"))
    lowbit.peft.save_adapter(model, path)            # HF peft's adapter_config.json + adapter_model.safetensors
    model = lowbit.peft.load_adapter(base_model, path)

Each method lives in its own module and registers itself in `registry.py`; importing this package
imports them all, so `load_adapter` knows every `peft_type`.
"""

from lowbit.peft.io import load_adapter, read_adapter_config, read_adapter_weights, save_adapter
from lowbit.peft.lora import (
    LoraConfig,
    LoraLinear,
    apply_lora,
    find_lora_targets,
    lora_layers,
    merge_lora,
    remove_lora,
    unmerge_lora,
)
from lowbit.peft.multi import (
    active_adapters,
    adapters_disabled,
    delete_adapter,
    disable_adapters,
    enable_adapters,
    list_adapters,
    mixed_batch,
    set_active_adapters,
)
from lowbit.peft.registry import METHODS, PeftMethod, get_peft_method, register_peft_method

# Every method registers itself on import, so load_adapter knows every peft_type.
from lowbit.peft import adapter, ia3, p_tuning, partial, prefix_tuning, prompt_tuning, report  # noqa: F401, E402

__all__ = [
    "LoraConfig",
    "LoraLinear",
    "METHODS",
    "PeftMethod",
    "active_adapters",
    "adapters_disabled",
    "apply_lora",
    "delete_adapter",
    "disable_adapters",
    "enable_adapters",
    "find_lora_targets",
    "get_peft_method",
    "list_adapters",
    "load_adapter",
    "lora_layers",
    "merge_lora",
    "mixed_batch",
    "read_adapter_config",
    "read_adapter_weights",
    "register_peft_method",
    "remove_lora",
    "save_adapter",
    "set_active_adapters",
    "unmerge_lora",
]
