"""`lowbit finetune`: load a model, (quantize it,) put on an adapter, train on a data file, save the adapter.

    result = run_finetune(FinetuneConfig(model="smollm2-135m", data="data/instruct/train.jsonl",
                                         eval_data="data/instruct/validation.jsonl", method="qlora",
                                         train=TrainConfig(max_steps=300), out="smollm2-qlora"))

method: "lora" (LoRA on the fp32/bf16 model), "qlora" (NF4 + double quantization base, LoRA on top — QLoRA,
Dettmers et al. 2023) or "full" (every weight trains; the baseline). For classification the model gets a
sequence-classification head (initialised randomly) that trains alongside the adapter (modules_to_save).
The adapter lands in `out/adapter` in HF peft's layout; checkpoints, metrics.jsonl and loss_curve.png in `out`.
"""

from __future__ import annotations

import copy
import json
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from lowbit.train.data import DataConfig, build_examples, pack_examples, read_records
from lowbit.train.trainer import TrainConfig, evaluate, seed_everything, train

CONFIG_VERSION = 1
METHODS = ("lora", "qlora", "full")
HEAD_NAMES = ("score", "classifier")


@dataclass(frozen=True)
class FinetuneConfig:
    model: str = "smollm2-135m"
    data: str = ""
    eval_data: str | None = None
    data_config: DataConfig = field(default_factory=DataConfig)
    packing: bool = False
    method: str = "qlora"
    r: int = 16
    alpha: float = 32
    dropout: float = 0.05
    target_modules: str | tuple[str, ...] = "all-linear"
    quant_format: str = "nf4"
    train: TrainConfig = field(default_factory=TrainConfig)
    out: str = "finetune-out"
    resume: bool = False
    prompts: tuple[str, ...] = ()  # generated before and after training, to see the change
    max_new_tokens: int = 48
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        if self.version != CONFIG_VERSION:
            raise ValueError(f"FinetuneConfig version {self.version} is not supported")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if not self.data:
            raise ValueError("data (a training file) is required")
        if self.packing and self.data_config.task == "classification":
            raise ValueError("packing applies to sft and lm data, not classification")


def shipped_data(name: str) -> Path:
    """A file of the datasets shipped in the repository's data/ directory (see data/README.md), e.g.
    "instruct/train.jsonl". They live beside the source tree, so an editable install or a checkout has them."""
    path = Path(__file__).resolve().parents[3] / "data" / name
    if not path.is_file():
        raise FileNotFoundError(f"shipped dataset {name!r} not found at {path}; it comes with the lowbit "
                                "repository (data/), not with a wheel")  # fmt: skip
    return path


def load_for_task(name: str, task: str, labels: tuple[str, ...] | None):
    """(model, tokenizer): the causal LM, or for classification the same backbone with a new head.

    A causal LM may come already quantized (a `lowbit quantize` directory or a bitsandbytes 4-bit checkpoint):
    QLoRA then trains on those stored 4-bit weights instead of quantizing again."""
    from transformers import AutoModelForSequenceClassification

    from lowbit.io.auto import checkpoint_kind, load_any
    from lowbit.io.loading import load_model

    if task != "classification":
        return load_any(name)
    if checkpoint_kind(name) in ("lowbit", "bnb-4bit"):
        raise ValueError(f"{name} is quantized; classification builds a new head on a full-precision model")
    model, tokenizer = load_model(name)
    if not labels:
        raise ValueError("classification needs the label names (DataConfig.labels / --labels)")
    config = model.config
    config.num_labels, config.id2label = len(labels), dict(enumerate(labels))
    config.label2id = {v: k for k, v in config.id2label.items()}
    config.pad_token_id = config.pad_token_id if config.pad_token_id is not None else tokenizer.pad_token_id
    classifier = AutoModelForSequenceClassification.from_config(config)
    prefix = classifier.base_model_prefix
    getattr(classifier, prefix).load_state_dict(getattr(model, prefix).state_dict())
    return classifier.eval(), tokenizer


def apply_method(model: nn.Module, cfg: FinetuneConfig) -> nn.Module:
    from lowbit.peft import LoraConfig, apply_full_finetuning, apply_lora
    from lowbit.quantize import QuantConfig, quantize

    quantized = getattr(model, "lowbit_quant_config", None) is not None  # loaded from a quantized checkpoint
    if cfg.method == "full":
        if quantized:
            raise ValueError("full fine-tuning needs full-precision weights, the model is quantized; use qlora")
        return apply_full_finetuning(model)
    if cfg.method == "qlora" and not quantized:
        quantize(model, QuantConfig(format=cfg.quant_format, block_size=64, double_quant=True))
    heads = tuple(n for n in HEAD_NAMES if isinstance(getattr(model, n, None), nn.Module))
    lora = LoraConfig(r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout, target_modules=cfg.target_modules,
                      modules_to_save=heads or None)  # fmt: skip
    return apply_lora(model, lora)


def chat_answers(model, tokenizer, prompts: tuple[str, ...], max_new_tokens: int) -> list[str]:
    """Greedy answers of the model with its adapter folded in (`merge_lora` on a copy): a dense fp32 model
    computes the same function as base + adapter but decodes without dequantizing 4-bit weights per token."""
    from lowbit.peft import merge_lora

    if not prompts:
        return []
    dense = copy.deepcopy(model)
    if getattr(dense, "lowbit_adapters", None):
        merge_lora(dense)
    return [chat_answer(dense, tokenizer, p, max_new_tokens) for p in prompts]


def chat_answer(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """Greedy answer to one user turn through the chat template."""
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)  # fmt: skip
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)  # fmt: skip
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def _examples(path, tokenizer, cfg: FinetuneConfig, what: str):
    examples, report = build_examples(read_records(path), tokenizer, cfg.data_config)
    print(f"{what} data {path}: {report}")
    if cfg.packing:
        examples = pack_examples(examples, cfg.data_config.max_length)
        print(f"packed into {len(examples)} rows of ≤ {cfg.data_config.max_length} tokens")
    return examples


def _save_adapter(model: nn.Module, path: Path) -> Path:
    """Rank 0 writes the adapter (one writer per file); under FSDP every process first gathers the sharded
    LoRA weights (`unsharded` is collective)."""
    from lowbit.peft import save_adapter
    from lowbit.train.distributed import is_main_process, unsharded

    with unsharded(model):
        if is_main_process():
            save_adapter(model, path)
    return path


def _answers_after(model, tokenizer, cfg: FinetuneConfig) -> list[str]:
    """`chat_answers` after training; an FSDP-sharded model cannot be copied and merged, so every process
    generates through the sharded model in lockstep (same prompt, greedy: the same all-gathers)."""
    from lowbit.train.distributed import rank_and_world

    if cfg.train.strategy == "fsdp" and rank_and_world()[1] > 1:
        return [chat_answer(model, tokenizer, p, cfg.max_new_tokens) for p in cfg.prompts]
    return chat_answers(model, tokenizer, cfg.prompts, cfg.max_new_tokens)


def run_finetune(cfg: FinetuneConfig) -> dict:
    """The whole job; returns (and writes to out/finetune.json) what was measured. With several processes
    (torchrun) every process runs it and rank 0 writes the files."""
    from lowbit.train.distributed import is_main_process

    start = time.perf_counter()
    dc = cfg.data_config
    model, tokenizer = load_for_task(cfg.model, dc.task, dc.labels)
    # Seeded adapter initialisation: reproducible, and the same in every process (FSDP2, unlike DDP, does
    # not broadcast rank 0's weights: each process keeps its own slice of its own initialisation).
    seed_everything(cfg.train.seed)
    model = apply_method(model, cfg)
    train_ex = _examples(cfg.data, tokenizer, cfg, "train")
    eval_ex = _examples(cfg.eval_data, tokenizer, cfg, "eval") if cfg.eval_data else None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    summary = {"config": {**asdict(cfg)}, "trainable_parameters": sum(p.numel() for p in model.parameters()
                                                                     if p.requires_grad)}  # fmt: skip
    bs = cfg.train.eval_batch_size or cfg.train.batch_size
    if eval_ex:
        summary["eval_before"] = evaluate(model, eval_ex, bs, pad, cfg.train.eval_batches, cfg.train.precision)
        print(f"eval loss before training: {summary['eval_before']['eval_loss']:.4f}")
    if dc.task != "classification":
        summary["answers_before"] = chat_answers(model, tokenizer, cfg.prompts, cfg.max_new_tokens)
    result = train(model, train_ex, cfg.train, eval_examples=eval_ex, pad_token_id=pad, output_dir=cfg.out,
                   resume="auto" if cfg.resume else None)  # fmt: skip
    summary |= {"steps": result.steps, "train_seconds": round(result.seconds, 1), "tokens": result.tokens,
                "tokens_per_s": round(result.tokens_per_second, 1), "stopped_early": result.stopped_early,
                "final_train_loss": result.losses[-1] if result.losses else None,
                "eval_after": result.evals[-1] if result.evals else None}  # fmt: skip
    if dc.task != "classification":
        summary["answers_after"] = _answers_after(model, tokenizer, cfg)
    if cfg.method != "full":
        summary["adapter"] = str(_save_adapter(model, Path(cfg.out) / "adapter"))
    summary["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    summary["total_seconds"] = round(time.perf_counter() - start, 1)
    if is_main_process():
        Path(cfg.out, "finetune.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary
