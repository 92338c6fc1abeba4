"""Probe (issue 7, prefill GEMM): does decoding W in row chunks into an L2-sized buffer, each chunk multiplied
by cuBLAS right after its decode, beat decoding all of W first? (The op writes the whole bf16 W, which at
14336×4096 does not fit the H100's 50 MB L2.) Prints µs per call (do_bench, median) for bf16 cuBLAS, the op's
path (decode all, then one GEMM), and chunked variants: y[:, rows] = x·W_chunkᵀ written through a strided
output (A), or yᵀ[rows] = W_chunk·xᵀ (B, contiguous; y is then a transposed view).

    python3 bench/gemm_chunk_probe.py            # GPU; on the CPU (TRITON_INTERPRET=1) a small correctness run
"""

import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "src")]
from lowbit.formats import WeightFormat  # noqa: E402
from lowbit.kernels.lut4 import Lut4Weight, lut4_weight  # noqa: E402
from lowbit.kernels.lut4_gemm import lut4_dequantize  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def rows(w: Lut4Weight, n0: int, n1: int) -> Lut4Weight:
    """Rows n0:n1 of a weight whose rows hold whole groups (flat blocks too, then), n0·groups a multiple of the
    nested block (256 groups)."""
    g = w.in_features // w.group_size
    assert w.in_features % w.group_size == 0 and (n0 * g) % 256 == 0
    half = w.in_features // 2
    nested = w.nested_scale[n0 * g // 256 : -(-n1 * g // 256)] if w.double_quant else None
    return w._replace(packed=w.packed[n0 * half : n1 * half], scale=w.scale[n0 * g : n1 * g], nested_scale=nested,
                      out_features=n1 - n0)  # fmt: skip


def chunked_a(x, w, c, y):
    for n0 in range(0, w.out_features, c):
        n1 = min(n0 + c, w.out_features)
        torch.mm(x, lut4_dequantize(rows(w, n0, n1), x.dtype).t(), out=y[:, n0:n1])
    return y


def chunked_b(x, w, c, yt):
    xt = x.t()
    for n0 in range(0, w.out_features, c):
        n1 = min(n0 + c, w.out_features)
        torch.mm(lut4_dequantize(rows(w, n0, n1), x.dtype), xt, out=yt[n0:n1])
    return yt.t()


def main() -> None:
    fmt = WeightFormat("nf4", 64, True)
    shapes = [(4096, 4096), (14336, 4096), (4096, 14336)] if DEV == "cuda" else [(256, 512)]
    m = 2048 if DEV == "cuda" else 64
    if DEV == "cuda":
        import triton

        bench = lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3  # noqa: E731
    for n, k in shapes:
        dense = torch.randn(n, k, device=DEV, dtype=torch.bfloat16)
        w = lut4_weight(fmt, fmt.encode(dense), (n, k))
        x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
        wd = lut4_dequantize(w, torch.bfloat16)
        ref = x.float() @ wd.float().t()
        y = torch.empty(m, n, device=DEV, dtype=torch.bfloat16)
        yt = torch.empty(n, m, device=DEV, dtype=torch.bfloat16)
        runs = {"cuBLAS bf16": lambda: x @ wd.t(), "op path (decode all, one GEMM)": lambda: x @ lut4_dequantize(w).t(),
                "decode alone": lambda: lut4_dequantize(w)}  # fmt: skip
        for c in (4096, 2048, 1024) if DEV == "cuda" else (64,):
            if c < n:
                runs[f"A chunks of {c} rows"] = lambda c=c: chunked_a(x, w, c, y)
                runs[f"B chunks of {c} rows"] = lambda c=c: chunked_b(x, w, c, yt)
        for name, fn in runs.items():
            out = fn()
            if out.shape == ref.shape:
                err = float((out.float() - ref).abs().max() / ref.abs().max())
                assert err < 2e-2, (name, err)
            if DEV == "cuda":
                t = bench(fn)
                base = t if name == "cuBLAS bf16" else base
                print(f"{n}x{k} M={m} {name}: {t:.1f} us, x cuBLAS {base / t:.3f}", flush=True)
            else:
                print(f"{n}x{k} M={m} {name}: ok", flush=True)


if __name__ == "__main__":
    main()
