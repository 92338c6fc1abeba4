"""What training can keep in CPU memory instead of the GPU's.

- `offloaded_activations`: every tensor autograd saves for backward waits in pinned CPU memory and comes
  back when backward needs it. The longest sequences fit; each step pays the copies.
- `offload_embeddings`: a frozen input embedding table stays in CPU memory. Each forward looks up its
  (tokens × hidden) rows on the CPU and copies only them to the GPU: for Llama-3-8B, 1 GiB of table
  (128,256 × 4,096 bf16) against 16 MiB of rows for 2,048 tokens. In (Q)LoRA the table never trains, so
  nothing else about it is needed on the GPU. `restore_embeddings` moves it back (for generation, merging,
  export).

The embedding keeps its module, its parameter and so its state-dict key; only where the weight lives and
where its lookups run change. While offloaded, `model.to(...)` leaves the table where it is. Token ids on
the GPU cost a wait: the host needs their values, so it waits for the work queued before them. Ids given on
the CPU (the trainer and `GraphedStep` keep them there) do not; their rows go to the model's device.
"""

from __future__ import annotations

import contextlib
import types

import torch
from torch import nn

_STATE = "_lowbit_offloaded"  # attribute on an offloaded embedding: its hook handles


def offloaded_activations(enabled: bool, device: torch.device):
    """While active, tensors saved for backward live in (pinned, on CUDA) CPU memory instead of the device's."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autograd.graph.save_on_cpu(pin_memory=device.type == "cuda")


def _input_embedding(model: nn.Module) -> nn.Module:
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if get is not None else None
    if not isinstance(embedding, nn.Module) or not isinstance(getattr(embedding, "weight", None), torch.Tensor):
        raise ValueError(f"{type(model).__name__} has no input embedding with a weight to offload "
                         "(expected a transformers model's get_input_embeddings())")  # fmt: skip
    return embedding


def _lookup_on_cpu(module: nn.Module, args: tuple):
    """Token ids already on the CPU send their rows to the model's device without waiting for the GPU; ids on
    a GPU must first come back, which waits for all the work queued before (a trainer keeps them on the CPU)."""
    ids = args[0]
    module._lowbit_target = module._lowbit_home if ids.device.type == "cpu" else ids.device
    return (ids.cpu(),) + tuple(args[1:])


def _rows_to_target(module: nn.Module, args: tuple, rows: torch.Tensor) -> torch.Tensor:
    """The rows on the ids' device, as a leaf: a hook that makes them require grad (transformers'
    `enable_input_require_grads`, for checkpointing) must not send their gradient back to the CPU, a
    synchronous device-to-host copy of (tokens × hidden) every step for a table that does not train."""
    target = module._lowbit_target
    # pinned rows copy asynchronously
    moved = rows.detach().pin_memory().to(target, non_blocking=True) if target.type == "cuda" else rows.detach().to(target)
    return moved.requires_grad_(rows.requires_grad and torch.is_grad_enabled())


def _stay(self, fn, recurse=True):
    """Replaces the instance's `_apply`: `model.to(...)` leaves the table where it is and only notes the
    model's new device, where the rows of ids given on the CPU go."""
    probe = torch.empty(0, device=self._lowbit_home)
    moved = fn(probe)
    if isinstance(moved, torch.Tensor) and moved.device != probe.device:
        self._lowbit_home = moved.device
    return self


def offload_embeddings(model: nn.Module) -> nn.Module:
    """Keep `model`'s frozen input embedding table in CPU memory; lookups run there, rows go to the ids' device.

    Raises ValueError when the table trains (its gradient would live on the CPU) or is tied to the output
    head (the head's matmul needs it on the GPU). Idempotent; returns the embedding module."""
    embedding = _input_embedding(model)
    if hasattr(embedding, _STATE):
        return embedding
    weight = embedding.weight
    if weight.requires_grad:
        raise ValueError("the input embedding trains (requires_grad): offloading is for a frozen table, as in "
                         "LoRA / QLoRA; freeze it or keep it on the GPU")  # fmt: skip
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is weight:
        raise ValueError("the input embedding is tied to the output head, which needs the table on the GPU for "
                         "its matmul: nothing to gain by offloading it")  # fmt: skip
    embedding._lowbit_home = weight.device
    weight.data = weight.data.to("cpu")
    handles = (embedding.register_forward_pre_hook(_lookup_on_cpu),
               embedding.register_forward_hook(_rows_to_target))  # fmt: skip
    setattr(embedding, _STATE, handles)
    embedding._apply = types.MethodType(_stay, embedding)
    return embedding


def restore_embeddings(model: nn.Module) -> None:
    """Undo `offload_embeddings`: the table goes back to the device it came from, lookups run there."""
    embedding = _input_embedding(model)
    handles = getattr(embedding, _STATE, None)
    if handles is None:
        return
    for handle in handles:
        handle.remove()
    del embedding._apply
    delattr(embedding, _STATE)
    embedding.__dict__.pop("_lowbit_target", None)
    embedding.weight.data = embedding.weight.data.to(embedding.__dict__.pop("_lowbit_home"))


def embeddings_offloaded(model: nn.Module) -> bool:
    get = getattr(model, "get_input_embeddings", None)
    return get is not None and hasattr(get(), _STATE)
