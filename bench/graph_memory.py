"""Where a graph-replayed QLoRA step's extra memory comes from: the live tensors at the peak of each eager
warm-up step against those at the peak of the captured step, grouped by the line that allocated them
(--stacks) or by size, and which phase (forward, backward, optimizer) each peak falls in.

    python3 bench/graph_memory.py --kind lowbit-fused@14+graph+embcpu+adam8bit --layers 32   # on a GPU

torch's allocator history (`torch.cuda.memory._record_memory_history`) gives every alloc and free with its
Python stack; marker allocations of distinctive sizes start each step's phases in the trace.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent)]

import qlora_step  # noqa: E402
from lowbit.train.graphed import GraphedStep, model_loss  # noqa: E402

MARK = 777 * 512  # bytes of the marker allocation (a size nothing else in the step asks for)
PHASES = {MARK: "forward", MARK + 512: "backward", MARK + 1024: "optimizer"}  # the marker that starts each


def site(frames: list[dict]) -> str:
    """The innermost frame in lowbit, transformers or torch's autograd/optim, else the innermost of all."""
    for f in frames:
        name = f["filename"]
        if any(k in name for k in ("lowbit", "transformers", "torch/optim", "torch/utils/checkpoint", "peft")):
            return f"{name.split('site-packages/')[-1].split('src/')[-1]}:{f['line']} {f['name']}"
    return f"{frames[0]['filename'].split('/')[-1]}:{frames[0]['line']}" if frames else "?"


def peaks(trace: list[dict]) -> list[dict]:
    """Per segment between markers: the peak of live bytes, what was live then (by site), and how many bytes
    had been asked to be freed but were not yet (a free deferred by a stream use)."""

    def replay(stop_at: set[int]):
        live, requested, total, seen = {}, set(), 0, {}
        for i, event in enumerate(trace):
            action, addr = event["action"], event["addr"]
            if action == "alloc":
                live[addr] = (event["size"], event)
                total += event["size"]
            elif action == "free_requested":
                requested.add(addr)
            elif action == "free_completed" and addr in live:
                total -= live.pop(addr)[0]
                requested.discard(addr)
            yield i, event, total
            if i in stop_at:
                by_site = collections.Counter()
                for size, alloc in live.values():
                    frames = alloc.get("frames")
                    by_site[site(frames) if frames else f"blocks of {size / 2**20:.2f} MiB"] += size
                seen[i] = (by_site, sum(live[a][0] for a in requested if a in live))
        yield -1, seen, total

    segments, at = [], set()
    for i, event, total in replay(set()):
        if i < 0:
            break
        phase = PHASES.get(event["size"]) if event["action"] == "alloc" else None
        if phase == "forward":
            segments.append({"peak": -1, "at": i, "phase": phase, "in": phase, "start": total - MARK})
        elif phase is not None and segments:
            segments[-1].update({"in": phase, f"{phase} start": total - event["size"]})
        elif segments and total > segments[-1]["peak"]:
            segments[-1].update(peak=total, at=i, phase=segments[-1]["in"])
    *_, (_, seen, _) = replay({s["at"] for s in segments})
    for s in segments:
        s["by_site"], s["deferred"] = seen[s["at"]]
    return segments


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", default="lowbit-fused@14+graph+embcpu+adam8bit")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--sdpa", default="", help="attention backends allowed, e.g. cudnn_attention,flash_attention")
    parser.add_argument("--stacks", action="store_true", help="record Python stacks (group by allocating line)")
    args = parser.parse_args()
    model = qlora_step.fresh(args.kind, qlora_step.LLAMA3_8B, args.layers, "cuda")
    flags = qlora_step.parse_kind(args.kind)[2]
    from lowbit.optim import AdamW8bit

    params = [p for p in model.parameters() if p.requires_grad]
    opt = AdamW8bit(params, lr=1e-4) if "adam8bit" in flags else torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (1, args.seq), device="cuda")

    def mark(size: int) -> None:
        torch.empty(size, dtype=torch.uint8, device="cuda")  # freed at once: only its alloc event matters

    def marked_loss(model, batch):
        mark(MARK)
        loss = model_loss(model, batch)
        mark(MARK + 512)
        return loss

    step = opt.step
    opt.step = lambda: (mark(MARK + 1024), step())[1]
    torch.cuda.reset_peak_memory_stats()
    # Python stacks break autograd's backward thread in torch 2.11 (SystemError in a recomputed checkpoint):
    # with --stacks off, live tensors are grouped by size, which names most of them (hidden × tokens, …)
    torch.cuda.memory._record_memory_history(max_entries=3_000_000, context="all" if args.stacks else None,
                                             stacks="python")  # fmt: skip
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = [getattr(SDPBackend, b.upper()) for b in args.sdpa.split(",")] if args.sdpa else []
    with sdpa_kernel(backends) if backends else contextlib.nullcontext():
        GraphedStep(model, opt, {"input_ids": ids, "labels": ids}, loss_fn=marked_loss)
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    print(f"max_memory_allocated {torch.cuda.max_memory_allocated() / 2**30:.3f} GiB")
    trace = snapshot["device_traces"][torch.cuda.current_device()]
    segments = peaks(trace)
    names = [f"warm-up {i + 1}" for i in range(len(segments) - 1)] + ["capture"]
    for name, s in zip(names, segments):
        print(f"{name}: peak {s['peak'] / 2**30:.3f} GiB in {s['phase']} (GiB at the start "
              f"{s['start'] / 2**30:.3f}, of backward {s.get('backward start', 0) / 2**30:.3f}, of the optimizer "
              f"{s.get('optimizer start', 0) / 2**30:.3f}), of it deferred frees {s['deferred'] / 2**30:.3f} GiB")
    eager, captured = segments[-2]["by_site"], segments[-1]["by_site"]
    print(f"\nlive at the captured step's peak minus at the last warm-up step's peak, by site (MiB), top {args.top}:")
    diff = {k: captured.get(k, 0) - eager.get(k, 0) for k in set(captured) | set(eager)}
    for where, d in sorted(diff.items(), key=lambda kv: -abs(kv[1]))[: args.top]:
        print(f"  {d / 2**20:+9.1f}  (eager {eager.get(where, 0) / 2**20:8.1f}, captured "
              f"{captured.get(where, 0) / 2**20:8.1f})  {where}")  # fmt: skip
    print(f"\nlive at the captured step's peak, by site (MiB), top {args.top}:")
    for where, size in captured.most_common(args.top):
        print(f"  {size / 2**20:9.1f}  {where}")


if __name__ == "__main__":
    main()
