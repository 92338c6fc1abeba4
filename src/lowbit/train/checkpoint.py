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

Several processes (DDP, FSDP): every process calls `save_checkpoint` and `load_checkpoint`. Under FSDP2 a
trainable parameter and its optimizer state (Adam's moments) are DTensor shards; saving gathers each
into its full tensor (collective) and rank 0 alone writes, so the files are those of a one-process run
and any number of processes can resume from them; loading reads the full tensors on every process (the
directory must be visible to all of them) and keeps each process's own slice. Each process's RNG state
is saved under its rank (dropout draws differ between ranks).
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

from lowbit.train.distributed import full_tensor, is_sharded, rank_and_world

FORMAT_VERSION = 1
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d{8})$")
WEIGHTS_NAME = "trainable.safetensors"
STATE_NAME = "state.pt"
META_NAME = "meta.json"


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Name → tensor of every parameter that requires grad (copied, contiguous, on the CPU). FSDP2 shards
    are gathered into full tensors: a collective, so every process calls this."""
    return {n: full_tensor(p.detach()).to("cpu", copy=True).contiguous()
            for n, p in model.named_parameters() if p.requires_grad}  # fmt: skip


def full_optimizer_state(optimizer) -> dict:
    """`optimizer.state_dict()` with FSDP2-sharded state tensors gathered into full ones (collective)."""
    state = optimizer.state_dict()
    gathered = {i: {k: full_tensor(v) if is_sharded(v) else v for k, v in s.items()} for i, s in state["state"].items()}
    return {**state, "state": gathered}


def _shard_like(value, param: torch.Tensor):
    """This process's slice of a full tensor `value` when `param` is an FSDP2 shard of the same shape (every
    process holds the whole value: no communication); anything else unchanged."""
    if not (is_sharded(param) and isinstance(value, torch.Tensor) and value.shape == param.shape):
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(param.device), param.device_mesh, param.placements, src_data_rank=None)


def _shard_optimizer_state(state: dict, optimizer) -> dict:
    """Inverse of `full_optimizer_state` for this process: state tensors sliced like their parameters (the
    saved ids number the parameters in param-group order, as `optimizer.state_dict()` does)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    sharded = {i: {k: _shard_like(v, params[i]) for k, v in s.items()} for i, s in state["state"].items()}
    return {**state, "state": sharded}


def _rng_states_by_rank() -> list[dict]:
    """Every process's `rng_state()`, by rank (collective with several processes)."""
    _, world = rank_and_world()
    if world == 1:
        return [rng_state()]
    import torch.distributed as dist

    states = [None] * world
    dist.all_gather_object(states, rng_state())
    return states


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
    """Write `output_dir/checkpoint-<step>` atomically; keep the newest `keep` checkpoints.

    With several processes every one calls this (gathers are collective) and rank 0 writes; the others
    wait until the checkpoint is in place and get its path too."""
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step:08d}"
    weights, optim, rngs = trainable_state(model), full_optimizer_state(optimizer), _rng_states_by_rank()
    rank, world = rank_and_world()
    if rank == 0:
        state = {"format_version": FORMAT_VERSION, "step": step, "optimizer": optim,
                 "scheduler": scheduler.state_dict() if scheduler is not None else {}, "rng": rngs[0],
                 "rng_by_rank": rngs, "trainer": trainer_state}  # fmt: skip
        _write(output_dir, final, weights, state, config, keep)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()  # nobody reads (resumes from) a checkpoint rank 0 has not finished
    return final


def _write(output_dir: Path, final: Path, weights: dict, state: dict, config: dict | None, keep: int) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    step = state["step"]
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=output_dir))
    save_file(weights, tmp / WEIGHTS_NAME)
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
            p.copy_(_shard_like(weights[name], p))
    if optimizer is not None:
        optimizer.load_state_dict(_shard_optimizer_state(state["optimizer"], optimizer))
    if scheduler is not None and state["scheduler"]:
        scheduler.load_state_dict(state["scheduler"])
    if restore_rng:
        rank, world = rank_and_world()
        by_rank = state.get("rng_by_rank", [])
        set_rng_state(by_rank[rank] if len(by_rank) == world else state["rng"])  # another world size: rank 0's
    return state["trainer"]
