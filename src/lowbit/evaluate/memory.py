"""How much memory fine-tuning (or serving) a model takes, before running it.

    est = estimate_memory(config, MemoryConfig(method="qlora", seq_len=512, batch=4, optimizer="adamw8bit"))
    print(est.to_markdown())

Training peak = what stays resident (weights, quantization constants, optimizer states) + the larger of
two moments of the backward pass: its start (the layers' saved activations, the loss transient and, in
full fine-tuning, the output head's gradient) and its end (every gradient). Summing all terms instead
overstates the peak by 15-55 %: activations are freed as gradients appear (bench/RESULTS.md compares
both against `torch.cuda.max_memory_allocated` on an H100).

- weights: every parameter in the model's dtype (`precision`); with QLoRA the linear layers (all but the
  output head) are NF4: half a byte per weight plus the block constants (double-quantized: 1 byte per
  block of 64 and 4 bytes per 256 blocks), plus fp32 LoRA matrices r·(in + out) per adapted layer;
  without the input embedding table when it is offloaded to the CPU (`offload_embeddings`).
- gradients: one value per trainable parameter, in the parameter's dtype.
- optimizer states: AdamW keeps two moments in the parameter's dtype (torch's AdamW: 8 B/param for
  fp32, 4 for bf16 weights); 8-bit blockwise AdamW 2 B/param plus two fp32 scales per block of 2048
  (tensors under 4096 values stay fp32); SGD without momentum nothing.
- activations: what autograd keeps for the backward pass. Per decoder layer and token (hidden h,
  intermediate i, key/value width k): the norm inputs and outputs, q, k, v and the attention output,
  the MLP's gate, up, activation and product — about 6·h + 2·k + 4·i values, plus r per LoRA-adapted
  layer; the loss keeps the log-softmax of the logits, V per token. Attention is assumed to be fused
  (SDPA/flash: no T×T matrix is kept). With gradient checkpointing only each layer's input (h per token)
  is kept, plus one layer's activations while it is recomputed.
- with `fused_kernels` (`lowbit.kernels.fuse_for_training`): the fused RMSNorm, SwiGLU and QLoRA linear
  keep 2·i + 7·h + 2·k values per layer and token (SwiGLU keeps gate and up; with QLoRA the down projection
  recomputes their product instead of keeping it, otherwise add i; with frozen norms, LoRA and QLoRA,
  5·h: each norm keeps its output, which the projections after it keep anyway, instead of its input), and the chunked cross-entropy keeps
  2·h (the final hidden states and their gradient, computed in the forward) instead of V; its transient is
  one chunk of logits (`kernels.cross_entropy.default_chunk_size` rows × V).
- loss transient: at the start of backward three fp32 (tokens × V) tensors live at once (the saved
  log-softmax and the gradients of its output and input); with a large vocabulary this is the peak's
  biggest single term. (The saved log-softmax is also in `activations`, what autograd keeps; the peak
  counts it once.)

The seeds' rule of thumb is `rule_of_thumb(n)`: 4 bytes per fp32 parameter to store it (1B → 4 GB), and
for full training with Adam 4 (weights) + 4 (gradients) + 8 (two moments) + ~8 (activations, a high
estimate) = 24 bytes per parameter — the "4 + 20 extra bytes" of the seed article. Note that 24 B/param
is 24 GB for 1B parameters; the same article's "80 GB" is its other shortcut, "training needs about 20×
the memory of storing", which does not follow from its per-parameter table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import nn

CONFIG_VERSION = 1
METHODS = ("full", "lora", "qlora")
OPTIMIZER_BYTES = ("adamw", "adamw8bit", "sgd")
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
HEAD_NAMES = ("lm_head", "score", "classifier")


@dataclass(frozen=True)
class MemoryConfig:
    """method: full | lora | qlora; precision: fp32 | bf16 | fp16 (the model's weights — with qlora the
    layers that stay unquantized — and its activations); optimizer: adamw | adamw8bit | sgd (paged
    variants need the same bytes, on the CPU)."""

    method: str = "qlora"
    seq_len: int = 512
    batch: int = 1
    optimizer: str = "adamw"
    precision: str = "fp32"
    lora_r: int = 16
    gradient_checkpointing: bool = False
    checkpoint_layers: int | None = None  # with checkpointing: only the first N blocks (None: all)
    fused_kernels: bool = False  # lowbit.kernels.fuse_for_training (fused norms, SwiGLU, QLoRA linear, loss)
    offload_embeddings: bool = False  # the input embedding table in CPU memory (untied, not full training)
    quant_block_size: int = 64
    double_quant: bool = True
    optimizer_block_size: int = 2048
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        if self.version != CONFIG_VERSION:
            raise ValueError(f"MemoryConfig version {self.version} is not supported")
        for name, allowed in (("method", METHODS), ("optimizer", OPTIMIZER_BYTES), ("precision", tuple(DTYPE_BYTES))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.checkpoint_layers is not None and (isinstance(self.checkpoint_layers, bool) or not
                                                   isinstance(self.checkpoint_layers, int) or self.checkpoint_layers < 0):
            raise ValueError(f"checkpoint_layers must be an int ≥ 0 or None, got {self.checkpoint_layers!r}")
        for name in ("seq_len", "batch", "lora_r", "quant_block_size", "optimizer_block_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int
    quant_constants: int
    gradients: int
    optimizer_states: int
    activations: int
    activations_no_checkpointing: int
    activations_checkpointing: int
    loss_transient: int  # fp32 logits-sized tensors alive at the start of backward
    kv_cache: int  # inference: keys and values for batch × seq_len tokens
    trainable_parameters: int
    parameters: int
    backward_start: int  # layers' saved activations + loss transient (+ the head's gradient, full fine-tuning)

    @property
    def backward_end(self) -> int:
        return self.gradients

    @property
    def training_total(self) -> int:
        resident = self.weights + self.quant_constants + self.optimizer_states
        return resident + max(self.backward_start, self.backward_end)

    @property
    def inference_total(self) -> int:
        return self.weights + self.quant_constants + self.kv_cache

    def to_markdown(self) -> str:
        gib = lambda b: f"{b / 2**30:8.3f} GiB"  # noqa: E731
        rows = [("weights", self.weights), ("quantization constants", self.quant_constants),
                ("gradients", self.gradients), ("optimizer states", self.optimizer_states),
                ("activations (as configured)", self.activations),
                ("  without checkpointing", self.activations_no_checkpointing),
                ("  with checkpointing", self.activations_checkpointing),
                ("loss (logits gradients, transient)", self.loss_transient),
                ("start of backward (activations + loss + head gradient)", self.backward_start),
                ("**training peak** (resident + max(start, end of backward))", self.training_total),
                ("KV cache (inference)", self.kv_cache),
                ("**inference**", self.inference_total)]  # fmt: skip
        lines = ["| part | memory |", "|---|---:|"] + [f"| {n} | {gib(b)} |" for n, b in rows]
        lines.append(f"\n{self.parameters / 1e6:.1f}M parameters, {self.trainable_parameters / 1e6:.2f}M trainable")
        return "\n".join(lines)


def rule_of_thumb(n_params: float) -> dict[str, float]:
    """The seed article's arithmetic for a model of n fp32 parameters, in bytes."""
    return {"store_fp32": 4 * n_params, "train_adam_per_param_table": (4 + 4 + 8 + 8) * n_params,
            "train_20x_storage": 20 * 4 * n_params}  # fmt: skip


def _linears(model: nn.Module) -> list[tuple[str, int, int]]:
    """(name, in, out) of every linear layer that LoRA / quantization would touch (not the output head)."""
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [(n, m.in_features, m.out_features) for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and m is not out_emb and n.rsplit(".", 1)[-1] not in HEAD_NAMES]  # fmt: skip


def nf4_bytes(n: int, block: int, double_quant: bool) -> tuple[int, int]:
    """(packed codes, constants) bytes of n weights in blockwise 4-bit (QLoRA storage)."""
    blocks = math.ceil(n / block)
    constants = blocks + 4 * math.ceil(blocks / 256) + 4 if double_quant else 4 * blocks
    return (n + 1) // 2, constants


def _optimizer_bytes(shapes: list[int], cfg: MemoryConfig, param_bytes: int) -> int:
    if cfg.optimizer == "sgd":
        return 0
    if cfg.optimizer == "adamw":
        return 2 * param_bytes * sum(shapes)
    total = 0
    for n in shapes:
        total += 2 * n + 8 * math.ceil(n / cfg.optimizer_block_size) if n >= 4096 else 8 * n
    return total


def _layer_sizes(config) -> tuple[int, int, int, int, int]:
    h = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    inter = getattr(config, "intermediate_size", None) or 4 * h
    return h, inter, kv * head_dim, config.num_hidden_layers, config.vocab_size


def activation_bytes(config, cfg: MemoryConfig, n_lora_per_layer: int, checkpointing: bool) -> int:
    """Bytes autograd keeps for backward (see the module docstring for what is counted)."""
    h, inter, kv, layers, vocab = _layer_sizes(config)
    tokens = cfg.batch * cfg.seq_len
    act = DTYPE_BYTES[cfg.precision]
    if cfg.fused_kernels:
        # a frozen norm (LoRA, QLoRA) keeps its output, which the projections after it keep anyway
        norms_frozen = cfg.method in ("lora", "qlora")
        values = (5 if norms_frozen else 7) * h + 2 * kv + (2 if cfg.method == "qlora" else 3) * inter
        logits = 2 * h * tokens * act  # the chunked loss: the final hidden states and their gradient
    else:
        values = 6 * h + 2 * kv + 4 * inter
        logits = vocab * tokens * 4  # the fp32 log-softmax that cross-entropy keeps
    per_layer = (values + cfg.lora_r * n_lora_per_layer) * tokens * act
    if not checkpointing:
        return layers * per_layer + logits
    recomputed = layers if cfg.checkpoint_layers is None else min(cfg.checkpoint_layers, layers)
    # a recomputed block keeps only its input, plus, during its backward, its own activations once more
    return recomputed * h * tokens * act + (layers - recomputed + (recomputed > 0)) * per_layer + logits


def estimate_memory(model_or_config, cfg: MemoryConfig | None = None) -> MemoryEstimate:
    """Predict training and inference memory for a transformers model (or its config) under `cfg`."""
    cfg = cfg or MemoryConfig()
    model = model_or_config if isinstance(model_or_config, nn.Module) else _meta_model(model_or_config)
    config = model.config
    n_params = sum(p.numel() for p in model.parameters())
    linears = _linears(model)
    wbytes = DTYPE_BYTES[cfg.precision]
    weights, constants, trainable = n_params * wbytes, 0, []
    if cfg.method == "full":
        trainable = [p.numel() for p in model.parameters()]
    else:
        trainable = [x for _, i, o in linears for x in (cfg.lora_r * i, cfg.lora_r * o)]
        weights += 4 * sum(trainable)  # LoRA matrices in fp32
    if cfg.method == "qlora":
        for _, i, o in linears:
            codes, consts = nf4_bytes(i * o, cfg.quant_block_size, cfg.double_quant)
            weights += codes - wbytes * i * o
            constants += consts
    grads = sum(trainable) * (wbytes if cfg.method == "full" else 4)
    if cfg.offload_embeddings:
        if cfg.method == "full" or getattr(config, "tie_word_embeddings", False):
            raise ValueError("offload_embeddings is for a frozen input embedding that is not tied to the head")
        weights -= model.get_input_embeddings().weight.numel() * wbytes
    n_lora = 0 if cfg.method == "full" else len(linears) // config.num_hidden_layers
    act_plain = activation_bytes(config, cfg, n_lora, checkpointing=False)
    act_ckpt = activation_bytes(config, cfg, n_lora, checkpointing=True)
    h, _, kv, layers, _ = _layer_sizes(config)
    kv_cache = 2 * layers * kv * cfg.batch * cfg.seq_len * DTYPE_BYTES[cfg.precision]
    tokens = cfg.batch * cfg.seq_len
    if cfg.fused_kernels:  # one chunk of logits at a time
        from lowbit.kernels.cross_entropy import default_chunk_size

        act = DTYPE_BYTES[cfg.precision]
        loss_transient = default_chunk_size(tokens, config.vocab_size, act) * config.vocab_size * act
        saved_log_softmax = 0
    else:
        loss_transient = 3 * config.vocab_size * tokens * 4
        saved_log_softmax = config.vocab_size * tokens * 4  # in both activations and the transient
    activations = act_ckpt if cfg.gradient_checkpointing else act_plain
    head_grad = config.vocab_size * h * wbytes if cfg.method == "full" else 0  # the first gradient backward makes
    optimizer = _optimizer_bytes(trainable, cfg, wbytes if cfg.method == "full" else 4)
    return MemoryEstimate(weights, constants, grads, optimizer, activations, act_plain, act_ckpt, loss_transient,
                          kv_cache, sum(trainable), n_params,
                          activations - saved_log_softmax + loss_transient + head_grad)  # fmt: skip


def plan_checkpoint_layers(model_or_config, cfg: MemoryConfig, budget_bytes: int) -> tuple[int, MemoryEstimate]:
    """The fewest blocks to recompute so that the estimated training peak fits in ``budget_bytes``.

    Every recomputed block costs one more forward pass of it per step, so the plan keeps as many blocks'
    activations as fit: returns (k, its estimate), k = 0 when no block needs recomputing (`checkpoint_layers`
    = k, with gradient checkpointing). Raises ValueError when recomputing every block does not fit either.
    """
    model = model_or_config if isinstance(model_or_config, nn.Module) else _meta_model(model_or_config)
    layers = model.config.num_hidden_layers
    estimate = None
    for k in range(layers + 1):  # not monotone at k = 1 (a recomputed block's transient), so every k is tried
        estimate = estimate_memory(model, replace(cfg, gradient_checkpointing=True, checkpoint_layers=k))
        if estimate.training_total <= budget_bytes:
            return k, estimate
    raise ValueError(f"the estimated training peak is {estimate.training_total / 2**30:.2f} GiB even with all "
                     f"{layers} blocks recomputed, over the budget of {budget_bytes / 2**30:.2f} GiB: shorten the "
                     "sequences or the batch, or use fused kernels, an 8-bit optimizer or activation offload")


def _meta_model(config) -> nn.Module:
    """The model's module tree without any memory (meta tensors), for counting parameters."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def load_config(name_or_path):
    """A transformers config for a packaged model name, a model directory or a config.json path."""
    from pathlib import Path

    from transformers import AutoConfig

    from lowbit.io.loading import CACHE_SUBDIR, PACKAGED_NAMES, default_cache_dir, load_model

    if isinstance(name_or_path, str) and name_or_path.strip().lower() in PACKAGED_NAMES:
        cached = default_cache_dir() / CACHE_SUBDIR
        return AutoConfig.from_pretrained(cached) if (cached / "config.json").is_file() else load_model(name_or_path)[0].config
    path = Path(name_or_path)
    if path.is_file() and path.suffix == ".json":
        return AutoConfig.from_pretrained(path.parent) if path.name == "config.json" else _config_from_json(path)
    if path.is_dir():
        return AutoConfig.from_pretrained(path, local_files_only=True)
    raise FileNotFoundError(f"cannot read a model config from {str(name_or_path)!r}")


def _config_from_json(path):
    import json

    from transformers import AutoConfig

    data = json.loads(path.read_text())
    return AutoConfig.for_model(data.pop("model_type"), **data)


def measure_training_peak(model: nn.Module, cfg: MemoryConfig, steps: int = 2) -> int:
    """Peak memory of real training steps under `cfg` on the model's device, in bytes — what
    `estimate_memory` predicts. CUDA: `torch.cuda.max_memory_allocated` (weights included); CPU: the rise of
    peak RSS over the process's peak before the call (a lower bound if the process peaked earlier).
    The model is changed in place (quantized / adapted per `cfg.method`); random token ids are the data."""
    import resource

    from lowbit.peft import LoraConfig, apply_full_finetuning, apply_lora
    from lowbit.quantize import QuantConfig, quantize
    from lowbit.train.trainer import TrainConfig, batch_loss, build_optimizer, enable_gradient_checkpointing

    device = next(model.parameters()).device
    if cfg.method != "qlora" and cfg.precision != "fp32":
        model.to({"bf16": torch.bfloat16, "fp16": torch.float16}[cfg.precision])  # weights in the precision
    if cfg.method == "qlora":
        quantize(model, QuantConfig(format="nf4", block_size=cfg.quant_block_size, double_quant=cfg.double_quant))
    if cfg.method == "full":
        apply_full_finetuning(model)
    else:
        apply_lora(model, LoraConfig(r=cfg.lora_r, alpha=cfg.lora_r))
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model, cfg.checkpoint_layers)
    if cfg.fused_kernels:
        from lowbit.kernels import fuse_for_training

        fuse_for_training(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(params, TrainConfig(optimizer=cfg.optimizer, optimizer_block_size=cfg.optimizer_block_size))
    ids = torch.randint(0, model.config.vocab_size, (cfg.batch, cfg.seq_len), device=device)
    autocast = None  # full / lora run in the weights' dtype; qlora computes in its compute dtype
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model.train()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        if autocast is not None:
            with autocast:
                loss = batch_loss(model, {"input_ids": ids, "labels": ids})
        else:
            loss = batch_loss(model, {"input_ids": ids, "labels": ids})
        loss.backward()
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
