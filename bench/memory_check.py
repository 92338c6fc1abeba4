"""Memory estimator vs the real CUDA peak (issue 5): predicted vs `torch.cuda.max_memory_allocated`, 3 configs.

For each training config: (1) `lowbit.evaluate.memory.estimate_memory` — the function `lowbit memory` prints —
predicts the peak training memory from the model config; (2) the same Llama-shaped random model is built on
the GPU (`qlora_step.build_model`: random bf16 weights) and `lowbit.evaluate.memory.measure_training_peak`
runs 3 real training steps with lowbit's own machinery (lowbit.quantize NF4 + double quant, lowbit.peft
LoRA / full fine-tuning, transformers gradient checkpointing, lowbit's `build_optimizer` and `batch_loss`).
The measured peak is `torch.cuda.max_memory_allocated` over the training steps, counted from zero: weights,
quantization constants and LoRA matrices resident at the start are included (what the estimator predicts);
the setup transient (the bf16 weights before quantization) is not, as the estimator does not predict it.

Configs (`lowbit memory` equivalents; the shapes are not packaged, so the script gives the estimator the
transformers config object directly):
  full   — full fine-tune, Llama-3.2-1B shape (16 blocks, hidden 2048, MLP 8192, 32/8 heads, vocab 128256,
           tied), bf16 weights, torch AdamW, seq 1024 × batch 2, no checkpointing
  lora   — LoRA r=16 on every block linear, bf16 base, Llama-3-8B shape with 8 blocks, seq 2048 × batch 1,
           gradient checkpointing, AdamW
  qlora  — QLoRA NF4 + double quant (block 64), r=16, same shape and settings as lora

    python3 bench/memory_check.py --out $OUT                           # on a GPU (the device tool)
    OMP_NUM_THREADS=1 .venv/bin/python bench/memory_check.py --smoke   # CPU: tiny shapes, predicted only

Prints a markdown table (config, predicted GiB, measured GiB, predicted/measured, within 15%) and each
config's estimator breakdown; --out DIR writes memory_check.json and memory_check.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "src"), str(Path(__file__).resolve().parent)]

from qlora_step import LLAMA3_8B, TINY, build_model  # noqa: E402

from lowbit.evaluate.memory import MemoryConfig, estimate_memory, measure_training_peak  # noqa: E402

LLAMA32_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_attention_heads=32,
                  num_key_value_heads=8, rope_theta=500000.0, max_position_embeddings=131072,
                  tie_word_embeddings=True)  # fmt: skip
TOLERANCE = 0.15
STEPS = 3
GIB = 2**30

# name → (shape, blocks, MemoryConfig fields); the smoke run keeps the methods and shrinks the shapes
CONFIGS = {
    "full": (LLAMA32_1B, 16, dict(method="full", precision="bf16", optimizer="adamw", seq_len=1024, batch=2)),
    "lora": (LLAMA3_8B, 8, dict(method="lora", precision="bf16", optimizer="adamw", lora_r=16, seq_len=2048,
                                batch=1, gradient_checkpointing=True)),  # fmt: skip
    "qlora": (LLAMA3_8B, 8, dict(method="qlora", precision="bf16", optimizer="adamw", lora_r=16, quant_block_size=64,
                                 double_quant=True, seq_len=2048, batch=1, gradient_checkpointing=True)),  # fmt: skip
}
# the fused training path (lowbit.kernels.fuse_for_training): every block recomputed, none, and 24 of 32
CONFIGS["qlora-fused"] = (LLAMA3_8B, 8, dict(CONFIGS["qlora"][2], fused_kernels=True))
CONFIGS["qlora-fused-nockpt"] = (LLAMA3_8B, 8, dict(CONFIGS["qlora"][2], fused_kernels=True,
                                                    gradient_checkpointing=False))  # fmt: skip
CONFIGS["qlora-fused-32@24"] = (LLAMA3_8B, 32, dict(CONFIGS["qlora"][2], fused_kernels=True, checkpoint_layers=24))
SMOKE_SHAPE = dict(TINY, tie_word_embeddings=False)


def log(*a):
    print(*a, flush=True)


def describe(name: str, shape: dict, layers: int, cfg: MemoryConfig) -> str:
    extra = f" r={cfg.lora_r}" if cfg.method != "full" else ""
    extra += " NF4+DQ" if cfg.method == "qlora" else ""
    extra += " fused" if cfg.fused_kernels else ""
    if cfg.gradient_checkpointing:
        extra += " ckpt" if cfg.checkpoint_layers is None else f" ckpt {cfg.checkpoint_layers}"
    return (f"{name}: {cfg.method}{extra} {cfg.precision} {cfg.optimizer}, {layers}×h{shape['hidden_size']} "
            f"V{shape['vocab_size']}, seq {cfg.seq_len}×{cfg.batch}")  # fmt: skip


def free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def check(name: str, shape: dict, layers: int, cfg: MemoryConfig, device: str) -> dict:
    """Predict, then build and train for STEPS steps; measured bytes only on CUDA."""
    free(device)
    base = torch.cuda.memory_allocated() if device == "cuda" else 0
    start = time.perf_counter()
    model = build_model(shape, layers, device)
    est = estimate_memory(model.config, cfg)  # what `lowbit memory` computes, from this exact config
    built = torch.cuda.memory_allocated() - base if device == "cuda" else None
    peak = measure_training_peak(model, cfg, steps=STEPS)  # mutates the model (quantize / LoRA)
    measured = peak - base if device == "cuda" else None
    del model
    free(device)
    row = {"config": describe(name, shape, layers, cfg), "name": name, "layers": layers, "shape": shape,
           "memory_config": dataclasses.asdict(cfg), "predicted_bytes": est.training_total,
           "measured_bytes": measured, "built_model_bytes": built, "baseline_bytes": base,
           "seconds": round(time.perf_counter() - start, 1),
           "breakdown": dict(dataclasses.asdict(est), training_total=est.training_total),
           "breakdown_markdown": est.to_markdown()}  # fmt: skip
    if measured is not None:
        row["ratio"] = est.training_total / measured
        row["within_15pct"] = abs(row["ratio"] - 1) <= TOLERANCE
    return row


def table(rows: list[dict]) -> str:
    lines = ["| config | predicted GiB | measured GiB | predicted ÷ measured | within 15% |", "|---|---:|---:|---:|---|"]
    for r in rows:
        measured = "n/a (CPU)" if r["measured_bytes"] is None else f"{r['measured_bytes'] / GIB:.3f}"
        ratio = "-" if r["measured_bytes"] is None else f"{r['ratio']:.3f}"
        within = "-" if r["measured_bytes"] is None else ("yes" if r["within_15pct"] else "no")
        lines.append(f"| {r['config']} | {r['predicted_bytes'] / GIB:.3f} | {measured} | {ratio} | {within} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: predicted only")
    parser.add_argument("--out", type=Path, help="write memory_check.json and memory_check.md here")
    parser.add_argument("--configs", default="full,lora,qlora", help="comma-separated subset of " + ",".join(CONFIGS))
    args = parser.parse_args()
    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU, or pass --smoke")
    import transformers

    env = {"device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
           "torch": torch.__version__, "transformers": transformers.__version__, "steps": STEPS,
           "command": " ".join(["python3", "bench/memory_check.py", *sys.argv[1:]])}  # fmt: skip
    log(f"{env['device']}, torch {env['torch']}, transformers {env['transformers']}")
    rows = []
    for name in args.configs.split(","):
        shape, layers, fields = CONFIGS[name]
        if args.smoke:
            shape, layers, fields = SMOKE_SHAPE, 2, dict(fields, seq_len=64, batch=2)
        cfg = MemoryConfig(**fields)
        log(f"{describe(name, shape, layers, cfg)} …")
        row = check(name, shape, layers, cfg, device)
        measured = "n/a (CPU)" if row["measured_bytes"] is None else f"{row['measured_bytes'] / GIB:.3f} GiB"
        log(f"  predicted {row['predicted_bytes'] / GIB:.3f} GiB, measured {measured}, {row['seconds']} s")
        rows.append(row)
    md = [f"{env['device']}, torch {env['torch']}, transformers {env['transformers']}; `{env['command']}`", "",
          table(rows)]  # fmt: skip
    if args.smoke:
        md += ["", "Smoke run on the CPU: tiny shapes, the training steps run but there is no CUDA allocator "
               "peak to compare with, so only the prediction is shown."]  # fmt: skip
    for r in rows:
        md += ["", f"### {r['config']}", "", r["breakdown_markdown"]]
    text = "\n".join(md)
    log("\n" + text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "memory_check.json").write_text(json.dumps({"env": env, "rows": rows}, indent=1))
        (args.out / "memory_check.md").write_text(text + "\n")
        log(f"wrote {args.out / 'memory_check.json'} and memory_check.md")


if __name__ == "__main__":
    main()
