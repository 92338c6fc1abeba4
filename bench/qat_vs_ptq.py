"""QAT vs PTQ on SmolLM2-135M (CPU): does training through the int4 rounding beat rounding afterwards?

Four models, perplexity on the same fixed windows of lowbit's reference text:
  fp32            the packaged model
  ptq             round-to-nearest int4 of the packaged model (per output channel, symmetric)
  finetune+ptq    the packaged model fine-tuned fp32 for --steps steps, then the same RTN (the control:
                  how much of QAT's gain is only the fine-tune on this kind of text)
  qat             the packaged model fine-tuned --steps steps through fake int4 (straight-through
                  estimator), then converted to real int4 storage (`convert_qat`)
Training text is the reference text's second half (the calibration half), cut into 256-token windows;
perplexity is over windows from its start, never trained on.

    python bench/qat_vs_ptq.py --steps 60         # ~30 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

import lowbit
from lowbit.evaluate import perplexity, reference_text
from lowbit.train import DataConfig, TrainConfig, build_examples, train
from lowbit.train.qat import QATConfig, apply_qat, convert_qat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--windows", type=int, default=4, help="perplexity windows of 512 tokens")
    parser.add_argument("--group-size", type=int, default=None, help="int4 group size (default: per channel)")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = lowbit.load_model("smollm2-135m")
    text = reference_text()
    examples, report = build_examples([text[len(text) // 2 :]], tokenizer, DataConfig(task="lm", max_length=256))
    print(f"training text: {report}", flush=True)
    quant = lowbit.QuantConfig(format="int4", group_size=args.group_size, symmetric=True)
    qat = QATConfig(format="int4", group_size=args.group_size)
    cfg = TrainConfig(max_steps=args.steps, batch_size=args.batch, lr=args.lr, warmup_steps=args.steps // 10,
                      schedule="cosine", plot=False)  # fmt: skip

    def ppl(m) -> float:
        return perplexity(m, tokenizer, text, context_length=512, stride=512, max_windows=args.windows)

    rows = {"fp32": ppl(model)}
    m = copy.deepcopy(model)
    lowbit.quantize(m, quant)
    rows["ptq"] = ppl(m)
    print(rows, flush=True)
    timings = {}
    for name in ("finetune+ptq", "qat"):
        m = copy.deepcopy(model)
        if name == "qat":
            apply_qat(m, qat)
        start = time.perf_counter()
        result = train(m, examples, cfg, pad_token_id=tokenizer.eos_token_id)
        timings[name] = (time.perf_counter() - start, result.losses[0], result.losses[-1])
        if name == "qat":
            convert_qat(m)
        else:
            lowbit.quantize(m, quant)
        rows[name] = ppl(m)
        print(rows, flush=True)
    g = f"g{args.group_size}" if args.group_size else "per channel"
    print(f"\nint4 symmetric {g}; {args.steps} steps × {args.batch} × 256 tokens, lr {args.lr}, cosine; "
          f"perplexity over {args.windows} × 512 tokens\n")  # fmt: skip
    print("| model | perplexity | Δ vs fp32 | train s | first → last loss |\n|---|---:|---:|---:|---|")
    for name, value in rows.items():
        t = timings.get(name)
        extra = f"{t[0]:.0f} | {t[1]:.3f} → {t[2]:.3f}" if t else "- | -"
        print(f"| {name} | {value:.3f} | {100 * (value / rows['fp32'] - 1):+.1f}% | {extra} |")


if __name__ == "__main__":
    main()
