"""The half2 GEMV on the GPU against float32: register and shared-table launches, then (CUDA) programmatic
dependent launch, eager and as CUDA-graph replays, over activations of different scales, so that every
result must have waited for its own prepared x. bench/device_run.sh runs it before the sweeps, and under
compute-sanitizer (`smemdebug`) where a launch faults. Off the GPU it runs the launches under Triton's
interpreter.

    python3 bench/half2_gpu_check.py
"""
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "src")]
import torch  # noqa: E402

from lowbit.formats import WeightFormat  # noqa: E402
from lowbit.kernels.lut4 import lut4_weight  # noqa: E402
from lowbit.kernels.lut4_gemm import lut4_dequantize  # noqa: E402
from lowbit.kernels.lut4_gemv_half2 import lut4_gemv_half2  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
fmt = WeightFormat("nf4", 64, True)
n, k = 256, 1024
dense = torch.randn(n, k, device=DEV, dtype=torch.bfloat16)
w = lut4_weight(fmt, fmt.encode(dense), (n, k))
x = torch.randn(1, k, device=DEV, dtype=torch.bfloat16)
ref = x.float() @ lut4_dequantize(w, torch.float32).t()
for cfg in ([dict(BN=8, BK=256, num_warps=4, SMEM=False)] + [dict(BN=bn, BK=bk, num_warps=wp, SMEM=True)
            for bn, bk, wp in ((8, 256, 4), (4, 256, 2), (16, 1024, 4))]):  # fmt: skip
    y = lut4_gemv_half2(x, w, cfg)
    torch.cuda.synchronize() if DEV == "cuda" else None
    print(cfg, "rel err", float((y.float() - ref).abs().max() / ref.abs().max()), flush=True)

# programmatic dependent launch: the GEMV starts while x is prepared; every result must see its own x
if DEV == "cuda":
    cfg = dict(BN=32, BK=512, num_warps=4, SMEM=True, AHEAD=True)
    xs = [torch.randn(1, k, device=DEV, dtype=torch.bfloat16) * (10.0 ** (i % 5 - 2)) for i in range(16)]
    refs = [xi.float() @ lut4_dequantize(w, torch.float32).t() for xi in xs]
    worst = max(float((lut4_gemv_half2(xi, w, cfg).float() - r).abs().max() / r.abs().max()) for xi, r in zip(xs, refs))
    print("eager, 16 activations of different scales: worst rel err", worst, flush=True)
    static_x = xs[0].clone()
    lut4_gemv_half2(static_x, w, cfg)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = lut4_gemv_half2(static_x, w, cfg)
    worst = 0.0
    for xi, r in zip(xs, refs):
        static_x.copy_(xi)
        graph.replay()
        worst = max(worst, float((static_y.float() - r).abs().max() / r.abs().max()))
    torch.cuda.synchronize()
    print("graph replays: worst rel err", worst, flush=True)
    assert worst < 2e-2
