"""The table of PEFT methods: how each one is applied, saved and loaded.

Every method module (lora.py, ia3.py, prompt_tuning.py, …) registers one `PeftMethod` under its PEFT
`peft_type` ("LORA", "IA3", "PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING"; lowbit's own "BOTTLENECK").
`save_adapter` / `load_adapter` (peft/io.py) only look methods up here, so adding a method never edits
them. Which methods are on a model is recorded on the model itself, in `model.lowbit_adapters`
({adapter name: config}), set by each `apply_*` function through `record_adapter`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn


@dataclass(frozen=True)
class PeftMethod:
    peft_type: str
    config_cls: type
    # apply(model, config, adapter_name) -> model: inserts the method's modules (trainable, zero-effect init
    # where the method has one) and records the adapter.
    apply: Callable[[nn.Module, Any, str], nn.Module]
    # state_dict(model, adapter_name) -> {PEFT key: tensor}, keys exactly as HF peft writes them
    # ("base_model.model.<module>.lora_A.weight", "prompt_embeddings", …), without the adapter name.
    state_dict: Callable[[nn.Module, str], dict[str, torch.Tensor]]
    # load_state_dict(model, state, adapter_name): copy tensors in, raising ValueError that names the first
    # missing/unexpected key or shape mismatch before changing anything.
    load_state_dict: Callable[[nn.Module, dict[str, torch.Tensor], str], None]
    # to_peft_dict(config) -> dict for adapter_config.json (only fields HF peft knows, for peft's own types);
    # from_peft_dict(dict) -> config.
    to_peft_dict: Callable[[Any], dict]
    from_peft_dict: Callable[[dict], Any]


METHODS: dict[str, PeftMethod] = {}


def register_peft_method(method: PeftMethod) -> PeftMethod:
    METHODS[method.peft_type] = method
    return method


def get_peft_method(peft_type: str) -> PeftMethod:
    if peft_type not in METHODS:
        raise ValueError(f"unsupported peft_type {peft_type!r}; lowbit knows {sorted(METHODS)}")
    return METHODS[peft_type]


def method_for_config(config: Any) -> PeftMethod:
    """The registered method whose config class `config` is (what `save_adapter` dispatches on)."""
    for method in METHODS.values():
        if type(config) is method.config_cls:
            return method
    raise ValueError(f"no PEFT method is registered for {type(config).__name__}; lowbit knows {sorted(METHODS)}")


def record_adapter(model: nn.Module, adapter_name: str, config: Any) -> None:
    adapters = getattr(model, "lowbit_adapters", None)
    if adapters is None:
        adapters = {}
        model.lowbit_adapters = adapters
    if adapter_name in adapters:
        raise ValueError(f"an adapter named {adapter_name!r} is already on this model")
    adapters[adapter_name] = config
