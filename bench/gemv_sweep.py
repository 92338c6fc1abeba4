"""Where the batch-1 decode GEMV stands against what this GPU can stream, and which launch gets closest.

For each Llama-3-8B decode shape, one process, one GPU, CUDA-graph replays over rotated weights (more bytes
than L2 holds), as bench/gpu_kernels.py times them:
  - the roofs at this size: a device-to-device copy of the NF4 weight's bytes (read + write), the best of a
    sweep of a read-only Triton kernel over the same bytes (reads them, sums words, writes one per program),
    and cuBLAS's bf16 GEMV over a weight of the same bytes (N/4 × K);
  - the register-table GEMV (`lut4_gemv`) over a sweep of launches (tiles, warps);
  - the half2 word GEMV (`lut4_gemv_half2`) over its own sweep, with and without STAGES (Triton's software
    pipeliner, cp.async, which a loop without a dot gets only when asked); the op; bitsandbytes'
    `matmul_4bit` where installed; then M = 2, 4, 8.
Prints the best launches of each kernel and one table; --out writes every timing as JSON.

    python3 bench/gemv_sweep.py [--out DIR] [--quick]
    TRITON_INTERPRET=1 python3 bench/gemv_sweep.py --smoke   # the script itself on the CPU (numbers meaningless)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1] / "src")]

from gpu_kernels import DECODE_SHAPES, ceilings, graph_time_us, make_weights  # noqa: E402

from lowbit.kernels.lut4_gemm import lut4_dequantize  # noqa: E402
from lowbit.kernels.lut4_gemv import lut4_gemv  # noqa: E402
from lowbit.kernels.lut4_gemv_half2 import (  # noqa: E402
    _half2_tuned,
    hopper_single_row_launch,
    lut4_gemv_half2,
    prepare_x,
)


@triton.jit
def _read_words(src_ptr, out_ptr, n, BLOCK: tl.constexpr, STEPS: tl.constexpr, STAGES: tl.constexpr):
    """Sum STEPS blocks of BLOCK int32 words (a stand-in for a GEMV that does nothing but read its weight)."""
    base = tl.program_id(0).to(tl.int64) * BLOCK * STEPS
    acc = tl.zeros((BLOCK,), dtype=tl.int32)
    for s in tl.range(0, STEPS, num_stages=STAGES):
        offs = base + s * BLOCK + tl.arange(0, BLOCK)
        acc += tl.load(src_ptr + offs, mask=offs < n, other=0)
    tl.store(out_ptr + tl.program_id(0), tl.sum(acc, axis=0))


def read_configs(quick: bool) -> list[dict]:
    out = []
    for block in (512, 1024, 2048):
        for steps in (2, 4, 8, 16):
            for warps in (4, 8):
                for stages in (1, 3):
                    out.append(dict(BLOCK=block, STEPS=steps, num_warps=warps, STAGES=stages))
    return out[::4] if quick else out


def register_configs(quick: bool) -> list[dict]:
    tiles = [(2, 1024), (4, 512), (4, 1024), (8, 256), (8, 512), (8, 1024), (16, 128), (16, 256), (16, 512),
             (32, 128), (32, 256)]  # fmt: skip
    out = []
    for bn, bk in tiles:
        for warps in (2, 4, 8):
            threads = 32 * warps
            if bn * bk // 2 >= 8 * threads and bn * bk <= 64 * threads:  # lut4_gemv._prune's rule
                out.append(dict(BN=bn, BK=bk, num_warps=warps, num_stages=1))
    return out[::5] if quick else out


def half2_configs(quick: bool) -> list[dict]:
    out = []
    for bn in (2, 4, 8, 16, 32):
        for bk in (256, 512, 1024, 2048):
            for warps in (1, 2, 4, 8):
                per_thread = bn * bk // 8 // (32 * warps)  # packed words a thread decodes per step
                if 2 <= per_thread <= 16:
                    out += [dict(BN=bn, BK=bk, num_warps=warps, STAGES=s) for s in (1, 3)]
    return out[::5] if quick else out


def shared_configs(quick: bool) -> list[dict]:
    """The half2 GEMV with its byte table in shared memory (32 or 16 KB a block: several warps a block)."""
    out = []
    for bn in (4, 8, 16, 32):
        for bk in (256, 512, 1024, 2048):
            for warps in (2, 4, 8, 16):
                per_thread = bn * bk // 8 // (32 * warps)
                if 2 <= per_thread <= 32:
                    out += [dict(BN=bn, BK=bk, num_warps=warps, STAGES=1, SMEM=True, AHEAD=a, COPIES=c)
                            for a in (False, True) for c in (32, 16)]
    return out[::5] if quick else out


def regs_configs(quick: bool) -> list[dict]:
    """The shared-table GEMV's best tiles (sessions 20-21) with fewer registers (ptxas' .maxnreg): more blocks an
    SM, so more weight bytes in flight, where the registers (not the 32 or 16 KB tables) limit occupancy."""
    tiles = [(32, 1024, 16, True), (16, 1024, 8, True), (8, 512, 8, True), (8, 1024, 4, True), (32, 512, 4, True),
             (32, 2048, 16, True), (16, 2048, 8, True), (8, 2048, 4, False), (16, 1024, 4, True), (16, 2048, 16, False)]
    out = [dict(BN=bn, BK=bk, num_warps=w, STAGES=1, SMEM=True, AHEAD=a, COPIES=c) | ({"maxnreg": r} if r else {})
           for bn, bk, w, a in tiles for c in (32, 16) for r in (None, 96, 80, 64)]  # fmt: skip
    return out[::4] if quick else out


def sweep(name: str, configs: list[dict], make_fn, n_rot: int, device, reference=None) -> list[dict]:
    """Each launch timed; with a `reference` (the float32 product), checked against it first (relative error
    of the largest output, bf16 rounding allows ~1e-2)."""
    rows = []
    for c in configs:
        try:
            fn = make_fn(c)
            if reference is not None:
                err = float((fn(0).float() - reference).abs().max() / reference.abs().max())
                if not err < 2e-2:
                    print(f"  {name} {c}: WRONG, relative error {err:.2e}", flush=True)
                    continue
            us = graph_time_us(fn, n_rot, device)
        except Exception as e:  # a launch that does not compile or fit (shared memory) is reported, not fatal
            print(f"  {name} {c}: {type(e).__name__}: {str(e).splitlines()[0][:120]}", flush=True)
            continue
        rows.append({"config": c, "us": us})
    rows.sort(key=lambda r: r["us"])
    return rows


def op(x, w):
    """The op as the static decoder's graphs run it (timed here as graph replays too)."""
    from lowbit.kernels import ops

    with ops.for_graph_replay():
        return ops.lut4_linear(x, w.packed, w.table, w.scale, None, w.nested_code, w.nested_scale, w.offset,
                               w.out_features, 64, True)  # fmt: skip


def batches(lw, bw, n_rot, k, device, bnb, smoke: bool) -> dict:
    """M = 2, 4, 8 (autotuned launches): the half2 GEMV, the op, bnb; µs."""
    out = {}
    for m in (2, 4, 8) if not smoke else (4,):
        x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
        cfg = {"BN": 8, "BK": 128, "num_warps": 4} if smoke else None
        t = {"half2": graph_time_us(lambda i: lut4_gemv_half2(x, lw[i], cfg), n_rot, device),
             "op": graph_time_us(lambda i: op(x, lw[i]), n_rot, device)}  # fmt: skip
        if bnb is not None:
            t["bnb"] = graph_time_us(lambda i: bnb.matmul_4bit(x, bw[i][0].t(), quant_state=bw[i][1]), n_rot, device)
        dense = lut4_dequantize(lw[0], torch.float32)
        ref = x.float() @ dense.t()
        err = {name: float((fn(x, lw[0]).float() - ref).abs().max() / ref.abs().max())
               for name, fn in (("half2", lambda a, b: lut4_gemv_half2(a, b, cfg)), ("op", op))}  # fmt: skip
        out[m] = t | {"rel_err": err}
        print(f"  M = {m}: " + ", ".join(f"{a} {b:.1f} us" for a, b in t.items())
              + f" | max rel. error half2 {err['half2']:.1e}, op {err['op']:.1e}", flush=True)  # fmt: skip
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--quick", action="store_true", help="a fifth of each sweep")
    ap.add_argument("--smoke", action="store_true", help="CPU, one tiny shape, a few launches")
    ap.add_argument("--sweeps", default="read,register,half2,shared", help="which launch sweeps to run")
    ap.add_argument("--shapes", help="comma-separated NxK subset of the decode shapes, e.g. 14336x4096")
    args = ap.parse_args(argv)
    device = torch.device("cpu" if args.smoke else "cuda")
    shapes = [(64, 512)] if args.smoke else DECODE_SHAPES
    if args.shapes:
        shapes = [tuple(int(v) for v in shape.split("x")) for shape in args.shapes.split(",")]
    quick = args.quick or args.smoke
    try:
        import bitsandbytes as bnb
    except ImportError:
        bnb = None
    print(torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch", torch.__version__, "triton",
          triton.__version__, flush=True)  # fmt: skip
    ceil = ceilings(device, smoke=args.smoke)
    results = {"ceilings": ceil, "shapes": []}
    for n, k in shapes:
        nbytes = n * k // 2 + n * k // 64 + 4 * (n * k // 64 // 256) + 4
        n_rot = 2 if args.smoke else max(2, -(-300_000_000 // nbytes))
        lw, bw, _ = make_weights(n, k, device, n_rot, bnb is not None)
        x = torch.randn(1, k, device=device, dtype=torch.bfloat16)
        raw = [torch.empty(nbytes // 4, dtype=torch.int32, device=device) for _ in range(n_rot)]
        raw_out = [torch.empty_like(r) for r in raw]
        dense = [torch.randn(n // 4, k, device=device, dtype=torch.bfloat16) for _ in range(n_rot)]
        partial = torch.empty(raw[0].numel() // 1024 + 1, dtype=torch.int32, device=device)
        times = {
            "copy (same bytes)": graph_time_us(lambda i: raw_out[i].copy_(raw[i]), n_rot, device),
            "bf16 cuBLAS (same bytes)": graph_time_us(lambda i: torch.nn.functional.linear(x, dense[i]), n_rot, device),
        }

        def reader(c):
            grid = (triton.cdiv(raw[0].numel(), c["BLOCK"] * c["STEPS"]),)
            return lambda i: _read_words[grid](raw[i], partial, raw[i].numel(), **c)

        def register(c):
            return lambda i: lut4_gemv(x, lw[i], c)

        def half2(c):
            return lambda i: lut4_gemv_half2(x, lw[i], c)

        ref = x.float() @ lut4_dequantize(lw[0], torch.float32).t()
        chosen = args.sweeps.split(",")
        sweeps = {"read-only": ("read", read_configs, reader, None), "register GEMV": ("register", register_configs,
                  register, ref), "half2 GEMV": ("half2", half2_configs, half2, ref),
                  "half2 GEMV, shared table": ("shared", shared_configs, half2, ref),
                  "half2 GEMV, shared table, registers capped": ("regs", regs_configs, half2, ref)}  # fmt: skip
        sweeps = {name: sweep(short, configs(quick), make, n_rot, device, reference)
                  for name, (short, configs, make, reference) in sweeps.items() if short in chosen}  # fmt: skip
        for name, rows in sweeps.items():
            times[f"{name} (best)"] = rows[0]["us"]
            print(f"{n}x{k} {name}: " + "; ".join(f"{r['us']:.1f} us {r['config']}" for r in rows[:6]), flush=True)
        if "half2 GEMV" in sweeps:
            plain = [r for r in sweeps["half2 GEMV"] if r["config"]["STAGES"] == 1]
            times["half2 GEMV, unpipelined (best)"] = plain[0]["us"] if plain else float("nan")
        times["x to float16 pairs alone (prepare_x)"] = graph_time_us(lambda i: prepare_x(x), n_rot, device)
        if not args.smoke:
            times["half2 GEMV, autotuned"] = graph_time_us(lambda i: lut4_gemv_half2(x, lw[i]), n_rot, device)
            rule = torch.cuda.get_device_capability()[0] == 9 and hopper_single_row_launch(n, k, 64)
            print(f"{n}x{k} the launch at M = 1: {rule or _half2_tuned.best_config}", flush=True)
            times["register GEMV, autotuned"] = graph_time_us(lambda i: lut4_gemv(x, lw[i]), n_rot, device)
            times["op (lowbit::lut4_linear)"] = graph_time_us(lambda i: op(x, lw[i]), n_rot, device)
        if bnb is not None:
            times["bnb matmul_4bit"] = graph_time_us(lambda i: bnb.matmul_4bit(x, bw[i][0].t(), quant_state=bw[i][1]),
                                                     n_rot, device)  # fmt: skip
        results["shapes"].append({"shape": f"{n}x{k}", "bytes": nbytes, "us": times, "sweeps": sweeps,
                                  "batches": batches(lw, bw, n_rot, k, device, bnb, args.smoke)})  # fmt: skip
        print(f"\n{n}x{k}, M = 1, {nbytes / 1e6:.1f} MB of NF4 + DQ")
        print("| contender | µs | GB/s | % of copy BW (large) | × bnb |")
        print("|---|---|---|---|---|")
        for name, us in times.items():
            gbs = (2 if name.startswith("copy") else 1) * nbytes / us / 1e3
            vs = times.get("bnb matmul_4bit", float("nan")) / us
            print(f"| {name} | {us:.1f} | {gbs:.0f} | {gbs / ceil['copy_GBps']:.0%} | {vs:.2f} |", flush=True)
        del lw, bw, raw, raw_out, dense, partial
        torch.cuda.empty_cache() if device.type == "cuda" else None
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gemv_sweep.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
