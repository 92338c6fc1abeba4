"""Saving and loading adapters in HF peft's file layout: `adapter_config.json` + `adapter_model.safetensors`.

    lowbit.peft.save_adapter(model, "my-adapter")              # any method registered in peft/registry.py
    model = lowbit.peft.load_adapter(base_model, "my-adapter")  # also adapters that HF peft saved

The config is peft's own JSON (`peft_type`, `task_type`, `r`, `lora_alpha`, …; for peft's methods only
fields peft knows, since unknown keys crash older peft releases), and tensor names are peft's, without
the adapter name (`base_model.model.<module>.lora_A.weight`). Which method a file holds is its
`peft_type`; this module only dispatches through the registry, so a new method never edits it.

Loading is all or nothing: the config and tensors are read and the method applied and filled inside a
guard that puts the model back exactly as it was (modules, attributes, requires_grad flags) if any step
fails, so a mismatching adapter raises a ValueError naming the first mismatch and leaves nothing behind.
"""

from __future__ import annotations

import copy
import json
import os
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from lowbit.peft.registry import get_peft_method, method_for_config

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_BIN_NAME = "adapter_model.bin"  # older peft default; read with torch.load(weights_only=True)
# The peft release whose file format lowbit writes (recorded as peft_version, which peft only reads to warn).
PEFT_FORMAT_VERSION = "0.21.2"
# transformers class-name suffix → peft TaskType (which PeftModel subclass peft builds on load).
TASK_TYPES = {
    "ForCausalLM": "CAUSAL_LM",
    "ForSequenceClassification": "SEQ_CLS",
    "ForTokenClassification": "TOKEN_CLS",
    "ForQuestionAnswering": "QUESTION_ANS",
}


def _task_type(model: nn.Module) -> str | None:
    name = type(model).__name__
    return next((task for suffix, task in TASK_TYPES.items() if name.endswith(suffix)), None)


def _base_model_name(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    name = getattr(config, "name_or_path", None) or getattr(config, "_name_or_path", None)
    return str(name) if name else None


def _choose_adapter(model: nn.Module, adapter_name: str | None) -> tuple[str, object]:
    adapters = getattr(model, "lowbit_adapters", None) or {}
    if not adapters:
        raise ValueError("the model carries no adapter; apply one (e.g. lowbit.peft.apply_lora) or load one first")
    if adapter_name is None:
        if len(adapters) != 1:
            raise ValueError(f"the model carries adapters {sorted(adapters)}; pass adapter_name to choose one")
        adapter_name = next(iter(adapters))
    if adapter_name not in adapters:
        raise ValueError(f"no adapter named {adapter_name!r} on this model; it has {sorted(adapters)}")
    return adapter_name, adapters[adapter_name]


def save_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str | None = None) -> Path:
    """Write adapter `adapter_name` (default: the model's only adapter) to directory `path`.

    Produces `adapter_config.json` and `adapter_model.safetensors` that HF peft's
    `PeftModel.from_pretrained(base, path)` loads; returns the directory.
    """
    adapter_name, config = _choose_adapter(model, adapter_name)
    method = method_for_config(config)
    state = method.state_dict(model, adapter_name)
    if not state:
        raise ValueError(f"adapter {adapter_name!r} has no tensors on this model; nothing to save")
    peft_config = dict(method.to_peft_dict(config))
    if peft_config.setdefault("peft_type", method.peft_type) != method.peft_type:
        raise ValueError(f"{method.peft_type}'s to_peft_dict wrote peft_type {peft_config['peft_type']!r}")
    for key, value in (("task_type", _task_type(model)), ("base_model_name_or_path", _base_model_name(model)),
                       ("peft_version", PEFT_FORMAT_VERSION)):  # fmt: skip
        if peft_config.get(key) is None:
            peft_config[key] = value
    # Own, contiguous CPU copies: safetensors refuses views and tensors that share storage.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    _atomic_write(path / ADAPTER_WEIGHTS_NAME, lambda f: _save_safetensors(tensors, f))
    text = json.dumps(peft_config, indent=2, sort_keys=True) + "\n"
    _atomic_write(path / ADAPTER_CONFIG_NAME, lambda f: Path(f).write_text(text))
    return path


def _save_safetensors(tensors: dict[str, torch.Tensor], file: str) -> None:
    from safetensors.torch import save_file

    save_file(tensors, file, metadata={"format": "pt"})


def _atomic_write(target: Path, write) -> None:
    tmp = target.with_name(target.name + ".tmp")
    write(str(tmp))
    os.replace(tmp, target)


def read_adapter_config(path: str | os.PathLike) -> dict:
    """The adapter_config.json of an adapter directory, checked to name a `peft_type`."""
    file = Path(path) / ADAPTER_CONFIG_NAME
    if not file.is_file():
        raise FileNotFoundError(f"{file} does not exist; an adapter directory holds {ADAPTER_CONFIG_NAME}"
                                f" and {ADAPTER_WEIGHTS_NAME}")  # fmt: skip
    try:
        config = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(config, dict) or not isinstance(config.get("peft_type"), str):
        raise ValueError(f"{file} has no peft_type; is it a PEFT adapter config?")
    return config


def read_adapter_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of an adapter directory (safetensors, or peft's older adapter_model.bin)."""
    path = Path(path)
    file = path / ADAPTER_WEIGHTS_NAME
    try:
        if file.is_file():
            from safetensors.torch import load_file

            state = load_file(str(file))
        elif (path / ADAPTER_BIN_NAME).is_file():
            file = path / ADAPTER_BIN_NAME
            state = torch.load(file, map_location="cpu", weights_only=True)
        else:
            raise FileNotFoundError(f"{path} holds neither {ADAPTER_WEIGHTS_NAME} nor {ADAPTER_BIN_NAME}")
    except FileNotFoundError:
        raise
    except Exception as e:  # safetensors/pickle errors come in many types; all mean the same thing here
        raise ValueError(f"cannot read adapter weights from {file} (corrupt or not a {file.suffix} file):"
                         f" {e}") from None  # fmt: skip
    flat = isinstance(state, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())
    if not flat:
        raise ValueError(f"{file} does not hold a flat {{name: tensor}} state dict")
    return state


def load_adapter(
    model: nn.Module, path: str | os.PathLike, adapter_name: str = "default", trainable: bool = False
) -> nn.Module:
    """Apply the adapter saved in `path` (by lowbit or HF peft) to `model`, in place; returns `model`.

    The loaded adapter becomes the active one. Its parameters require grad only with `trainable=True`
    (peft's `is_trainable`); the base stays frozen either way. The new modules follow the model's mode: loaded
    into a model in eval mode, the adapter's dropout is off. On any error the model is left unchanged.
    """
    config_dict = read_adapter_config(path)
    method = get_peft_method(config_dict["peft_type"])
    config = method.from_peft_dict(config_dict)
    state = read_adapter_weights(path)
    before, modules_before = {id(p) for p in model.parameters()}, {id(m) for m in model.modules()}
    with _restored_on_error(model):
        method.apply(model, config, adapter_name)
        method.load_state_dict(model, state, adapter_name)
    for module in model.modules():
        if id(module) not in modules_before:  # new modules are born in training mode (dropout on)
            module.training = model.training
    for p in model.parameters():
        if id(p) not in before:
            p.requires_grad_(trainable)
    return model


def _snapshot_container(value):
    return copy.copy(value) if isinstance(value, (dict, list, set)) else None


@contextmanager
def _restored_on_error(model: nn.Module):
    """Undo every structural change made inside the block if it raises.

    Saves, for each module, its attribute dict and a shallow copy of every container in it (`_modules`,
    `_parameters`, `_buffers`, hook dicts, lists such as active adapter names), plus each parameter's
    requires_grad. Parameter values are not copied: applying an adapter adds modules, it does not
    rewrite base weights.
    """
    saved = []
    for module in model.modules():
        attrs = dict(module.__dict__)
        saved.append((module, attrs, {k: _snapshot_container(v) for k, v in attrs.items()}))
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        yield
    except BaseException:
        for module, attrs, contents in saved:
            module.__dict__.clear()
            module.__dict__.update(attrs)
            for key, content in contents.items():
                if content is None:
                    continue
                container = attrs[key]
                if isinstance(container, list):
                    container[:] = content
                else:
                    container.clear()
                    container.update(content)
        for p, flag in flags:
            p.requires_grad_(flag)
        raise
