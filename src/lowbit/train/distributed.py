"""Data-parallel training through torch.distributed: DDP and FSDP2, on CPU (gloo) or GPUs (NCCL).

    torchrun --nproc-per-node 2 -m lowbit.train MODEL --data train.jsonl --strategy ddp ...

Every process holds the model and reads its own slice of each global batch (the trainer's sampler deals
the global batch out by rank), so N processes with per-process batch b compute exactly the gradient of
one process with batch N·b: the trainer divides each process's summed loss by the token count of the
*global* batch, and DDP averages gradients over ranks, hence the factor N in `loss_scale`.

- DDP (`torch.nn.parallel.DistributedDataParallel`): full replica per process; gradients of the
  trainable parameters are all-reduced during backward. Frozen (and 4-bit) base weights are never
  communicated.
- FSDP2 (`torch.distributed.fsdp.fully_shard`, PyTorch ≥ 2.6): every transformer block and then the
  root are sharded; each process stores 1/N of every parameter and gathers a block's weights just
  before using them. Frozen parameters are sharded like trainable ones. QuantLinear's packed 4-bit
  storage is made of buffers, which FSDP2 does not shard: a quantized base is replicated (it is the
  small part: ~0.5 bytes per weight), the LoRA parameters are sharded.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

STRATEGIES = ("none", "ddp", "fsdp")


def rank_and_world() -> tuple[int, int]:
    """(rank, world size); (0, 1) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    return rank_and_world()[0] == 0


def init_from_env(backend: str | None = None, timeout_s: float = 300.0) -> tuple[int, int]:
    """Join the process group torchrun describes in the environment (RANK, WORLD_SIZE, MASTER_ADDR, …).

    Backend: NCCL when CUDA is available, gloo otherwise. Each GPU process uses the GPU of its LOCAL_RANK.
    Returns (rank, world size); (0, 1) without a torchrun environment.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return rank_and_world()


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of `x` over all processes (x itself with one process)."""
    if rank_and_world()[1] > 1:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def loss_scale() -> int:
    """Gradient multiplier that undoes DDP's/FSDP's averaging over ranks (see the module docstring)."""
    return rank_and_world()[1]


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks: the largest nn.ModuleList in the model (model.layers, encoder.layer…)."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()), default=[])


def wrap_model(model: nn.Module, strategy: str) -> nn.Module:
    """The module the training loop calls: `model` itself ("none" or one process), a DDP wrapper, or
    `model` sharded in place by FSDP2. Checkpoints and adapters are always read from `model`."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    _, world = rank_and_world()
    if strategy == "none" or world == 1:
        return model
    device = next(model.parameters()).device
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        raise RuntimeError("FSDP2 needs torch ≥ 2.6 (torch.distributed.fsdp.fully_shard)") from None
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (world,))
    for block in _blocks(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A parameter's full value: gathers an FSDP2 shard (a DTensor; collective), else `t` itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t
