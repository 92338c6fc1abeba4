"""Saving and loading quantized models: safetensors for the tensors, JSON for what they mean.

A saved model is a directory:
    config.json              the transformers config (architecture, sizes)
    lowbit_quant.json        format name + version, the QuantConfig, every quantized layer's format
    model.safetensors        all tensors: packed codes and scales of quantized layers, the rest as is
    tokenizer files          when a tokenizer is passed

Loading builds the model skeleton with its parameters on the meta device (no memory, no random
init), swaps in empty lowbit layers (QuantLinear, Int8Linear, …: `LAYER_CLASSES`, each rebuilt from the
`to_meta()` description recorded per layer) and then assigns the stored tensors, so neither a
full-precision copy nor a re-quantization ever happens. Only safetensors and JSON are read: nothing
in a checkpoint can execute code.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch
import transformers
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lowbit.nn import ActOrderQuantLinear, Int8Linear, QuantLinear, SpQRLinear, W8A8Linear
from lowbit.quantize.api import set_submodule
from lowbit.quantize.config import QuantConfig

FORMAT_NAME = "lowbit-quantized"
FORMAT_VERSION = 1
META_FILE = "lowbit_quant.json"
WEIGHTS_FILE = "model.safetensors"


# The module classes a checkpoint can hold, by the name recorded for each layer. Each provides
# `to_meta()` (JSON construction arguments) and `from_meta(meta, device)` (an empty twin to load into).
LAYER_CLASSES = {cls.__name__: cls for cls in (QuantLinear, ActOrderQuantLinear, Int8Linear, W8A8Linear, SpQRLinear)}


class CheckpointError(ValueError):
    """A quantized checkpoint is missing, corrupt, truncated or from an unsupported format version."""


def save_quantized(model: nn.Module, path: str | os.PathLike, tokenizer=None) -> Path:
    """Write a quantized (or partly quantized) transformers model to the directory `path`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    layers = {}
    for name, m in model.named_modules():
        if isinstance(m, (QuantLinear, *LAYER_CLASSES.values())):
            if LAYER_CLASSES.get(type(m).__name__) is not type(m):
                raise ValueError(f"cannot save {name}: {type(m).__name__} is not one of lowbit's checkpoint "
                                 f"layer classes {sorted(LAYER_CLASSES)}")  # fmt: skip
            layers[name] = {"class": type(m).__name__, **m.to_meta()}
    tensors, tied = _dedupe_shared(model.state_dict())
    config = getattr(model, "lowbit_quant_config", None)
    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "model_class": type(model).__name__,
        "quant_config": config.to_dict() if isinstance(config, QuantConfig) else None,
        "layers": layers,
        "tied": tied,
    }
    # Write the tensors first and the JSON last, each through a temp file + rename: a crash midway
    # leaves either the previous checkpoint or no lowbit_quant.json, never a mix that loads wrongly.
    _atomic_write(path / WEIGHTS_FILE, lambda p: save_file(tensors, p, metadata={"format": FORMAT_NAME}))
    model.config.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    _atomic_write(path / META_FILE, lambda p: Path(p).write_text(json.dumps(meta, indent=2)))
    return path


def load_quantized(path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """Load a model written by `save_quantized`, straight into its quantized layers."""
    path = Path(path)
    meta = _read_meta(path)
    model_cls = getattr(transformers, meta["model_class"], None)
    if not (isinstance(model_cls, type) and issubclass(model_cls, transformers.PreTrainedModel)):
        raise CheckpointError(f"{path}: unknown model class {meta['model_class']!r} (not a transformers model)")
    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    with _parameters_on_meta():
        model = model_cls(config)
    for name, layer in meta["layers"].items():
        set_submodule(model, name, _empty_layer(path, name, layer))
    state = _read_tensors(path / WEIGHTS_FILE)
    for key, source in meta["tied"].items():
        state[key] = state[source]
    expected = set(model.state_dict())
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise CheckpointError(f"{path}: tensors do not match the model: missing {sorted(missing)[:5]}, "
                              f"unexpected {sorted(unexpected)[:5]}")  # fmt: skip
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:  # shape mismatches
        raise CheckpointError(f"{path}: stored tensors do not fit the model: {e}") from e
    if meta["quant_config"] is not None:
        model.lowbit_quant_config = QuantConfig.from_dict(meta["quant_config"])
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # one Parameter again for tied embeddings, as after from_pretrained
    return model.to(device).eval()


def _empty_layer(path: Path, name: str, layer: dict) -> nn.Module:
    """The recorded layer class (QuantLinear when none is recorded: files of lowbit ≤ 0.1) built on meta."""
    layer = dict(layer)
    cls = LAYER_CLASSES.get(layer.pop("class", "QuantLinear"))
    if cls is None:
        raise CheckpointError(f"{path}: layer {name} has an unknown class; lowbit reads {sorted(LAYER_CLASSES)}")
    try:
        return cls.from_meta(layer, device="meta")
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: the description of layer {name} is invalid: {e!r}") from e


def _read_meta(path: Path) -> dict:
    meta_file = path / META_FILE
    if not meta_file.is_file():
        raise CheckpointError(f"{path} is not a lowbit quantized model: {META_FILE} is missing")
    try:
        meta = json.loads(meta_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{meta_file} is corrupt: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{meta_file} does not describe a {FORMAT_NAME} checkpoint")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{meta_file} has format version {meta.get('format_version')}; this lowbit reads "
                              f"version {FORMAT_VERSION} — re-export it with a matching lowbit")  # fmt: skip
    for key in ("model_class", "layers", "tied", "quant_config"):
        if key not in meta:
            raise CheckpointError(f"{meta_file} lacks the field {key!r}")
    return meta


def _read_tensors(file: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise CheckpointError(f"{file} is missing")
    try:
        return load_file(file)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{file} is corrupt or truncated ({e}); re-save the model") from e


def _dedupe_shared(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """safetensors refuses aliased tensors (tied embeddings): keep one copy, record the aliases."""
    seen: dict[tuple, str] = {}
    tensors, tied = {}, {}
    for key, t in state.items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if t.numel() and ident in seen:
            tied[key] = seen[ident]
            continue
        seen[ident] = key
        tensors[key] = t.contiguous()
    return tensors, tied


def _atomic_write(target: Path, write) -> None:
    tmp = target.with_name(target.name + ".tmp")
    write(str(tmp))
    os.replace(tmp, target)


@contextlib.contextmanager
def _parameters_on_meta():
    """Create parameters on the meta device while buffers (rotary tables, …) are built for real."""
    original = nn.Module.register_parameter

    def register_on_meta(module, name, param):
        original(module, name, param)
        if param is not None:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = original
