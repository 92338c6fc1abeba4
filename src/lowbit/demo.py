"""The main job on the packaged default model, end to end on a CPU in a few minutes.

Load SmolLM2-135M-Instruct, measure it in fp32 (weight memory, perplexity on real text, a chat answer),
quantize it to NF4 with double quantization, measure the same again and print both side by side.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from lowbit.evaluate import perplexity, reference_text
from lowbit.io.loading import load_model
from lowbit.nn.quant_linear import QuantLinear
from lowbit.quantize import QuantConfig, quantize

DEFAULT_PROMPT = "What is the capital of France, and why is it famous? Answer in two sentences."


@dataclass(frozen=True)
class DemoConfig:
    model: str = "smollm2-135m"
    format: str = "nf4"
    block_size: int = 64
    double_quant: bool = True
    context_length: int = 512
    windows: int = 16  # fixed windows of real text, non-overlapping, so runs are comparable
    prompt: str = DEFAULT_PROMPT
    max_new_tokens: int = 40
    finetune_steps: int = 20  # QLoRA steps on the shipped instruction data at the end (0: skip)


def linear_weight_bytes(model: nn.Module) -> int:
    """Bytes held by the weights of linear layers (dense or quantized), the part quantization shrinks."""
    total = 0
    for module in model.modules():
        if isinstance(module, QuantLinear):
            total += module.weight_nbytes()
        elif isinstance(module, nn.Linear):
            total += module.weight.numel() * module.weight.element_size()
    return total


def model_bytes(model: nn.Module) -> int:
    """All parameter and buffer bytes, each tensor counted once (tied embeddings are shared)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def chat_answer(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """Greedy answer to one user turn, through the tokenizer's chat template."""
    messages = [{"role": "user", "content": prompt}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id)  # fmt: skip
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def measure(model, tokenizer, text: str, cfg: DemoConfig, label: str) -> dict:
    print(f"\n[{label}] perplexity on {cfg.windows} windows × {cfg.context_length} tokens of real text …")
    start = time.perf_counter()
    ppl = perplexity(model, tokenizer, text, context_length=cfg.context_length, stride=cfg.context_length,
                     max_windows=cfg.windows, show_progress=True)  # fmt: skip
    ppl_s = time.perf_counter() - start
    start = time.perf_counter()
    answer = chat_answer(model, tokenizer, cfg.prompt, cfg.max_new_tokens)
    gen_s = time.perf_counter() - start
    print(f"[{label}] perplexity {ppl:.3f} ({ppl_s:.1f} s); answer ({gen_s:.1f} s): {answer}")
    return {"ppl": ppl, "answer": answer, "linear_bytes": linear_weight_bytes(model), "bytes": model_bytes(model)}


def run_demo(cfg: DemoConfig | None = None) -> dict:
    cfg = cfg or DemoConfig()
    torch.manual_seed(0)
    start = time.perf_counter()
    model, tokenizer = load_model(cfg.model)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"loaded {cfg.model}: {n_params / 1e6:.1f}M parameters in {time.perf_counter() - start:.1f} s")
    text = reference_text()
    print(f"text: Python's reference topics (pydoc_data), {len(text):,} characters of English prose")
    before = measure(model, tokenizer, text, cfg, "fp32")

    qcfg = QuantConfig(format=cfg.format, block_size=cfg.block_size, double_quant=cfg.double_quant)
    report = quantize(model, qcfg, progress=True)
    print(f"\n{report}")
    after = measure(model, tokenizer, text, cfg, cfg.format + ("+DQ" if cfg.double_quant else ""))

    mib = 2**20
    rows = [
        ("linear weights", f"{before['linear_bytes'] / mib:.1f} MiB", f"{after['linear_bytes'] / mib:.1f} MiB"),
        ("whole model", f"{before['bytes'] / mib:.1f} MiB", f"{after['bytes'] / mib:.1f} MiB"),
        ("bits / linear weight", "32.000", f"{report.bits_per_parameter:.3f}"),
        ("perplexity", f"{before['ppl']:.3f}", f"{after['ppl']:.3f} ({after['ppl'] / before['ppl'] - 1:+.1%})"),
    ]
    print(f"\n{'':22}{'fp32':>14}{qcfg.format + ' (+DQ)' if qcfg.double_quant else qcfg.format:>24}")
    for name, a, b in rows:
        print(f"{name:22}{a:>14}{b:>24}")
    print("(embeddings and the tied lm_head stay fp32; perplexity is token-level over non-overlapping windows)")
    tuned = finetune_step(model, tokenizer, cfg) if cfg.finetune_steps else None
    return {"fp32": before, "quantized": after, "report": report, "finetune": tuned}


FINETUNE_PROMPT = 'What does the word "harbor" mean?'  # not in the training data


def finetune_step(model, tokenizer, cfg: DemoConfig) -> dict:
    """QLoRA on the quantized model: LoRA r=16 on every linear layer, a few packed steps of the shipped
    instruction data (WordNet definitions + Debian FAQ), validation loss and an answer before and after."""
    from lowbit.peft import LoraConfig, apply_lora
    from lowbit.train import DataConfig, TrainConfig, build_examples, evaluate, pack_examples, read_records, train
    from lowbit.train.finetune import chat_answers, shipped_data

    print(f"\n[QLoRA] {cfg.finetune_steps} fine-tuning steps on data/instruct (real Q&A: WordNet, Debian FAQ) …")
    apply_lora(model, LoraConfig(r=16, alpha=32, dropout=0.05))
    data = DataConfig(max_length=128)  # short rows keep the demo to about a minute on a laptop CPU

    def packed(name: str) -> list[dict]:
        return pack_examples(build_examples(read_records(shipped_data(name)), tokenizer, data)[0], 128)

    train_ex, val_ex = packed("instruct/train.jsonl"), packed("instruct/validation.jsonl")[:8]
    pad = tokenizer.pad_token_id
    before = evaluate(model, val_ex, 4, pad)["eval_loss"]
    answer_before = chat_answers(model, tokenizer, (FINETUNE_PROMPT,), cfg.max_new_tokens)[0]
    tcfg = TrainConfig(max_steps=cfg.finetune_steps, batch_size=2, lr=3e-4, warmup_steps=3,
                       optimizer="paged_adamw8bit")  # fmt: skip
    result = train(model, train_ex, tcfg, pad_token_id=pad)
    after = evaluate(model, val_ex, 4, pad)["eval_loss"]
    answer_after = chat_answers(model, tokenizer, (FINETUNE_PROMPT,), cfg.max_new_tokens)[0]
    print(f"[QLoRA] validation loss {before:.3f} → {after:.3f}; {result.tokens_per_second:.0f} tokens/s")
    print(f"[QLoRA] {FINETUNE_PROMPT}\n  before: {answer_before}\n  after:  {answer_after}")
    return {"eval_before": before, "eval_after": after, "answer_before": answer_before, "answer_after": answer_after}
