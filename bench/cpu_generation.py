"""Greedy generation on the CPU with the packaged SmolLM2-135M: fp32 vs NF4 (+ double quant), same process.

    OMP_NUM_THREADS=2 python bench/cpu_generation.py [--tokens 32] [--threads 2]

Prints tokens/s of each (best of 3 calls of `generate`, after a warm-up) and their ratio, and checks the two
greedy continuations start alike (NF4 changes the weights, so they may part later).
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

import lowbit


def tokens_per_s(model, ids, tokens: int) -> tuple[float, torch.Tensor]:
    with torch.no_grad():
        model.generate(ids, max_new_tokens=4, do_sample=False)  # warm-up
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            out = model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
            best = min(best, time.perf_counter() - start)
    return tokens / best, out[0, ids.shape[1]:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = lowbit.load_model("smollm2-135m")
    model.eval()
    nf4 = copy.deepcopy(model)
    lowbit.quantize(nf4, lowbit.QuantConfig(format="nf4", block_size=64, double_quant=True))
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    fp32_speed, fp32_out = tokens_per_s(model, ids, args.tokens)
    nf4_speed, nf4_out = tokens_per_s(nf4, ids, args.tokens)
    print(f"| model | tok/s | ÷ fp32 |\n|---|---|---|\n| fp32 | {fp32_speed:.1f} | 1.00 |\n"
          f"| NF4 + DQ | {nf4_speed:.1f} | {nf4_speed / fp32_speed:.2f} |")  # fmt: skip
    print("fp32:", repr(tokenizer.decode(fp32_out)[:60]))
    print("nf4: ", repr(tokenizer.decode(nf4_out)[:60]))


if __name__ == "__main__":
    main()
