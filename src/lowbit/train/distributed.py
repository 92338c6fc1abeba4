"""Data-parallel training through torch.distributed: DDP and FSDP2, on CPU (gloo) or GPUs (NCCL).

    torchrun --nproc-per-node 2 -m lowbit.train MODEL --data train.jsonl --strategy ddp ...

Every process holds the model and reads its own slice of each global batch (the trainer's sampler deals
the global batch out by rank), so N processes with per-process batch b compute exactly the gradient of
one process with batch N·b: the trainer divides each process's summed loss by the token count of the
*global* batch, and DDP averages gradients over ranks, hence the factor N in `loss_scale`.

- DDP (`torch.nn.parallel.DistributedDataParallel`): full replica per process; gradients of the
  trainable parameters are all-reduced during backward. Frozen (and 4-bit) base weights are
  communicated once, when DDP broadcasts rank 0's module state at construction, never per step.
- FSDP2 (`torch.distributed.fsdp.fully_shard`, PyTorch ≥ 2.6): every transformer block and then the
  root are sharded; each process stores 1/N of every parameter and gathers a block's weights just
  before using them. Frozen parameters are sharded like trainable ones. FSDP2 shards parameters but
  replicates buffers, so a QuantLinear's storage (packed 4-bit codes, absmax, nested absmax, offset),
  normally buffers, is first re-registered as frozen parameters (`QuantLinear.storage_as_parameters`):
  each process then keeps ~1/N of the 4-bit base too. The storage tensors are flat (or row-major) and
  only decoded after FSDP2's all-gather has put the exact original bytes back together, so a shard
  boundary inside a quantization block is harmless. Read the whole model inside `with unsharded(model):`
  (every process must enter it: it all-gathers). Checkpoints gather the trainable shards and their
  optimizer state, and rank 0 writes them (checkpoint.py). The 8-bit optimizers keep plain-tensor
  states and are refused under FSDP (the trainer says so before the first step).

Before wrapping, `check_consistent` compares across processes what must be identical (quantization
format, block size, double quant, storage dtypes and shapes, codebook, parameter names / shapes /
dtypes / requires_grad) and stops every process with one message naming the first difference: a rank
with another layout would otherwise all-gather garbage, or hang, or train on with a loss of 0 or NaN.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
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
    check_consistent(model)
    device = next(model.parameters()).device
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        # broadcast_buffers=False: DDP would otherwise re-broadcast every buffer from rank 0 before each
        # forward, i.e. a QuantLinear's whole 4-bit storage every step. The buffers are equal from the
        # start (DDP broadcasts the module state once at construction) and nothing in a language model
        # updates them in forward (no BatchNorm statistics).
        return DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        raise RuntimeError("FSDP2 needs torch ≥ 2.6 (torch.distributed.fsdp.fully_shard)") from None
    from torch.distributed.device_mesh import init_device_mesh

    from lowbit.nn.quant_linear import QuantLinear

    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.storage_as_parameters()  # sharded like any parameter, not replicated like a buffer
    # No MixedPrecisionPolicy here: its param_dtype would cast float storage (fp32 absmax) on all-gather.
    mesh = init_device_mesh(device.type, (world,))
    for block in _blocks(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A parameter's full value: gathers an FSDP2 shard (a DTensor; collective), else `t` itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def is_sharded(t: torch.Tensor) -> bool:
    """True for an FSDP2 shard (a DTensor)."""
    return hasattr(t, "full_tensor")


@contextlib.contextmanager
def unsharded(model: nn.Module):
    """Inside, every parameter of an FSDP2-sharded `model` is its full plain tensor (all-gathered), so code
    that reads parameters as attributes (`save_adapter`, `dequantize`, a forward) sees the whole model; on
    exit the shards are back and the gathered memory is freed. Collective: every process enters. Without
    FSDP it does nothing.

    Not for `state_dict()`: FSDP2 turns it back into shards. A full state dict is
    `torch.distributed.checkpoint.state_dict.get_model_state_dict(model,
    options=StateDictOptions(full_state_dict=True))`; a QLoRA base never changes, so `save_quantized` it
    before wrapping."""
    from torch.distributed.fsdp import FSDPModule

    fsdp = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in fsdp:
        m.unshard()
    try:
        yield model
    finally:
        for m in fsdp:
            m.reshard()


# ------------------------------------------------------------------------------ cross-rank consistency
class LayoutMismatch(RuntimeError):
    """Processes of one distributed run hold models of different layouts (raised on every process)."""


def layout_records(model: nn.Module) -> list[tuple[str, str, str]]:
    """(module name, field, value) of everything the processes of one run must agree on: each QuantLinear's
    format (name, block size, double quant, group size, symmetric), compute dtype and codebook values, and
    every parameter's and buffer's shape, dtype, requires_grad and kind (parameter or buffer)."""
    from lowbit.formats.codebooks import get_codebook
    from lowbit.nn.quant_linear import QuantLinear

    records = []
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            records += [(name, f"format.{k}", repr(v)) for k, v in module.fmt.to_dict().items()]
            records.append((name, "compute_dtype", str(module.compute_dtype)))
            if module.fmt.is_codebook:  # the values themselves: another lowbit version could change them
                records.append((name, "codebook", repr(get_codebook(module.fmt.name).tolist())))
        for kind, tensors in (("parameter", module.named_parameters(recurse=False)),
                              ("buffer", module.named_buffers(recurse=False))):  # fmt: skip
            for t_name, t in tensors:
                records += [(name, f"{t_name}.kind", kind), (name, f"{t_name}.dtype", str(t.dtype)),
                            (name, f"{t_name}.shape", str(tuple(t.shape))),
                            (name, f"{t_name}.requires_grad", str(t.requires_grad))]  # fmt: skip
    return records


def first_difference(a: list[tuple], b: list[tuple], names: tuple[str, str] = ("a", "b")) -> str | None:
    """Where two `layout_records` lists first differ, in words ("module M, F: 64 on a, 32 on b"); None if equal."""
    for x, y in zip(a, b):
        if x != y:
            if x[:2] == y[:2]:
                return f"module {x[0] or '<root>'!r}, {x[1]}: {x[2]} on {names[0]}, {y[2]} on {names[1]}"
            return (f"module {x[0] or '<root>'!r}, {x[1]} on {names[0]} where {names[1]} has "
                    f"module {y[0] or '<root>'!r}, {y[1]}")  # fmt: skip
    if len(a) != len(b):
        extra, owner = (a[len(b)], names[0]) if len(a) > len(b) else (b[len(a)], names[1])
        return f"module {extra[0] or '<root>'!r}, {extra[1]} exists only on {owner}"
    return None


def check_consistent(model: nn.Module) -> None:
    """Raise `LayoutMismatch` on every process unless all processes hold the same model layout.

    One small all_gather of a SHA-256 of `layout_records`; only when the digests differ are the records
    themselves gathered to name the first differing module and field (rank r against rank 0).
    """
    _, world = rank_and_world()
    if world == 1:
        return
    records = layout_records(model)
    digest = hashlib.sha256(json.dumps(records).encode()).hexdigest()
    digests = [None] * world
    dist.all_gather_object(digests, digest)
    if len(set(digests)) == 1:
        return
    everyone = [None] * world
    dist.all_gather_object(everyone, records)
    rank = next(r for r in range(world) if digests[r] != digests[0])
    where = first_difference([tuple(x) for x in everyone[0]], [tuple(x) for x in everyone[rank]],
                             ("rank 0", f"rank {rank}"))  # fmt: skip
    raise LayoutMismatch(f"the processes hold different models: {where}. Every process must load, quantize and "
                         "adapt the model identically; stopping all of them before training.")
