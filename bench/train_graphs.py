"""`lowbit.train.train` with and without `cuda_graphs`, on a GPU: same model, same examples, same seed.

    python3 bench/train_graphs.py                     # 32 blocks of the Llama-3-8B shape, @12, 2,048 tokens
    python3 bench/train_graphs.py --layers 2 --lengths 700,1500,2048 --steps 12     # several graph widths
    python3 bench/train_graphs.py --tiny --layers 2 --lengths 40,64 --steps 4      # CPU smoke run

Prints each run's losses, steady tokens/s (median over the steps after the first two: those capture) and
peak memory, then whether the losses agree. The trainer's own step: collation, logging, the eager
optimizer step and the host's check of each step's loss and gradient norm included.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent)]

from qlora_step import LLAMA3_8B, TINY, build_model, lowbit_qlora  # noqa: E402

from lowbit.train import TrainConfig, train  # noqa: E402


def run(graphs: bool, args, examples) -> dict:
    model = lowbit_qlora(build_model(args.shape, args.layers, args.device), dropout=args.dropout)
    if args.device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    cfg = TrainConfig(max_steps=args.steps, batch_size=1, lr=1e-4, schedule="constant", optimizer="adamw8bit",
                      gradient_checkpointing=True, checkpoint_layers=min(args.checkpoint, args.layers),
                      offload_embeddings=True, cuda_graphs=graphs, progress=False, plot=False)  # fmt: skip
    with tempfile.TemporaryDirectory() as out:
        result = train(model, examples, cfg, pad_token_id=0, output_dir=out)
        steps = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    speeds = [s["tokens_per_s"] for s in steps if "tokens_per_s" in s][2:]
    return {"losses": [round(x, 4) for x in result.losses], "tokens_per_s": statistics.median(speeds),
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else 0.0}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--checkpoint", type=int, default=12, help="blocks to recompute")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--lengths", default="2048", help="example lengths, cycled")
    parser.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout (the losses then differ a little: "
                        "other masks)")  # fmt: skip
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run on a tiny shape (graphs run eagerly)")
    args = parser.parse_args()
    args.shape, args.device = (TINY, "cpu") if args.tiny else (LLAMA3_8B, "cuda")
    gen = torch.Generator().manual_seed(0)
    lengths = [int(v) for v in args.lengths.split(",")]
    examples = []
    for i in range(args.steps):
        ids = torch.randint(0, args.shape["vocab_size"], (lengths[i % len(lengths)],), generator=gen).tolist()
        examples.append({"input_ids": ids, "labels": ids})
    where = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"{where}, torch {torch.__version__}, {args.layers} blocks, lengths {lengths}")
    results = {}
    for graphs in (False, True):
        results[graphs] = r = run(graphs, args, examples)
        print(f"cuda_graphs={graphs}: {r['tokens_per_s']:.0f} tok/s, peak {r['peak_gib']:.2f} GiB, "
              f"losses {r['losses']}", flush=True)  # fmt: skip
    worst = max(abs(a - b) for a, b in zip(results[False]["losses"], results[True]["losses"]))
    print(f"graphed × eager: {results[True]['tokens_per_s'] / results[False]['tokens_per_s']:.2f}; "
          f"losses {'agree' if worst < 2e-2 else 'DIFFER'} (max |Δ| {worst:.2e})")


if __name__ == "__main__":
    main()
