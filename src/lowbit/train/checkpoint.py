"""Atomic training checkpoints and exact resume.

A checkpoint is a directory `checkpoint-NNNNNNNN` (the optimizer step) holding:

- `trainable.safetensors`: every parameter that trains (LoRA A/B, a classification head, …), by name;
- `state.pt`: optimizer and scheduler state dicts, the RNG states (torch CPU and CUDA, Python, NumPy),
  the trainer's position in the data and its counters — plain tensors, numbers, strings, lists and
  dicts only, so `torch.load(weights_only=True)` reads it (no pickled code ever runs on load);
- `meta.json`: the step and the training config, for people.

Atomicity: everything is written into a hidden temporary directory, flushed to disk, and the directory
is renamed into place in one `os.replace`/`os.rename`. A run killed at any moment leaves either the
complete new checkpoint or none (plus a temporary directory that the next save deletes), never a half
written one, so the newest `checkpoint-*` is always loadable. Older checkpoints beyond `keep` are deleted
only after the new one is in place.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

FORMAT_VERSION = 1
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d{8})$")
WEIGHTS_NAME = "trainable.safetensors"
STATE_NAME = "state.pt"
META_NAME = "meta.json"


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Name → tensor of every parameter that requires grad (copied, contiguous, on the CPU)."""
    return {n: p.detach().to("cpu", copy=True).contiguous() for n, p in model.named_parameters() if p.requires_grad}


def rng_state() -> dict:
    """Every random generator a training step draws from, as weights_only-loadable values."""
    state = {"torch": torch.get_rng_state(), "python": _to_lists(random.getstate())}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = [kind, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(cached)]
    except ImportError:
        pass
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_to_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))


def _to_lists(x):
    return [_to_lists(v) for v in x] if isinstance(x, tuple) else x


def _to_tuples(x):
    return tuple(_to_tuples(v) for v in x) if isinstance(x, list) else x


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(output_dir, step: int, model: nn.Module, optimizer, scheduler, trainer_state: dict,
                    config: dict | None = None, keep: int = 2) -> Path:  # fmt: skip
    """Write `output_dir/checkpoint-<step>` atomically; keep the newest `keep` checkpoints."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    final = output_dir / f"checkpoint-{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=output_dir))
    save_file(trainable_state(model), tmp / WEIGHTS_NAME)
    state = {"format_version": FORMAT_VERSION, "step": step, "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict() if scheduler is not None else {}, "rng": rng_state(),
             "trainer": trainer_state}  # fmt: skip
    torch.save(state, tmp / STATE_NAME)
    (tmp / META_NAME).write_text(json.dumps({"step": step, "config": config or {}}, indent=2, default=str))
    for name in (WEIGHTS_NAME, STATE_NAME, META_NAME):
        with open(tmp / name, "rb") as f:
            os.fsync(f.fileno())
    if final.exists():  # the same step saved again (a resumed run): swap, never leave a gap
        old = output_dir / f".{final.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync_dir(output_dir)
    _prune(output_dir, keep)
    return final


def _prune(output_dir: Path, keep: int) -> None:
    for leftover in output_dir.glob(".checkpoint-*"):  # temporary directories of killed saves
        shutil.rmtree(leftover, ignore_errors=True)
    for path in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(path, ignore_errors=True)


def list_checkpoints(output_dir) -> list[Path]:
    """Complete checkpoints in `output_dir`, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if p.is_dir() and CHECKPOINT_RE.match(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT_RE.match(p.name).group(1)))


def latest_checkpoint(output_dir) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def load_checkpoint(path, model: nn.Module, optimizer=None, scheduler=None, restore_rng: bool = True) -> dict:
    """Load a checkpoint into `model` (trainable parameters), `optimizer` and `scheduler`; return the
    trainer state dict. Raises ValueError if the checkpoint's parameters do not match the model's."""
    path = Path(path)
    if not (path / WEIGHTS_NAME).is_file() or not (path / STATE_NAME).is_file():
        raise FileNotFoundError(f"{path} is not a lowbit checkpoint (needs {WEIGHTS_NAME} and {STATE_NAME})")
    weights = load_file(path / WEIGHTS_NAME)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(set(params) - set(weights)), sorted(set(weights) - set(params))
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not match the model's trainable parameters: "
                         f"missing {missing[:3]}, unexpected {unexpected[:3]}")  # fmt: skip
    for name, p in params.items():
        if weights[name].shape != p.shape:
            raise ValueError(f"checkpoint {path}: {name} has shape {tuple(weights[name].shape)}, "
                             f"the model's is {tuple(p.shape)}")  # fmt: skip
    state = torch.load(path / STATE_NAME, map_location="cpu", weights_only=True)
    if state.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"checkpoint {path} has format version {state.get('format_version')}, "
                         f"this lowbit reads {FORMAT_VERSION}")  # fmt: skip
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(weights[name])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state["scheduler"]:
        scheduler.load_state_dict(state["scheduler"])
    if restore_rng:
        set_rng_state(state["rng"])
    return state["trainer"]
