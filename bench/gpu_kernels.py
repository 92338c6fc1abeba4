"""lowbit's 4-bit / 8-bit kernels against bitsandbytes, bf16 cuBLAS and the GPU's measured limits.

One process, one GPU, same inputs for every contender. In order:
  1. environment; the two ceilings measured here (device-to-device copy GB/s, bf16 matmul TFLOP/s);
  2. correctness on the GPU: every LUT4 layout and kernel vs float64 (fresh random inputs, odd shapes,
     M = 1 … 300, bf16/fp16/fp32), lowbit's kernel on bitsandbytes' own NF4 bytes vs bnb's output,
     int8 GEMM vs the exact integer product;
  3. benchmark 1, decode at Llama-3-8B layer shapes, batch 1, 4 and 8: µs, GB/s, share of copy
     bandwidth, speedup vs bnb `matmul_4bit` (NF4 + double quant, block 64) and vs bf16; the op,
     the GEMV and decode + cuBLAS side by side;
  4. benchmark 2, prefill GEMM at M = 2048 and 8192: TFLOP/s vs bf16 cuBLAS and bnb, the fused Triton
     GEMM, and the input gradient dX = dY·W (QLoRA's backward) at M = 2048;
  5. the int8 W8A8 GEMM vs torch._int_mm + scales and bf16 cuBLAS.
Decode timings replay a CUDA graph of calls that cycle through several copies of the weight (more
bytes than L2 holds), so neither Python launch overhead nor L2 hits enter them; GEMM timings use
triton.testing.do_bench (median, L2 flushed between calls).

    python bench/gpu_kernels.py [--out DIR] [--skip-correctness] [--smoke]

`--smoke` runs every code path on tiny shapes on the CPU (Triton interpreter, wall-clock timing)
to check the script itself; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

DECODE_SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336)]  # Llama-3-8B weights (out, in): q/o, gate/up, down
PREFILL_M = (2048, 8192)
SMOKE_GEMV = {"BN": 4, "BK": 64, "num_warps": 4, "num_stages": 1}  # fixed launches for the CPU interpreter
SMOKE_GEMM = {"BM": 16, "BN": 16, "BK": 64, "num_warps": 4, "num_stages": 1}


def log(*a):
    print(*a, flush=True)


# ----------------------------------------------------------------------------------------------- timing
def graph_time_us(fn, n_rot: int, device, calls: int = 240) -> float:
    """Median µs per call over CUDA-graph replays of `calls` calls that cycle through n_rot inputs."""
    if device.type != "cuda":  # --smoke: wall clock, meaningless but exercises the code
        t = time.perf_counter()
        for i in range(n_rot):
            fn(i)
        return (time.perf_counter() - t) / n_rot * 1e6
    for i in range(n_rot):
        fn(i)  # autotune and compile outside the capture
    torch.cuda.synchronize()
    return _replay_us(fn, n_rot, calls)


def _replay_us(fn, n_rot: int, calls: int) -> float:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(n_rot):
            fn(i)
    torch.cuda.current_stream().wait_stream(side)
    per_graph = max(n_rot, calls // n_rot * n_rot)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for j in range(per_graph):
            fn(j % n_rot)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / per_graph)
    del graph
    return statistics.median(times)


def rotating(fn, n_rot: int):
    """fn(i) → a thunk that calls fn on the next of n_rot inputs each time."""
    state = {"i": 0}

    def call():
        state["i"] = (state["i"] + 1) % n_rot
        return fn(state["i"])

    return call


def bench_us(fn, device) -> float:
    """Median µs of fn() via triton.testing.do_bench (L2 flushed before each call)."""
    if device.type != "cuda":
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e6
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median") * 1e3


# --------------------------------------------------------------------------------------------- ceilings
def ceilings(device, smoke: bool) -> dict:
    n = (1 << 28) if not smoke else (1 << 12)  # 1 GiB of fp32
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    t = bench_us(lambda: dst.copy_(src), device)
    copy_gbs = 2 * src.numel() * 4 / t / 1e3
    s = 8192 if not smoke else 64
    a = torch.randn(s, s, device=device, dtype=torch.bfloat16)
    b = torch.randn(s, s, device=device, dtype=torch.bfloat16)
    t = bench_us(lambda: a @ b, device)
    mm_tflops = 2 * s**3 / t / 1e6
    del src, dst, a, b
    log(f"ceilings: device-to-device copy {copy_gbs:.0f} GB/s (read + write); bf16 matmul {s}^3 {mm_tflops:.0f} TFLOP/s")
    return {"copy_GBps": copy_gbs, "bf16_matmul_TFLOPs": mm_tflops}


# ------------------------------------------------------------------------------------------ correctness
def guarded(check) -> float:
    """Run one check; an exception (a compile error, say) is reported and counts as a failure."""
    try:
        return check()
    except Exception as e:  # noqa: BLE001 - one broken kernel must not hide the other results
        log(f"  ERROR {type(e).__name__}: {str(e)[:300]}")
        return float("inf")


def rel_err(a, b) -> float:
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b).norm() / b.norm()).item()


def check_correctness(device, smoke: bool) -> list[dict]:
    from lowbit.formats import WeightFormat
    from lowbit.kernels.lut4 import lut4_weight
    from lowbit.kernels.lut4_gemm import lut4_dequantize, lut4_gemm, lut4_gemm_grad_input
    from lowbit.kernels import lut4_gemv_half2
    from lowbit.kernels.lut4_gemv import lut4_gemv

    formats = [WeightFormat("nf4", 64, True), WeightFormat("nf4", 64, False), WeightFormat("fp4", 64, True),
               WeightFormat("nf4", 256, True), WeightFormat("int4", group_size=128, symmetric=True),
               WeightFormat("int4", group_size=64, symmetric=False), WeightFormat("int4", group_size=None)]  # fmt: skip
    shapes = [(384, 1024), (37, 77), (200, 300)] if not smoke else [(48, 128), (37, 77)]
    gemv_cfg = {"BN": 4, "BK": 256, "num_warps": 4, "num_stages": 3}
    gemm_cfgs = [{"BM": 64, "BN": 128, "BK": 64, "num_warps": 4, "num_stages": 3},
                 {"BM": 16, "BN": 64, "BK": 128, "num_warps": 4, "num_stages": 3},
                 {"BM": 128, "BN": 64, "BK": 64, "SWAP": False, "num_warps": 4, "num_stages": 3}]  # fmt: skip
    half2_cfg = {"BN": 4, "BK": 1024, "num_warps": 1}  # K = 1024 unmasked, the others masked
    if smoke:
        gemv_cfg = {"BN": 4, "BK": 64, "num_warps": 4, "num_stages": 1}
        half2_cfg = {"BN": 8, "BK": 128, "num_warps": 4}
        gemm_cfgs = [{"BM": 16, "BN": 16, "BK": 64, "num_warps": 4, "num_stages": 1}]
    tol = {torch.float32: 1e-4, torch.bfloat16: 1.5e-2, torch.float16: 5e-3}
    rows, worst = [], {}
    for fi, fmt in enumerate(formats):
        for n, k in shapes + ([(200, 300)] if fi in (0, 6) and not smoke else []):
            torch.manual_seed(100 * fi + n)
            storage = fmt.encode(torch.randn(n, k, device=device))
            w = lut4_weight(fmt, storage, (n, k))
            dense = fmt.decode(storage, (n, k), torch.float32).double()  # formats' decoder, not the kernels'
            dtypes = (torch.bfloat16, torch.float32) if fi in (0, 5) and (n, k) == shapes[0] else (torch.bfloat16,)
            if smoke:
                dtypes = (torch.float32,)  # the interpreter's bf16 dot is broken
            for dt in dtypes:
                checks = {}
                for m in (1, 3):
                    x = torch.randn(m, k, device=device).to(dt)
                    checks[f"gemv M={m}"] = guarded(lambda: rel_err(lut4_gemv(x, w, gemv_cfg), x.double() @ dense.t()))
                    if lut4_gemv_half2.supports(x, w):  # the half2 word GEMV (M ≤ 8)
                        for mm in (m, 8):
                            xh = torch.randn(mm, k, device=device).to(dt)
                            checks[f"gemv half2 M={mm}"] = guarded(lambda: rel_err(
                                lut4_gemv_half2.lut4_gemv_half2(xh, w, half2_cfg), xh.double() @ dense.t()))
                for ci, cfg in enumerate(gemm_cfgs[::2] if fi == 0 else gemm_cfgs[:1]):
                    for m in (1, 64, 300):
                        x = torch.randn(m, k, device=device).to(dt)
                        checks[f"gemm{ci} M={m}"] = guarded(lambda: rel_err(lut4_gemm(x, w, cfg), x.double() @ dense.t()))
                g = torch.randn(300, n, device=device).to(dt)
                checks["dX M=300"] = guarded(lambda: rel_err(lut4_gemm_grad_input(g, w, gemm_cfgs[0]), g.double() @ dense))
                # The decoder is exact up to one rounding (an FMA in the double-quant scale): 1e-6 relative.
                checks["dequant"] = guarded(lambda: rel_err(lut4_dequantize(w, torch.float32), dense))
                # the half2 GEMV computes in float16 pairs whatever x's dtype: bf16-level tolerance
                limit = {c: 1e-6 if c == "dequant" else max(tol[dt], 4e-3) if "half2" in c else tol[dt] for c in checks}
                bad = {c: e for c, e in checks.items() if not e <= limit[c]}
                rows.append({"format": fmt.name, "block/group": fmt.block_size if fmt.is_codebook else fmt.group_size,
                             "dq": fmt.double_quant and fmt.is_codebook, "shape": (n, k), "dtype": str(dt),
                             "max_rel_err": max(e for c, e in checks.items() if c != "dequant"), "failed": bad})  # fmt: skip
                worst[str(dt)] = max(worst.get(str(dt), 0.0), rows[-1]["max_rel_err"])
                if bad:
                    log(f"  FAIL {fmt} {(n, k)} {dt}: {bad}")
    rows += check_op_and_int8(device, smoke)
    failed = [r for r in rows if r["failed"]]
    log(f"correctness: {len(rows)} checks, {len(failed)} failed; worst relative error per dtype {worst}")
    return rows


def check_op_and_int8(device, smoke: bool) -> list[dict]:
    """The registered op end to end (its CUDA dispatch) in fp16 with autograd, and the int8 GEMM."""
    from lowbit.formats import WeightFormat
    from lowbit.kernels import ops
    from lowbit.kernels.int8_gemm import int8_scaled_mm
    from lowbit.kernels.lut4 import lut4_weight

    rows = []
    fmt = WeightFormat("nf4", 64, True)
    n, k = (256, 512) if not smoke else (32, 64)
    storage = fmt.encode(torch.randn(n, k, device=device))
    w = lut4_weight(fmt, storage, (n, k))
    dense = fmt.decode(storage, (n, k), torch.float32).double()
    for m in (1, 5, 130):
        x = torch.randn(m, k, device=device, dtype=torch.float16, requires_grad=True)
        y = ops.lut4_linear(x, w.packed, w.table, w.scale, None, w.nested_code, w.nested_scale, w.offset, n, 64, True)
        g = torch.randn_like(y)
        y.backward(g)
        e = max(rel_err(y, x.detach().double() @ dense.t()), rel_err(x.grad, g.double() @ dense))
        rows.append({"format": "op nf4+dq fp16 autograd", "shape": (m, n, k), "max_rel_err": e,
                     "failed": {} if e < 5e-3 else {"op": e}})  # fmt: skip
    # int8 W8A8 GEMM: exact integer products, then the scales.
    for m, n, k in [(300, 384, 1024), (7, 100, 72)] if not smoke else [(19, 24, 72)]:
        a = torch.randint(-127, 128, (m, k), dtype=torch.int8, device=device)
        b = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=device)
        sa, sb = torch.rand(m, device=device) + 0.5, torch.rand(n, device=device) + 0.5
        ref = (a.double() @ b.double().t()) * sa.double()[:, None] * sb.double()[None, :]
        cfg = None if device.type == "cuda" else {"BM": 16, "BN": 16, "BK": 32, "num_warps": 4, "num_stages": 1}
        e = rel_err(int8_scaled_mm(a, b, sa, sb, torch.float32, config=cfg), ref)
        rows.append({"format": "int8_scaled_mm", "shape": (m, n, k), "max_rel_err": e,
                     "failed": {} if e < 1e-6 else {"int8": e}})  # fmt: skip
    return rows


def check_against_bitsandbytes(device) -> dict:
    """lowbit's kernels on bitsandbytes' own NF4 + DQ bytes must reproduce bnb's matmul_4bit."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    from lowbit.kernels import Lut4Weight
    from lowbit.kernels.lut4_gemm import lut4_dequantize
    from lowbit.kernels.lut4_gemv import lut4_gemv

    n, k = 4096, 4096
    wd = torch.randn(n, k, device=device, dtype=torch.bfloat16)
    packed, st = bnbf.quantize_4bit(wd, blocksize=64, compress_statistics=True, quant_type="nf4")
    w = Lut4Weight(packed.reshape(-1), st.code.float(), st.absmax, None, st.state2.code.float(), st.state2.absmax,
                   st.offset.reshape(1).float(), n, k, 64, True)  # fmt: skip
    out = {}
    for m in (1, 8, 512):
        x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
        ref = bnb.matmul_4bit(x, packed.t(), quant_state=st)
        mine = lut4_gemv(x, w) if m <= 8 else x @ lut4_dequantize(w, x.dtype).t()
        out[f"M={m}"] = rel_err(mine, ref)
    log(f"lowbit kernels on bnb's NF4+DQ bytes vs bnb.matmul_4bit, relative difference: {out}")
    return out


# ------------------------------------------------------------------------------------------ benchmarks
def make_weights(n, k, device, n_rot, with_bnb: bool):
    """n_rot copies of one NF4+DQ weight for lowbit (own quantizer) and bnb, plus dense bf16 copies."""
    from lowbit.formats import WeightFormat
    from lowbit.kernels.lut4 import lut4_weight

    fmt = WeightFormat("nf4", 64, True)
    dense = torch.randn(n, k, device=device, dtype=torch.bfloat16)
    storage = fmt.encode(dense)
    lw = [lut4_weight(fmt, {name: t.clone() for name, t in storage.items()}, (n, k)) for _ in range(n_rot)]
    bw = []
    if with_bnb:
        import bitsandbytes.functional as bnbf

        for _ in range(n_rot):
            packed, st = bnbf.quantize_4bit(dense, blocksize=64, compress_statistics=True, quant_type="nf4")
            bw.append((packed, st))
    dense_copies = [dense.clone() for _ in range(max(2, min(n_rot, (2 << 30) // (2 * n * k))))]
    return lw, bw, dense_copies


def memory_table(fn):
    """fn with the PTX register lookup switched off (`lut4_asm`): the kernels' table lookups from memory."""

    def call(i):
        os.environ["LOWBIT_NO_PTX_LUT"] = "1"
        try:
            return fn(i)
        finally:
            del os.environ["LOWBIT_NO_PTX_LUT"]

    return call


def decode_benchmark(device, ceil: dict, with_bnb: bool, smoke: bool) -> list[dict]:
    import torch.nn.functional as F

    from lowbit.kernels import lut4_gemv_half2, ops
    from lowbit.kernels.lut4_gemm import lut4_dequantize
    from lowbit.kernels.lut4_gemv import _lut4_gemv_tuned, lut4_gemv

    if with_bnb:
        import bitsandbytes as bnb
    shapes = DECODE_SHAPES if not smoke else [(64, 128)]
    rows = []
    for n, k in shapes:
        nbytes4 = n * k // 2 + n * k // 64 + 4 * (n * k // 64 // 256) + 4
        n_rot = max(2, -(-300_000_000 // nbytes4)) if not smoke else 2  # ≥ 300 MB cycled: 6× an H100's L2
        lw, bw, dense = make_weights(n, k, device, n_rot, with_bnb)
        for m in (1, 4, 8):
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)

            def op(i, x=x):  # as the static decoder's graphs run it (timed here as graph replays too)
                w = lw[i]
                with ops.for_graph_replay():
                    return ops.lut4_linear(x, w.packed, w.table, w.scale, None, w.nested_code, w.nested_scale,
                                           w.offset, n, 64, True)  # fmt: skip

            cv = None if not smoke else SMOKE_GEMV  # autotuned on the GPU
            contenders = {
                "lowbit": (op, n_rot),
                "lowbit gemv": (lambda i, x=x: lut4_gemv(x, lw[i], cv), n_rot),
                "gemv mem-table": (memory_table(lambda i, x=x: lut4_gemv(x, lw[i], cv)), n_rot),
                "lowbit deq+cuBLAS": (lambda i, x=x: F.linear(x, lut4_dequantize(lw[i], x.dtype)), n_rot),
                "bf16": (lambda i, x=x: F.linear(x, dense[i]), len(dense)),
            }
            if lut4_gemv_half2.supports(x, lw[0]):  # the half2 word GEMV alone (the op adds its dispatch)
                ch = None if not smoke else {"BN": 8, "BK": 128, "num_warps": 4}
                contenders["half2"] = (lambda i, x=x: lut4_gemv_half2.lut4_gemv_half2(x, lw[i], ch), n_rot)
            if with_bnb:
                contenders["bnb"] = (lambda i, x=x: bnb.matmul_4bit(x, bw[i][0].t(), quant_state=bw[i][1]), n_rot)
            t, t_flush = {}, {}
            for name, (fn, rot) in contenders.items():
                t[name] = guarded(lambda: graph_time_us(fn, rot, device))
                t_flush[name] = guarded(lambda: bench_us(rotating(fn, rot), device))
            best = getattr(_lut4_gemv_tuned, "best_config", None)
            if "half2" in t:
                best = f"{best}; half2 {getattr(lut4_gemv_half2._half2_tuned, 'best_config', None)}"
            moved = nbytes4 + 2 * m * k + 2 * m * n
            row = {"shape": f"{n}x{k}", "M": m, "us": t, "us_do_bench_flushed": t_flush, "gemv_config": str(best),
                   "lowbit_GBps": moved / t["lowbit"] / 1e3,
                   "frac_copy_bw": moved / t["lowbit"] / 1e3 / ceil["copy_GBps"],
                   "vs_bnb": t.get("bnb", float("nan")) / t["lowbit"], "vs_bf16": t["bf16"] / t["lowbit"]}  # fmt: skip
            rows.append(row)
            log(f"decode {row['shape']} M={m}: " + ", ".join(f"{a} {b:.1f} us" for a, b in t.items())
                + f" | {row['lowbit_GBps']:.0f} GB/s = {row['frac_copy_bw']:.0%} of copy, "
                f"{row['vs_bnb']:.2f}x bnb, {row['vs_bf16']:.2f}x bf16 | gemv {best}")  # fmt: skip
        del lw, bw, dense
        torch.cuda.empty_cache() if device.type == "cuda" else None
    return rows


def prefill_benchmark(device, ceil: dict, with_bnb: bool, smoke: bool) -> list[dict]:
    import torch.nn.functional as F

    from lowbit.kernels import ops
    from lowbit.kernels.lut4_gemm import lut4_dequantize, lut4_gemm, lut4_gemm_grad_input

    if with_bnb:
        import bitsandbytes as bnb
    shapes = DECODE_SHAPES if not smoke else [(64, 128)]
    ms = PREFILL_M if not smoke else (32,)
    rows = []
    for n, k in shapes:
        lw, bw, dense = make_weights(n, k, device, 4 if not smoke else 1, with_bnb)
        rot = {"i": 0}

        def nxt(seq):
            rot["i"] += 1
            return seq[rot["i"] % len(seq)]

        for m in ms:
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            flops = 2 * m * n * k

            def op(x=x):
                w = nxt(lw)
                return ops.lut4_linear(x, w.packed, w.table, w.scale, None, w.nested_code, w.nested_scale,
                                       w.offset, n, 64, True)  # fmt: skip

            fused_cfg = {"BM": 128, "BN": 128, "BK": 64, "num_warps": 8, "num_stages": 3} if not smoke else SMOKE_GEMM
            timed = {
                "lowbit": op,  # the registered op: Triton decode of W (autotuned launch) + cuBLAS at this M
                "lowbit one-tile decode": lambda x=x: F.linear(x, lut4_dequantize(nxt(lw), x.dtype, (16, 256))),
                "bf16 cuBLAS": lambda x=x: F.linear(x, nxt(dense)),
            }
            if with_bnb:
                timed["bnb"] = lambda x=x: (lambda p: bnb.matmul_4bit(x, p[0].t(), quant_state=p[1]))(nxt(bw))
            if m == ms[0]:  # the fused Triton GEMM (both operand orders), and QLoRA's backward dX = dY · W
                timed["fused swap"] = lambda x=x: lut4_gemm(x, nxt(lw), fused_cfg | {"SWAP": True})
                timed["fused noswap"] = lambda x=x: lut4_gemm(x, nxt(lw), fused_cfg | {"SWAP": False})
                g = torch.randn(m, n, device=device, dtype=torch.bfloat16)
                timed["dX lowbit"] = lambda g=g: (lambda w: ops.lut4_linear_grad_input(
                    g, w.packed, w.table, w.scale, None, w.nested_code, w.nested_scale, w.offset, k, 64, True))(nxt(lw))
                timed["dX fused"] = lambda g=g: lut4_gemm_grad_input(g, nxt(lw), fused_cfg)
                timed["dX bf16 cuBLAS"] = lambda g=g: g @ nxt(dense)
            t = {name: guarded(lambda: bench_us(fn, device)) for name, fn in timed.items()}
            tf = {a: flops / b / 1e6 for a, b in t.items()}
            row = {"shape": f"{n}x{k}", "M": m, "us": t, "TFLOPs": tf,
                   "vs_cublas": t["bf16 cuBLAS"] / t["lowbit"], "vs_bnb": t.get("bnb", float("nan")) / t["lowbit"],
                   "fused_vs_cublas": t["bf16 cuBLAS"] / min(t.get("fused swap", float("inf")),
                                                            t.get("fused noswap", float("inf"))),
                   "dX_vs_cublas": t["dX bf16 cuBLAS"] / t["dX lowbit"] if "dX lowbit" in t else None,
                   "frac_matmul_peak": tf["lowbit"] / ceil["bf16_matmul_TFLOPs"]}  # fmt: skip
            rows.append(row)
            log(f"prefill {row['shape']} M={m}: " + ", ".join(f"{a} {v:.0f} TFLOP/s" for a, v in tf.items())
                + f" | lowbit {row['vs_cublas']:.2f}x cuBLAS, {row['vs_bnb']:.2f}x bnb")  # fmt: skip
        del lw, bw, dense
        torch.cuda.empty_cache() if device.type == "cuda" else None
    return rows


def int8_benchmark(device, smoke: bool) -> list[dict]:
    """W8A8 GEMM: lowbit's fused-scale int8 kernel vs torch._int_mm (+ scales) vs bf16 cuBLAS."""
    import torch.nn.functional as F

    from lowbit.kernels import ops

    rows = []
    for m, n, k in [(2048, 4096, 4096), (2048, 14336, 4096)] if not smoke else [(32, 64, 128)]:
        a = torch.randint(-127, 128, (m, k), dtype=torch.int8, device=device)
        b = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=device)
        sa, sb = torch.rand(m, device=device), torch.rand(n, device=device)
        xa, wb = a.bfloat16(), b.bfloat16()
        bt = b.t()  # (K, N) column-major view of b, the layout cuBLASLt's int8 GEMM takes
        t = {"lowbit int8": guarded(lambda: bench_us(lambda: ops.int8_scaled_mm(a, b, sa, sb, torch.bfloat16), device))}
        if device.type == "cuda":
            t["torch._int_mm+scale"] = guarded(lambda: bench_us(
                lambda: (torch._int_mm(a, bt).float() * sa[:, None] * sb[None, :]).bfloat16(), device))
        t["bf16 cuBLAS"] = guarded(lambda: bench_us(lambda: F.linear(xa, wb), device))
        tops = {name: 2 * m * n * k / us / 1e6 for name, us in t.items()}
        rows.append({"shape": (m, n, k), "us": t, "TOPs": tops})
        log(f"int8 W8A8 {m}x{n}x{k}: " + ", ".join(f"{a_} {v:.0f} TOP/s" for a_, v in tops.items()))
    return rows


def print_tables(ceil, decode, prefill):
    nan = float("nan")
    log("\n=== ceilings: copy %.0f GB/s, bf16 matmul %.0f TFLOP/s" % (ceil["copy_GBps"], ceil["bf16_matmul_TFLOPs"]))
    log("=== decode (NF4+DQ, block 64, bf16 x), µs per call, CUDA-graph replay, weights rotated")
    log(f"{'shape':>11} {'M':>2} {'lowbit':>7} {'gemv':>7} {'memtab':>7} {'half2':>7} {'deq+cB':>7} "
        f"{'bnb':>7} {'bf16':>7} {'GB/s':>6} {'%copy':>6} {'xbnb':>5} {'xbf16':>5}")  # fmt: skip
    for r in decode:
        t = r["us"]
        log(f"{r['shape']:>11} {r['M']:>2} {t['lowbit']:7.1f} {t['lowbit gemv']:7.1f} {t['gemv mem-table']:7.1f} "
            f"{t.get('half2', nan):7.1f} "
            f"{t['lowbit deq+cuBLAS']:7.1f} {t.get('bnb', nan):7.1f} "
            f"{t['bf16']:7.1f} {r['lowbit_GBps']:6.0f} {r['frac_copy_bw']:6.1%} {r['vs_bnb']:5.2f} {r['vs_bf16']:5.2f}")
    log("=== prefill (NF4+DQ, bf16), TFLOP/s (do_bench median); lowbit = the op (Triton decode + cuBLAS)")
    log(f"{'shape':>11} {'M':>5} {'lowbit':>6} {'1tile':>6} {'cuBLAS':>6} {'bnb':>6} {'xcuBLAS':>7} {'xbnb':>5} "
        f"{'fusedS':>6} {'fusedN':>6} {'dX':>5} {'dXfus':>5} {'dXcB':>5}")  # fmt: skip
    for r in prefill:
        tf = r["TFLOPs"]
        log(f"{r['shape']:>11} {r['M']:>5} {tf['lowbit']:6.0f} {tf.get('lowbit one-tile decode', nan):6.0f} "
            f"{tf['bf16 cuBLAS']:6.0f} {tf.get('bnb', nan):6.0f} "
            f"{r['vs_cublas']:7.2f} {r['vs_bnb']:5.2f} {tf.get('fused swap', nan):6.0f} "
            f"{tf.get('fused noswap', nan):6.0f} {tf.get('dX lowbit', nan):5.0f} {tf.get('dX fused', nan):5.0f} "
            f"{tf.get('dX bf16 cuBLAS', nan):5.0f}")  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp/lowbit_bench"),
                   help="folder for kernels.json (every number)")  # fmt: skip
    p.add_argument("--skip-correctness", action="store_true", help="only the ceilings and the benchmarks")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (Triton interpreter)")
    p.add_argument("--decode-only", action="store_true", help="only the ceilings and benchmark 1 (decode)")
    p.add_argument("--prefill-only", action="store_true", help="only the ceilings and benchmark 2 (prefill)")
    args = p.parse_args(argv)
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    import triton

    env = {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
           "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (smoke)"}  # fmt: skip
    try:
        import bitsandbytes

        env["bitsandbytes"] = bitsandbytes.__version__
        with_bnb = device.type == "cuda"
    except ImportError:
        with_bnb = False
    if device.type == "cuda":
        prop = torch.cuda.get_device_properties(device)
        env |= {"sms": prop.multi_processor_count, "L2_MB": getattr(prop, "L2_cache_size", 0) / 2**20,
                "cuda": torch.version.cuda}  # fmt: skip
    log(f"environment: {env}")
    results = {"env": env, "command": " ".join(sys.argv)}
    results["ceilings"] = ceil = ceilings(device, args.smoke)
    if not args.skip_correctness:
        results["correctness"] = check_correctness(device, args.smoke)
        if with_bnb:
            results["bnb_bytes"] = check_against_bitsandbytes(device)
    decode, prefill = [], []
    if not args.prefill_only:
        results["decode"] = decode = decode_benchmark(device, ceil, with_bnb, args.smoke)
    if not args.decode_only:
        results["prefill"] = prefill = prefill_benchmark(device, ceil, with_bnb, args.smoke)
        if not args.prefill_only:
            results["int8"] = int8_benchmark(device, args.smoke)
    print_tables(ceil, decode, prefill)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kernels.json").write_text(json.dumps(results, indent=1, default=str))
    failed = [r for r in results.get("correctness", []) if r["failed"]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
