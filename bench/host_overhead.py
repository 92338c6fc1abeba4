"""Host (Python) time of one training step, the GPU kept nearly idle: where an eager QLoRA step waits on the CPU.

A Llama-shaped model small enough that every kernel finishes before the next is enqueued (hidden 1024,
4 blocks, 64 tokens), so a step's wall time is the host's: Python, autograd and kernel launches. Prints ms per
step for each contender and, with --profile, cProfile's top functions of the lowbit step (by own time)
into $OUT/host_profile_<kind>.txt.

    python3 bench/host_overhead.py --out $OUT --profile      # on a GPU (peft+bnb from the carried wheel)
    python3 bench/host_overhead.py --device cpu --kinds lowbit-fused   # the same code on the CPU
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent)]

from qlora_step import fresh, parse_kind, sync  # noqa: E402

SHAPE = dict(vocab_size=4096, hidden_size=1024, intermediate_size=2816, num_attention_heads=8,
             num_key_value_heads=2, max_position_embeddings=4096)  # fmt: skip


def step_fn(model, opt, ids):
    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def host_ms(kind: str, layers: int, seq: int, steps: int, device: str, profile_out: Path | None) -> dict:
    from lowbit.optim import AdamW8bit

    model = fresh(kind, SHAPE, layers, device)
    params = [p for p in model.parameters() if p.requires_grad]
    flags = parse_kind(kind)[2]
    opt = AdamW8bit(params, lr=1e-4) if "adam8bit" in flags else torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, SHAPE["vocab_size"], (1, seq), device=device)
    step = step_fn(model, opt, ids)
    for _ in range(3):  # Triton compiles and autotunes, the allocator fills its pools
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    enqueued = time.perf_counter() - start
    sync(device)
    total = time.perf_counter() - start
    result = {"step_ms": 1e3 * total / steps, "enqueue_ms": 1e3 * enqueued / steps}
    if profile_out is not None:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(steps):
            step()
        sync(device)
        prof.disable()
        text = io.StringIO()
        stats = pstats.Stats(prof, stream=text)
        stats.sort_stats("tottime").print_stats(40)
        stats.sort_stats("cumulative").print_stats(60)
        profile_out.write_text(f"# {kind}: {layers} blocks, {seq} tokens, {steps} steps under cProfile\n" + text.getvalue())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="write host_overhead.json (and profiles) here")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--kinds", default="peft+bnb,lowbit,lowbit-fused,lowbit-fused+adam8bit")
    parser.add_argument("--profile", action="store_true", help="cProfile each lowbit contender's steps")
    args = parser.parse_args()
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
    results = {}
    for kind in args.kinds.split(","):
        name = parse_kind(kind)[0]
        out = args.out / f"host_profile_{kind.replace('+', '_')}.txt" if args.profile and args.out and name != "peft+bnb" else None
        try:
            results[kind] = host_ms(kind, args.layers, args.seq, args.steps, args.device, out)
        except ImportError as e:  # bitsandbytes or peft absent
            results[kind] = {"error": str(e)}
        print(f"{kind:32s} {results[kind]}", flush=True)
    ref = results.get("peft+bnb", {}).get("step_ms")
    if ref:
        for kind, r in results.items():
            if "step_ms" in r:
                print(f"{kind:32s} {r['step_ms']:8.2f} ms/step  {r['step_ms'] / ref:5.2f}× peft+bnb's host time")
    if args.out:
        (args.out / "host_overhead.json").write_text(json.dumps({"layers": args.layers, "seq": args.seq, **results}, indent=1))


if __name__ == "__main__":
    main()
