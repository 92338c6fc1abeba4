"""Checks made before an adapter changes anything: its state dict against the model, its name.

`PeftMethod.load_state_dict` must either load everything or change nothing, and its error must name the
first key that does not fit. Every method builds the map of keys → shapes it expects (in model order)
and calls `check_adapter_state` first; only then does it copy.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


def check_adapter_state(
    expected: Mapping[str, tuple[int, ...]], state: Mapping[str, torch.Tensor], peft_type: str
) -> None:
    """Raise ValueError naming the first missing key, shape mismatch or unexpected key, in that order."""
    for key, shape in expected.items():
        if key not in state:
            raise ValueError(f"{peft_type} adapter state is missing {key!r} (expected shape {tuple(shape)})")
        if not isinstance(state[key], torch.Tensor):
            raise ValueError(f"{peft_type} adapter state {key!r} is a {type(state[key]).__name__}, not a tensor")
        if tuple(state[key].shape) != tuple(shape):
            raise ValueError(
                f"{peft_type} adapter state {key!r} has shape {tuple(state[key].shape)}, "
                f"the model needs {tuple(shape)}"
            )
    unexpected = [key for key in state if key not in expected]
    if unexpected:
        raise ValueError(
            f"{peft_type} adapter state has {len(unexpected)} key(s) this model has no place for, "
            f"first {unexpected[0]!r}"
        )


def check_new_adapter_name(model: torch.nn.Module, adapter_name: str) -> None:
    """Refuse a taken adapter name before anything is changed (record_adapter would only refuse after)."""
    if not isinstance(adapter_name, str) or not adapter_name:
        raise ValueError(f"adapter_name must be a non-empty string, got {adapter_name!r}")
    if adapter_name in (getattr(model, "lowbit_adapters", None) or {}):
        raise ValueError(f"an adapter named {adapter_name!r} is already on this model")
