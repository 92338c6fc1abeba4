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


def enqueue_us(fn, calls: int = 200) -> float:
    """Host µs per call of ``fn``: the time to enqueue ``calls`` calls (the GPU catches up afterwards)."""
    for _ in range(5):
        fn()
    sync("cuda")
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    seconds = time.perf_counter() - start
    sync("cuda")
    return 1e6 * seconds / calls


def pieces() -> dict:
    """Host µs of the pieces an eager fused QLoRA step is made of (CUDA only)."""
    import triton

    import lowbit
    from lowbit.kernels import lut4_gemm
    from lowbit.kernels.lora_fused import qlora_linear, swiglu_qlora
    from lowbit.kernels.lut4 import lut4_weight
    from lowbit.kernels.lut4_tile import kernel_args
    from lowbit.kernels.norms import rms_norm

    torch.manual_seed(0)
    lin = torch.nn.Linear(1024, 1024, bias=False, device="cuda", dtype=torch.bfloat16)
    base = lowbit.nn.QuantLinear.from_linear(lin, lowbit.formats.WeightFormat(name="nf4", block_size=64, double_quant=True))
    w = lut4_weight(base.fmt, base.storage(), (base.out_features, base.in_features))
    a = torch.randn(16, 1024, device="cuda", requires_grad=True)
    b = torch.zeros(1024, 16, device="cuda", requires_grad=True)
    x = torch.randn(64, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    norm_w = torch.ones(1024, device="cuda", dtype=torch.bfloat16)
    lut4_gemm.lut4_dequantize(w)  # tune
    best = lut4_gemm._lut4_dequant_tuned.best_config
    pointers, sizes, layout = kernel_args(w, torch.bfloat16)
    out = torch.empty(1024, 1024, device="cuda", dtype=torch.bfloat16)
    grid = (triton.cdiv(1024, best.kwargs["BN"]), triton.cdiv(1024, best.kwargs["BK"] * best.kwargs["TILES"]))

    def direct():
        lut4_gemm._lut4_dequant_kernel[grid](out, *pointers, **sizes, **layout, **best.all_kwargs())

    def fwd_bwd():
        qlora_linear(x, base, a, b, 2.0).sum().backward()

    def swiglu_fwd_bwd():
        swiglu_qlora(x, x, base, a, b, 2.0).sum().backward()

    def norm_fwd_bwd():
        rms_norm(x, norm_w).sum().backward()

    y, b16 = torch.empty(64, 1024, device="cuda", dtype=torch.bfloat16), b.detach().bfloat16()
    table = {
        "empty (64, 1024)": lambda: torch.empty(64, 1024, device="cuda", dtype=torch.bfloat16),
        "fp32 → bf16 cast (16, 1024)": lambda: a.detach().to(torch.bfloat16),
        "addmm (64, 16)·(16, 1024)": lambda: torch.addmm(y, x.detach()[:, :16], b16.t(), alpha=2.0),
        "kernel_args": lambda: kernel_args(w, torch.bfloat16),
        "lut4_dequantize (autotuned wrapper)": lambda: lut4_gemm.lut4_dequantize(w),
        "dequant kernel launched directly": direct,
        "qlora_linear forward (no grad)": lambda: qlora_linear(x.detach(), base, a.detach(), b.detach(), 2.0),
        "qlora_linear forward + backward": fwd_bwd,
        "swiglu_qlora forward + backward": swiglu_fwd_bwd,
        "rms_norm forward + backward": norm_fwd_bwd,
    }
    result = {}
    for name, fn in table.items():
        result[name] = round(enqueue_us(fn), 1)
        print(f"  {name:40s} {result[name]:8.1f} µs", flush=True)
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
    results = {"pieces_us": pieces()} if args.device == "cuda" else {}
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
            if "step_ms" in r and kind != "pieces_us":
                print(f"{kind:32s} {r['step_ms']:8.2f} ms/step  {r['step_ms'] / ref:5.2f}× peft+bnb's host time")
    if args.out:
        (args.out / "host_overhead.json").write_text(json.dumps({"layers": args.layers, "seq": args.seq, **results}, indent=1))


if __name__ == "__main__":
    main()
