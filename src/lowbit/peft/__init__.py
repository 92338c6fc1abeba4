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
from lowbit.peft.merge_report import MergeLayer, MergeReport
from lowbit.peft.quant_merge import MergeConfig, merge_adapter
from lowbit.peft.registry import METHODS, PeftMethod, get_peft_method, register_peft_method

# Every method registers itself on import, so load_adapter knows every peft_type.
from lowbit.peft.adapter import BottleneckConfig, apply_bottleneck, remove_bottleneck  # noqa: E402
from lowbit.peft.ia3 import IA3Config, apply_ia3, merge_ia3, remove_ia3  # noqa: E402
from lowbit.peft.p_tuning import PTuningConfig, apply_p_tuning, drop_prompt_encoder, remove_p_tuning  # noqa: E402
from lowbit.peft.partial import PartialConfig, apply_full_finetuning, apply_partial, remove_partial  # noqa: E402
from lowbit.peft.prefix_tuning import (  # noqa: E402
    PrefixTuningConfig,
    apply_prefix_tuning,
    drop_prefix_encoder,
    remove_prefix_tuning,
)
from lowbit.peft.prompt_tuning import PromptTuningConfig, apply_prompt_tuning, remove_prompt_tuning  # noqa: E402
from lowbit.peft.report import ParameterReport, parameter_report, print_trainable_parameters  # noqa: E402

__all__ = [
    "BottleneckConfig",
    "IA3Config",
    "LoraConfig",
    "LoraLinear",
    "METHODS",
    "MergeConfig",
    "MergeLayer",
    "MergeReport",
    "PTuningConfig",
    "ParameterReport",
    "PartialConfig",
    "PeftMethod",
    "PrefixTuningConfig",
    "PromptTuningConfig",
    "active_adapters",
    "adapters_disabled",
    "apply_bottleneck",
    "apply_full_finetuning",
    "apply_ia3",
    "apply_lora",
    "apply_p_tuning",
    "apply_partial",
    "apply_prefix_tuning",
    "apply_prompt_tuning",
    "delete_adapter",
    "disable_adapters",
    "drop_prefix_encoder",
    "drop_prompt_encoder",
    "enable_adapters",
    "find_lora_targets",
    "get_peft_method",
    "list_adapters",
    "load_adapter",
    "lora_layers",
    "merge_adapter",
    "merge_ia3",
    "merge_lora",
    "mixed_batch",
    "parameter_report",
    "print_trainable_parameters",
    "read_adapter_config",
    "read_adapter_weights",
    "register_peft_method",
    "remove_bottleneck",
    "remove_ia3",
    "remove_lora",
    "remove_p_tuning",
    "remove_partial",
    "remove_prefix_tuning",
    "remove_prompt_tuning",
    "save_adapter",
    "set_active_adapters",
    "unmerge_lora",
]
