"""One optimizer step on the GPU: lowbit's 8-bit AdamW (fused kernel) vs torch AdamW vs bitsandbytes' AdamW8bit.

Two parameter sets, fp32, random gradients:
  lora — the LoRA matrices of a QLoRA run on the Llama-3-8B shape (r = 16 on the 7 linears of 32 blocks:
         448 tensors, 42M parameters), what issue 8's training step updates;
  full — one 14336×4096 matrix (58.7M parameters), a full fine-tune's largest tensor.

Per optimizer: ms per step (CUDA events, median of 20 after 5 warm-up steps), state bytes (for the paged
ones they live in CPU memory between steps), and how far the parameters drift from torch AdamW's after 25
steps of the same gradients. First a
correctness check on the GPU: the fused kernel against lowbit's torch path (same state after 10 steps).

    python3 bench/optimizer_step.py --out $OUT      # on a GPU; bitsandbytes from its carried wheel
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "src")]

from lowbit.optim import AdamW8bit, PagedAdamW, PagedAdamW8bit, optimizer_state_nbytes  # noqa: E402

HIDDEN, INTER, KV, R, BLOCKS = 4096, 14336, 1024, 16, 32
LINEARS = [(HIDDEN, HIDDEN), (HIDDEN, KV), (HIDDEN, KV), (HIDDEN, HIDDEN), (HIDDEN, INTER), (HIDDEN, INTER),
           (INTER, HIDDEN)]  # (in, out) of q, k, v, o, gate, up, down  fmt: skip


def shapes(kind: str) -> list[tuple[int, int]]:
    if kind == "lora":
        return [s for _ in range(BLOCKS) for i, o in LINEARS for s in ((R, i), (o, R))]
    return [(INTER, HIDDEN)]


def make_params(kind: str, seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, device="cuda", generator=gen) * 0.02) for s in shapes(kind)]


def optimizers():
    yield "torch AdamW (foreach)", lambda ps: torch.optim.AdamW(ps, lr=1e-3)
    yield "torch AdamW (fused)", lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True)
    yield "lowbit AdamW8bit (fused kernel)", lambda ps: AdamW8bit(ps, lr=1e-3, backend="triton")
    yield "lowbit AdamW8bit (torch path)", lambda ps: AdamW8bit(ps, lr=1e-3, backend="torch")
    yield "lowbit PagedAdamW8bit, fused (states in CPU memory)", lambda ps: PagedAdamW8bit(ps, lr=1e-3, backend="triton")
    yield "lowbit PagedAdamW (states in CPU memory)", lambda ps: PagedAdamW(ps, lr=1e-3)
    try:
        import bitsandbytes as bnb

        yield "bitsandbytes AdamW8bit", lambda ps: bnb.optim.AdamW8bit(ps, lr=1e-3)
        yield "bitsandbytes PagedAdamW8bit", lambda ps: bnb.optim.PagedAdamW8bit(ps, lr=1e-3)
    except ImportError as e:
        print(f"bitsandbytes not available: {e}")


def time_steps(make, kind: str, steps: int = 20, warmup: int = 5) -> dict:
    params = make_params(kind)
    opt = make(params)
    gen = torch.Generator(device="cuda").manual_seed(1)
    grads = [[torch.randn(p.shape, device="cuda", generator=gen) for p in params] for _ in range(2)]
    times = []
    for i in range(warmup + steps):
        for p, g in zip(params, grads[i % 2]):
            p.grad = g
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        opt.step()
        end.record()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end))
    times.sort()
    return {"ms": times[len(times) // 2], "state_bytes": optimizer_state_nbytes(opt),
            "params": [p.detach() for p in params]}  # fmt: skip


def check_fused(n_steps: int = 10) -> dict:
    """The fused kernel against the torch path on the GPU, on a 3-block-and-a-bit tensor, fp32 and bf16."""
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        gen = torch.Generator(device="cuda").manual_seed(2)
        p0 = torch.randn(3 * 2048 + 77, device="cuda", generator=gen).to(dtype)
        grads = [torch.randn(p0.shape, device="cuda", generator=gen) for _ in range(n_steps)]
        result = []
        for backend in ("triton", "torch"):
            p = torch.nn.Parameter(p0.clone())
            opt = AdamW8bit([p], lr=1e-2, weight_decay=0.1, min_8bit_size=0, backend=backend)
            for g in grads:
                p.grad = g.to(dtype)
                opt.step()
            result.append((p.detach().float(), opt.state[p]))
        (pf, sf), (pt, st) = result
        out[str(dtype)] = {"max_abs_param_diff": (pf - pt).abs().max().item(),
                           "codes_equal": min((sf[k] == st[k]).float().mean().item()
                                              for k in ("exp_avg_codes", "exp_avg_sq_codes")),
                           "absmax_rel_diff": max(((sf[k] - st[k]).abs() / st[k].abs().clamp(min=1e-30)).max().item()
                                                  for k in ("exp_avg_absmax", "exp_avg_sq_absmax"))}  # fmt: skip
        print(f"fused vs torch path, {dtype}, {n_steps} steps: {out[str(dtype)]}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    results = {"check": check_fused()}
    print("\n| params | optimizer | ms/step | × torch AdamW (foreach) | state MiB | max \\|Δθ\\| vs torch AdamW |")
    print("|---|---|---|---|---|---|")
    for kind in ("lora", "full"):
        base = None
        for name, make in optimizers():
            r = time_steps(make, kind)
            if base is None:
                base = r
            drift = max((a - b).abs().max().item() for a, b in zip(r["params"], base["params"]))
            results[f"{kind}/{name}"] = {"ms": r["ms"], "state_MiB": r["state_bytes"] / 2**20, "drift": drift}
            print(f"| {kind} | {name} | {r['ms']:.2f} | {base['ms'] / r['ms']:.2f} | {r['state_bytes'] / 2**20:.0f} | "
                  f"{drift:.2e} |", flush=True)  # fmt: skip
            del r
            torch.cuda.empty_cache()
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "optimizer_step.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
