"""The training loop: causal-LM fine-tuning (SFT or plain LM) and sequence classification.

    examples, report = lowbit.train.build_examples(records, tokenizer, DataConfig(task="sft", max_length=512))
    result = lowbit.train.train(model, examples, TrainConfig(max_steps=300, lr=2e-4), eval_examples=val,
                                output_dir="run")

One optimizer step, read top to bottom in `train` and `train_step`:

1. the sampler hands out the next global batch (batch_size × grad_accum × processes examples, reshuffled
   every epoch from the seed, its position saved in checkpoints);
2. each micro-batch runs forward (under bf16/fp16 autocast if asked) and its *summed* token loss is
   divided by the number of loss tokens in the whole global batch, so gradient accumulation, padding
   and data parallelism all give the gradient of the same token-mean loss (mean of means would weight
   short examples more);
3. if the loss or the gradient norm is not finite the step is skipped (no update), a warning is
   printed, and after `max_bad_steps` skipped steps in a row training stops with `TrainingDiverged`;
   the last checkpoint, written before the trouble started, is left untouched;
4. gradients are clipped to `max_grad_norm`, the optimizer and the LR schedule step;
5. every `eval_every` steps the eval loss (and accuracy) is measured; early stopping watches it;
   every `save_every` steps an atomic checkpoint is written (checkpoint.py).

The causal-LM loss is cross-entropy of logits[t] against labels[t+1] over positions whose label is not
-100 (data.py puts -100 on prompt tokens and padding). Logits the model computes for virtual tokens
(prompt / P-tuning put them in front) are dropped before the loss.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from transformers.modeling_layers import GradientCheckpointingLayer

from lowbit.train import checkpoint as ckpt
from lowbit.train.data import IGNORE_INDEX, collate
from lowbit.train.distill import DistillConfig, distillation_loss
from lowbit.train.distributed import STRATEGIES, all_reduce_sum, loss_scale, rank_and_world, wrap_model
from lowbit.train.graphed import GraphedBackward
from lowbit.train.metrics import PLOT_NAME, MetricsLog, memory_mb, plot_loss_curve, read_metrics
from lowbit.train.offload import embeddings_offloaded, offload_embeddings, offloaded_activations, restore_embeddings
from lowbit.train.schedule import SCHEDULES, make_scheduler

CONFIG_VERSION = 1
GRAPH_WIDTH_MULTIPLE = 64  # cuda_graphs pads batch widths to a multiple of this: one graph per width
OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw", "paged_adamw8bit", "sgd")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class TrainConfig:
    """batch_size: examples per micro-batch per process; grad_accum: micro-batches per optimizer step.
    lr / schedule / warmup_steps / min_lr_ratio: peak learning rate and its schedule (schedule.py).
    optimizer: adamw | adamw8bit | paged_adamw | paged_adamw8bit | sgd; optimizer_block_size for 8-bit.
    max_grad_norm: clip the global gradient norm (None: no clipping, the norm is still logged).
    precision: fp32 | bf16 | fp16 autocast (fp16 adds a gradient scaler).
    gradient_checkpointing: recompute each block's activations in backward (transformers' non-reentrant
        checkpointing; works with LoRA/QLoRA and the prompt methods).
    checkpoint_layers: with gradient_checkpointing, recompute only the first N blocks (None: all). The others
        keep their activations: each block not recomputed saves one forward pass of it per step and costs its
        activations' memory (`lowbit memory` estimates both; bench/RESULTS.md has measured trade-offs).
        "auto": as few as `lowbit.evaluate.memory.plan_checkpoint_layers` estimates fit in memory_budget_gib
        (default: 90 % of the GPU's memory; required on the CPU), for a transformers causal LM.
    eval_every / eval_batches: evaluate every N steps (0: only at the end) on at most eval_batches batches.
    early_stopping_patience: stop after this many evaluations without a new best eval loss.
    save_every / keep_checkpoints: checkpoint every N steps (0: only at the end) into output_dir.
    max_bad_steps: stop after this many non-finite steps in a row.
    strategy: none | ddp | fsdp (used when torch.distributed is initialised with > 1 process).
    offload_activations: keep the tensors saved for backward in pinned CPU memory (with gradient
        checkpointing: the blocks' inputs), for sequences whose activations do not fit the GPU.
    offload_embeddings: keep the frozen input embedding table in CPU memory, looking up each batch's rows
        there (offload.py): 1 GiB less on the GPU for Llama-3-8B, for a 16 MiB copy per 2,048 tokens. Not
        for a trained or tied table, nor with several processes; put back when training ends.
    cuda_graphs: replay each micro-batch's forward and backward as a CUDA graph (graphed.GraphedBackward), one
        per padded batch shape (widths padded to a multiple of 64): an eager step of a quantized 8B model is
        bound by the host's kernel launches (bench/RESULTS.md). The optimizer step, clipping and the skip of
        non-finite steps stay eager. One process; not with fp16, distillation or offloaded activations; the
        gradients stay allocated between steps. On the CPU it runs eagerly.
    fused_kernels: swap in lowbit.kernels' fused RMSNorm, SwiGLU MLP, QLoRA linear and chunked cross-entropy
        (Llama / Qwen2 / Mistral; other modules stay as they are). Distillation and prompt tuning keep the
        logits-based loss. None (default): on when the model is on a CUDA device, where they measured 2×
        peft + bitsandbytes' QLoRA step at less memory (bench/RESULTS.md); the CPU keeps the plain modules.
    """

    max_steps: int = 100
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    optimizer: str = "adamw"
    optimizer_block_size: int = 2048
    schedule: str = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    max_grad_norm: float | None = 1.0
    precision: str = "fp32"
    gradient_checkpointing: bool = False
    checkpoint_layers: int | str | None = None
    memory_budget_gib: float | None = None
    eval_every: int = 0
    eval_batches: int | None = None
    eval_batch_size: int | None = None
    early_stopping_patience: int | None = None
    save_every: int = 0
    keep_checkpoints: int = 2
    seed: int = 0
    max_bad_steps: int = 5
    strategy: str = "none"
    fused_kernels: bool | None = None
    offload_activations: bool = False
    offload_embeddings: bool = False
    cuda_graphs: bool = False
    progress: bool = True
    plot: bool = True
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        if self.version != CONFIG_VERSION:
            raise ValueError(f"TrainConfig version {self.version} is not supported (this lowbit reads {CONFIG_VERSION})")
        for name in ("max_steps", "batch_size", "grad_accum", "max_bad_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("warmup_steps", "eval_every", "save_every", "keep_checkpoints"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be ≥ 0, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive finite number, got {self.lr}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {self.max_grad_norm}")
        choices = (("optimizer", OPTIMIZERS), ("schedule", SCHEDULES), ("precision", tuple(PRECISIONS)),
                   ("strategy", STRATEGIES))  # fmt: skip
        for name, allowed in choices:
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.checkpoint_layers is not None:
            if self.checkpoint_layers != "auto" and (isinstance(self.checkpoint_layers, bool)
                                                     or not isinstance(self.checkpoint_layers, int)):
                raise ValueError(f"checkpoint_layers must be an int ≥ 0, 'auto' or None, got {self.checkpoint_layers!r}")
            if not self.gradient_checkpointing or (self.checkpoint_layers != "auto" and self.checkpoint_layers < 0):
                raise ValueError(f"checkpoint_layers ({self.checkpoint_layers}) needs gradient_checkpointing=True "
                                 "and must be ≥ 0")  # fmt: skip
        if self.memory_budget_gib is not None and not (self.memory_budget_gib > 0 and self.checkpoint_layers == "auto"):
            raise ValueError(f"memory_budget_gib ({self.memory_budget_gib}) must be > 0 and goes with "
                             "checkpoint_layers='auto'")  # fmt: skip
        if self.fused_kernels not in (None, True, False):
            raise ValueError(f"fused_kernels must be None (auto), True or False, got {self.fused_kernels!r}")
        if self.cuda_graphs and (self.precision == "fp16" or self.offload_activations):
            raise ValueError("cuda_graphs does not take precision='fp16' (its loss scale changes on the host) nor "
                             "offload_activations (copies to the CPU in the middle of backward)")  # fmt: skip
        if self.early_stopping_patience is not None and self.early_stopping_patience < 1:
            raise ValueError(f"early_stopping_patience must be ≥ 1 or None, got {self.early_stopping_patience}")
        object.__setattr__(self, "betas", tuple(self.betas))


class TrainingDiverged(RuntimeError):
    """Raised after `max_bad_steps` non-finite steps in a row."""


@dataclass
class TrainResult:
    steps: int
    losses: list[float]  # per optimizer step (nan for skipped steps)
    evals: list[dict] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0
    stopped_early: bool = False
    output_dir: Path | None = None
    checkpoint: Path | None = None
    plot: Path | None = None

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


class EpochSampler:
    """Example indices in a fresh seeded permutation per epoch; its position is (epoch, offset)."""

    def __init__(self, n: int, seed: int, epoch: int = 0, offset: int = 0) -> None:
        self.n, self.seed, self.epoch, self.offset = n, seed, epoch, offset

    def _order(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def take(self, k: int) -> list[int]:
        out, order = [], self._order()
        while len(out) < k:
            if self.offset == self.n:
                self.epoch, self.offset, order = self.epoch + 1, 0, None
                order = self._order()
            step = min(k - len(out), self.n - self.offset)
            out += order[self.offset : self.offset + step]
            self.offset += step
        return out


# ---------------------------------------------------------------------------------------------- pieces
def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass


def build_optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    from lowbit.optim import AdamW8bit, PagedAdamW

    kw = dict(lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, foreach=False, **kw)
    if cfg.optimizer == "paged_adamw":
        return PagedAdamW(params, **kw)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return AdamW8bit(params, block_size=cfg.optimizer_block_size, paged=cfg.optimizer.startswith("paged"), **kw)


def enable_gradient_checkpointing(model: nn.Module, layers: int | None = None) -> int:
    """transformers' per-block activation checkpointing, non-reentrant: it needs no input that requires
    grad, so it works when every base weight is frozen (LoRA, QLoRA) and with prompt hooks.

    ``layers``: recompute only the first this many blocks (None: all); the rest keep their activations, which
    trades memory for the recomputation. Which blocks does not change the peak (every block's activations are
    alive at the start of backward). Returns the number of blocks checkpointed.
    """
    if not hasattr(model, "gradient_checkpointing_enable"):
        raise ValueError(f"{type(model).__name__} has no gradient_checkpointing_enable (not a transformers model)")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    blocks = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if layers is not None:
        if not blocks:
            raise ValueError(f"{type(model).__name__} has no per-block checkpointing flags to choose from")
        for i, block in enumerate(blocks):
            block.gradient_checkpointing = i < layers
    if getattr(model.config, "use_cache", False):
        model.config.use_cache = False  # a KV cache is useless in training and conflicts with checkpointing
    return sum(block.gradient_checkpointing for block in blocks)


def uses_fused_kernels(model: nn.Module, cfg: TrainConfig) -> bool:
    """`cfg.fused_kernels`, with None resolved: on for a model on a CUDA device."""
    return cfg.fused_kernels if cfg.fused_kernels is not None else _device(model).type == "cuda"


def plan_checkpointing(model: nn.Module, cfg: TrainConfig, seq_len: int) -> int:
    """`checkpoint_layers="auto"`: the fewest blocks to recompute for the estimated peak to fit the budget.

    The estimate (`lowbit.evaluate.memory`) is built from the model's config and what this run trains: QLoRA
    when the model holds QuantLinear layers, LoRA (its rank) when it holds LoRA layers, else full fine-tuning;
    the precision, optimizer, batch size and fused kernels of ``cfg``; the longest sequence of the data.
    """
    from lowbit.evaluate.memory import MemoryConfig, plan_checkpoint_layers
    from lowbit.nn.quant_linear import QuantLinear

    device = _device(model)
    if cfg.memory_budget_gib is not None:
        budget = int(cfg.memory_budget_gib * 2**30)
    elif device.type == "cuda":
        budget = int(0.9 * torch.cuda.get_device_properties(device).total_memory)
    else:
        raise ValueError("checkpoint_layers='auto' needs memory_budget_gib on the CPU (no device memory to read)")
    ranks = [p.shape[0] for m in model.modules() if isinstance(getattr(m, "lora_A", None), nn.ParameterDict)
             for p in m.lora_A.values()]  # fmt: skip
    method = "qlora" if any(isinstance(m, QuantLinear) for m in model.modules()) else ("lora" if ranks else "full")
    optimizer = {"adamw8bit": "adamw8bit", "paged_adamw8bit": "adamw8bit", "sgd": "sgd"}.get(cfg.optimizer, "adamw")
    memory = MemoryConfig(method=method, seq_len=seq_len, batch=cfg.batch_size, optimizer=optimizer,
                          precision=cfg.precision, lora_r=max(ranks, default=16),
                          fused_kernels=uses_fused_kernels(model, cfg), offload_embeddings=cfg.offload_embeddings,
                          optimizer_block_size=cfg.optimizer_block_size)  # fmt: skip
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "num_hidden_layers"):
        raise ValueError("checkpoint_layers='auto' needs a transformers model with a config; pass a number")
    layers, estimate = plan_checkpoint_layers(config, memory, budget)
    if cfg.progress and rank_and_world()[0] == 0:
        print(f"checkpoint_layers='auto': recomputing {layers} of {config.num_hidden_layers} blocks, estimated peak "
              f"{estimate.training_total / 2**30:.2f} GiB of a {budget / 2**30:.2f} GiB budget")  # fmt: skip
    return layers


def _pad_id(model: nn.Module, pad_token_id: int | None) -> int:
    if pad_token_id is not None:
        return pad_token_id
    config = getattr(model, "config", None)
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(config, name, None)
        value = value[0] if isinstance(value, list) else value
        if value is not None:
            return value
    raise ValueError("no pad token id: pass pad_token_id (e.g. tokenizer.pad_token_id)")


def _device(model: nn.Module) -> torch.device:
    """Where the model computes: its trained parameters' device (an offloaded embedding table is on the CPU)."""
    trained = next((p for p in model.parameters() if p.requires_grad), None)
    return (trained if trained is not None else next(model.parameters())).device


def loss_items(batch: dict) -> int:
    """How many terms the loss of this batch sums: shifted label tokens, or examples for classification."""
    labels = batch["labels"]
    return labels.numel() if labels.dim() == 1 else int((labels[:, 1:] != IGNORE_INDEX).sum())


def logits_and_labels(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Forward one batch; return fp32 logits aligned with their targets, the targets, and the inputs.

    Causal LM: logits (B, T-1, V) for targets labels[:, 1:] (logits[t] predicts token t+1); logits of
    virtual tokens that prompt methods put in front are dropped. Classification: (B, C) and (B,).
    """
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    config = getattr(getattr(model, "module", model), "config", None)  # DDP wraps the model in .module
    if getattr(config, "use_cache", None) is not None:
        # No KV cache in training: it costs memory, and with one transformers ignores the packed-sequence
        # position ids and lets packed examples attend to each other.
        inputs["use_cache"] = False
    logits, labels = model(**inputs).logits.float(), batch["labels"]
    if labels.dim() == 2:
        logits, labels = logits[:, -labels.shape[1] :][:, :-1], labels[:, 1:]
    return logits, labels, inputs


def batch_loss(model: nn.Module, batch: dict, teacher: nn.Module | None = None,
               distill: DistillConfig | None = None) -> torch.Tensor:  # fmt: skip
    """Summed cross-entropy (or distillation loss) of one batch; divide by `loss_items` for the mean.

    A causal LM whose loss `fuse_for_training` fused computes it inside its forward from the hidden states
    (chunked cross-entropy, no (tokens, vocab) fp32 logits), unless prompt tuning's virtual tokens lengthen
    its input.
    """
    from lowbit.kernels.fuse import has_fused_loss
    from lowbit.peft.prompt_tuning import VIRTUAL_TOKENS_ATTR

    inner = getattr(model, "module", model)  # DDP wraps the model in .module
    lengthened = hasattr(inner, VIRTUAL_TOKENS_ATTR)
    if teacher is None and batch["labels"].dim() == 2 and has_fused_loss(inner) and not lengthened:
        # num_items_in_batch=1: the sum over predicted tokens (ignore_index excluded), as below
        return model(**batch, use_cache=False, num_items_in_batch=1).loss
    logits, labels, inputs = logits_and_labels(model, batch)
    if teacher is None:
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction="sum")  # fmt: skip
    with torch.no_grad():
        t_logits, _, _ = logits_and_labels(teacher, batch)
    return distillation_loss(logits, t_logits, labels, distill or DistillConfig(), reduction="sum")


def _autocast(device: torch.device, precision: str, cache: bool = True):
    """``cache=False`` for a CUDA graph: autocast's cache of cast weights would outlive the capture."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype, cache_enabled=cache)


def train_step(module: nn.Module, micro_batches: list[dict], n_items: int, optimizer, cfg: TrainConfig,
               scaler=None, teacher=None, distill=None, graphed=None) -> tuple[float, float | None]:  # fmt: skip
    """Forward/backward over the micro-batches (``graphed``: a GraphedBackward replays them), clip, update.
    Returns (loss, grad_norm); grad_norm is None when the step was skipped because the loss or the gradients
    were not finite."""
    device = _device(module)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    keep_grads = graphed is not None  # its graphs write into the .grad tensors they were captured with
    optimizer.zero_grad(set_to_none=not keep_grads)
    total = torch.zeros((), dtype=torch.float64, device=device)
    # an offloaded table looks token ids up on the CPU: moving them to the GPU would make it wait to read them back
    on_cpu = {"input_ids"} if teacher is None and embeddings_offloaded(getattr(module, "module", module)) else set()
    for i, batch in enumerate(micro_batches):
        if graphed is not None and "attention_mask" in batch and bool(batch["attention_mask"].all()):
            batch = {k: v for k, v in batch.items() if k != "attention_mask"}  # then SDPA's causal kernel runs
        batch = {k: v if k in on_cpu else v.to(device) for k, v in batch.items()}
        if graphed is not None:
            total += graphed(batch, loss_scale() / n_items).double()
            continue
        last = i == len(micro_batches) - 1
        sync = module.no_sync() if hasattr(module, "no_sync") and not last else contextlib.nullcontext()
        with sync:
            with _autocast(device, cfg.precision), offloaded_activations(cfg.offload_activations, device):
                loss_sum = batch_loss(module, batch, teacher, distill)
            scaled = loss_sum * (loss_scale() / n_items)  # token mean over the global batch
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        total += loss_sum.detach().double()
    loss = float(all_reduce_sum(total)) / n_items
    if not math.isfinite(loss):
        optimizer.zero_grad(set_to_none=not keep_grads)
        return loss, None
    if scaler is not None:
        scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or float("inf"))
    if not torch.isfinite(norm):
        optimizer.zero_grad(set_to_none=not keep_grads)
        if scaler is not None:
            scaler.update()  # lets fp16 lower its scale after an overflow
        return loss, None
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return loss, float(norm)


@torch.no_grad()
def evaluate(module: nn.Module, examples: Sequence[dict], batch_size: int, pad_token_id: int,
             max_batches: int | None = None, precision: str = "fp32") -> dict:  # fmt: skip
    """Token-mean eval loss (and accuracy for classification) over `examples`, in eval mode."""
    was_training = module.training
    module.eval()
    device, loss_sum, items, correct = _device(module), 0.0, 0, 0
    n_batches = math.ceil(len(examples) / batch_size)
    for b in range(min(n_batches, max_batches or n_batches)):
        batch = collate(examples[b * batch_size : (b + 1) * batch_size], pad_token_id)
        with _autocast(device, precision):
            logits, labels, _ = logits_and_labels(module, {k: v.to(device) for k, v in batch.items()})
        loss_sum += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                          ignore_index=IGNORE_INDEX, reduction="sum"))  # fmt: skip
        items += loss_items(batch)
        if labels.dim() == 1:
            correct += int((logits.argmax(-1) == labels).sum())
    module.train(was_training)
    result = {"eval_loss": loss_sum / max(items, 1), "eval_items": items}
    if "label" in examples[0]:
        result["eval_accuracy"] = correct / max(items, 1)
    return result


# ---------------------------------------------------------------------------------------------- the loop
def _micro_batches(sampler: EpochSampler, examples: Sequence[dict], cfg: TrainConfig, pad: int) -> tuple[list, int]:
    """This process's micro-batches of the next global batch, and the global batch's token count.

    Micro-step a of rank r takes slice (a·world + r) of the global batch, so with one process and
    grad_accum = world the same examples meet in the same step.
    """
    rank, world = rank_and_world()
    b = cfg.batch_size
    indices = sampler.take(b * cfg.grad_accum * world)
    slices = [indices[(a * world + rank) * b : (a * world + rank + 1) * b] for a in range(cfg.grad_accum)]
    tokens = sum(len(examples[i]["input_ids"]) for i in indices)  # every process sees the whole list
    multiple = GRAPH_WIDTH_MULTIPLE if cfg.cuda_graphs else 1  # few shapes, few graphs to capture
    return [collate([examples[i] for i in s], pad, multiple) for s in slices], tokens


def _initial_state() -> dict:
    return {"step": 0, "epoch": 0, "offset": 0, "bad_streak": 0, "best_eval": float("inf"),
            "evals_since_best": 0, "tokens": 0, "seconds": 0.0}  # fmt: skip


def _resume_path(resume, output_dir: Path | None) -> Path | None:
    """resume: None/False (start fresh), True/"auto" (the newest checkpoint in output_dir, if any), or a path."""
    if resume in (None, False):
        return None
    if resume in (True, "auto"):
        if output_dir is None:
            raise ValueError("resume='auto' needs output_dir")
        return ckpt.latest_checkpoint(output_dir)
    return Path(resume)


def _skip_warning(step: int, loss: float, state: dict, cfg: TrainConfig, output_dir: Path | None) -> None:
    """Warn about a skipped (non-finite) step; raise TrainingDiverged after max_bad_steps in a row."""
    warnings.warn(f"step {step}: non-finite loss or gradient (loss={loss}); step skipped, weights unchanged "
                  f"({state['bad_streak']}/{cfg.max_bad_steps} in a row)", RuntimeWarning, stacklevel=3)  # fmt: skip
    if state["bad_streak"] >= cfg.max_bad_steps:
        last = ckpt.latest_checkpoint(output_dir) if output_dir is not None else None
        where = f"the last good checkpoint is {last}" if last else "no checkpoint was written"
        raise TrainingDiverged(f"training diverged: {state['bad_streak']} steps in a row (up to step {step}) had a "
                               f"non-finite loss or gradient; {where}. Lower the learning rate, enable gradient "
                               "clipping, or train in fp32/bf16 instead of fp16.")  # fmt: skip


def _maybe_evaluate(module, eval_examples, cfg: TrainConfig, pad: int, state: dict, final: bool) -> dict | None:
    """Evaluate when due (every eval_every steps, and at the end); update the early-stopping counters."""
    due = final or (cfg.eval_every and state["step"] % cfg.eval_every == 0)
    if not eval_examples or not due or state.get("last_eval_step") == state["step"]:
        return None
    result = evaluate(module, eval_examples, cfg.eval_batch_size or cfg.batch_size, pad, cfg.eval_batches,
                      cfg.precision)  # fmt: skip
    state["last_eval_step"] = state["step"]
    if result["eval_loss"] < state["best_eval"]:
        state["best_eval"], state["evals_since_best"] = result["eval_loss"], 0
    else:
        state["evals_since_best"] += 1
    return {"step": state["step"], **result}


def _save(model, optimizer, scheduler, scaler, state: dict, cfg: TrainConfig, output_dir: Path) -> Path:
    trainer_state = dict(state, scaler=scaler.state_dict() if scaler is not None else {})
    return ckpt.save_checkpoint(output_dir, state["step"], model, optimizer, scheduler, trainer_state,
                                config=asdict(cfg), keep=cfg.keep_checkpoints)  # fmt: skip


def train(model: nn.Module, train_examples: Sequence[dict], config: TrainConfig | None = None, *,
          eval_examples: Sequence[dict] | None = None, pad_token_id: int | None = None, output_dir=None,
          resume=None, teacher: nn.Module | None = None, distill: DistillConfig | None = None) -> TrainResult:  # fmt: skip
    """Train the parameters of `model` that require grad on tokenized examples (data.build_examples).

    output_dir: where metrics.jsonl, checkpoints and loss_curve.png go (None: nothing is written).
    resume: None (fresh), "auto" (newest checkpoint in output_dir if there is one) or a checkpoint path.
    teacher / distill: distil from a teacher model (distill.py) instead of the plain cross-entropy.
    """
    cfg = config or TrainConfig()
    if not train_examples:
        raise ValueError("no training examples")
    if cfg.gradient_checkpointing:
        layers = cfg.checkpoint_layers
        if layers == "auto":
            layers = plan_checkpointing(model, cfg, max(len(e["input_ids"]) for e in train_examples))
        enable_gradient_checkpointing(model, layers)
    loss_fused_here = False  # the chunked loss returns logits=None with labels: undone after training
    if uses_fused_kernels(model, cfg):
        from lowbit.kernels import fuse_for_training
        from lowbit.kernels.fuse import has_fused_loss

        was_fused = has_fused_loss(model)
        counts = fuse_for_training(model)
        loss_fused_here = has_fused_loss(model) and not was_fused
        if cfg.progress and rank_and_world()[0] == 0:
            print("fused kernels: " + ", ".join(f"{n} {what}" for what, n in counts.items() if n))
        if cfg.fused_kernels and not any(counts.values()):
            warnings.warn(f"fused_kernels=True but {type(model).__name__} has no module the fused kernels replace "
                          "(they cover Llama / Qwen2 / Mistral layouts and QLoRA linears)", stacklevel=2)  # fmt: skip
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("the model has no trainable parameters: apply a PEFT method (lowbit.peft) first")
    rank, world = rank_and_world()
    embeddings_here = cfg.offload_embeddings and not embeddings_offloaded(model)
    if cfg.offload_embeddings:
        if world > 1:  # DDP / FSDP broadcast and shard parameters on the processes' devices
            raise ValueError("offload_embeddings runs in a single process; with several, keep the table on the GPU")
        offload_embeddings(model)
    if cfg.strategy == "fsdp" and world > 1 and cfg.optimizer.endswith("8bit"):
        # Their blockwise-quantized states are plain tensors; FSDP2 hands the optimizer DTensor shards.
        raise ValueError(f"optimizer {cfg.optimizer!r} does not run on FSDP-sharded parameters; use adamw, "
                         "paged_adamw or sgd (FSDP already splits Adam's states across the processes), or "
                         "strategy 'ddp'")  # fmt: skip
    pad, out = _pad_id(model, pad_token_id), Path(output_dir) if output_dir is not None else None
    seed_everything(cfg.seed)
    module = wrap_model(model, cfg.strategy)
    optimizer = build_optimizer([p for p in module.parameters() if p.requires_grad], cfg)
    graphed = _graphed_backward(module, cfg, teacher) if cfg.cuda_graphs else None
    scheduler = make_scheduler(optimizer, cfg.max_steps, cfg.warmup_steps, cfg.schedule, cfg.min_lr_ratio)
    scaler = torch.amp.GradScaler(_device(model).type) if cfg.precision == "fp16" else None
    state, resume_from = _initial_state(), _resume_path(resume, out)
    if resume_from is not None:
        state = ckpt.load_checkpoint(resume_from, model, optimizer, scheduler)
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        state.pop("scaler", None)
    log = MetricsLog(out, None if resume_from is None else state["step"]) if out and rank == 0 else None
    if teacher is not None:
        teacher.eval()
    module.train()
    try:
        result = _loop(module, model, train_examples, eval_examples, cfg, pad, state, optimizer, scheduler,
                       scaler, log, out, teacher, distill, graphed)  # fmt: skip
    finally:
        if log is not None:
            log.close()
        if loss_fused_here:  # the fused modules compute what they replaced; the loss-only forward does not
            from lowbit.kernels.fuse import unfuse_loss

            unfuse_loss(model)
        if embeddings_here:
            restore_embeddings(model)
    module.eval()
    if out is not None and rank == 0 and cfg.plot:
        result.plot = plot_loss_curve(read_metrics(out), out / PLOT_NAME)
    return result


def _graphed_backward(module: nn.Module, cfg: TrainConfig, teacher) -> GraphedBackward:
    """The micro-batches' forward and backward as CUDA graphs (TrainConfig.cuda_graphs), with the gradients they
    accumulate into allocated once, here."""
    if rank_and_world()[1] > 1 or teacher is not None:
        raise ValueError("cuda_graphs runs one process without a teacher: DDP's gradient hooks and a teacher's "
                         "forward are not captured")  # fmt: skip
    device = _device(module)
    if device.type != "cuda":
        warnings.warn("cuda_graphs: the model is not on a CUDA device, so its steps run eagerly", stacklevel=3)
    for p in module.parameters():
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)
    return GraphedBackward(module, batch_loss, autocast=lambda: _autocast(device, cfg.precision, cache=False))


def _loop(module, model, examples, eval_examples, cfg, pad, state, optimizer, scheduler, scaler, log, out,
          teacher, distill, graphed=None) -> TrainResult:  # fmt: skip
    rank, _ = rank_and_world()
    sampler = EpochSampler(len(examples), cfg.seed, state["epoch"], state["offset"])
    result = TrainResult(steps=state["step"], losses=[], output_dir=out)
    bar = tqdm(total=cfg.max_steps, initial=state["step"], desc="train", disable=not cfg.progress or rank != 0)
    while state["step"] < cfg.max_steps:
        start = time.perf_counter()
        micro, tokens = _micro_batches(sampler, examples, cfg, pad)
        n_items = sum(loss_items(b) for b in micro)
        if rank_and_world()[1] > 1:  # (one process: no round trip through the device, which waits for its queue)
            n_items = int(all_reduce_sum(torch.tensor(n_items, device=_device(model))))
        lr = scheduler.get_last_lr()[0]
        loss, norm = train_step(module, micro, max(n_items, 1), optimizer, cfg, scaler, teacher, distill, graphed)
        scheduler.step()
        state["step"] += 1
        state["epoch"], state["offset"] = sampler.epoch, sampler.offset
        seconds = time.perf_counter() - start
        state["tokens"], state["seconds"] = state["tokens"] + tokens, state["seconds"] + seconds
        state["bad_streak"] = 0 if norm is not None else state["bad_streak"] + 1
        record = {"step": state["step"], "loss": loss if math.isfinite(loss) else None, "lr": lr, "grad_norm": norm,
                  "tokens": state["tokens"], "tokens_per_s": tokens / seconds,
                  "memory_mb": round(memory_mb(_device(model)), 1)}  # fmt: skip
        result.losses.append(loss)
        if log is not None:
            log.write(record)
        if norm is None:
            _skip_warning(state["step"], loss, state, cfg, out)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens / seconds:.0f}",
                        mem=f"{record['memory_mb']:.0f}MiB")  # fmt: skip
        final = state["step"] == cfg.max_steps
        evaluation = _maybe_evaluate(module, eval_examples, cfg, pad, state, final)
        if evaluation is not None:
            result.evals.append(evaluation)
            if log is not None:
                log.write(evaluation)
            bar.write(f"step {state['step']}: eval loss {evaluation['eval_loss']:.4f}")
            patience = cfg.early_stopping_patience
            if patience and state["evals_since_best"] >= patience:
                result.stopped_early, final = True, True
                bar.write(f"early stopping: no better eval loss in {patience} evaluations")
        due = final or (cfg.save_every and state["step"] % cfg.save_every == 0)
        if out is not None and state["bad_streak"] == 0 and due:  # every process: FSDP shards are gathered
            result.checkpoint = _save(model, optimizer, scheduler, scaler, state, cfg, out)
        if result.stopped_early:
            break
    bar.close()
    result.steps, result.tokens, result.seconds = state["step"], state["tokens"], state["seconds"]
    return result
