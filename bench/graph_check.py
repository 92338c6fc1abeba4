"""Does a graph-replayed QLoRA step capture, and does it train like the eager one? One subprocess per variant
(a failed capture leaves the CUDA context unusable), a small Llama-shaped model, 4 steps each way.

    python3 bench/graph_check.py                      # on a GPU: every variant, one line each
    python3 bench/graph_check.py dropout              # LoRA dropout draws new masks on each replay
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent)]

VARIANTS = ["lowbit-fused@1+graph", "lowbit-fused@1+graph+norope", "lowbit-fused@1+graph+adam8bit+embcpu"]
SHAPE = dict(vocab_size=4096, hidden_size=1024, intermediate_size=2816, num_attention_heads=8,
             num_key_value_heads=2, max_position_embeddings=4096)  # fmt: skip


def one(kind: str) -> None:
    import torch

    from qlora_step import fresh, run_steps

    flags = set(kind.split("+")[1:])
    losses = []
    for graph in (True, False):
        model = fresh(kind, SHAPE, 2, "cuda")
        run_flags = flags if graph else flags - {"graph"}
        losses.append(run_steps(model, 1, 256, 4, 0, "cuda", run_flags)["losses"])
        del model
        torch.cuda.empty_cache()
    same = max(abs(a - b) for a, b in zip(*losses)) < 2e-2
    print(f"{kind}: captured; losses graph {losses[0]} eager {losses[1]} ({'agree' if same else 'DIFFER'})")


def dropout_replays() -> None:
    """LoRA dropout in a captured backward: two replays of one batch must draw different masks (different
    losses), as two eager calls do. The B factors are made nonzero first: at their zero init the LoRA path
    adds nothing, whatever its mask (session 19's first run printed equal losses for that reason)."""
    import torch

    from qlora_step import build_model, lowbit_qlora

    from lowbit.kernels import fuse_for_training
    from lowbit.train.graphed import GraphedBackward

    model = lowbit_qlora(build_model(SHAPE, 2, "cuda"), dropout=0.5)
    fuse_for_training(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_b" in name.lower():
                p.normal_(std=0.05)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    ids = torch.randint(0, SHAPE["vocab_size"], (1, 256), device="cuda")
    graphed = GraphedBackward(model, lambda m, b: m(**b).loss)
    batch = {"input_ids": ids, "labels": ids}
    losses = [graphed(batch, 1.0).item() for _ in range(3)]  # the first call captures, the others replay
    differ = len(set(losses)) == len(losses)
    print(f"dropout in the graph: losses {losses} ({'new masks each replay' if differ else 'MASKS REPEAT'})")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "dropout":
        dropout_replays()
    elif len(sys.argv) > 1:
        one(sys.argv[1])
    else:
        for kind in VARIANTS:
            done = subprocess.run([sys.executable, __file__, kind], capture_output=True, text=True, timeout=240)
            lines = (done.stdout + done.stderr).strip().splitlines()
            tail = [line for line in lines if "Error" in line or "captured" in line][-2:] or lines[-2:]
            print(f"{kind}: rc {done.returncode}: " + " | ".join(tail), flush=True)
