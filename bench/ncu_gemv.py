"""The batch-1 decode GEMVs at 14336×4096, launched a few times each, for Nsight Compute to profile
(bench/device_run.sh s19d): lowbit's half2 word GEMV (its fastest launch in session 19's sweep) and
bitsandbytes' `matmul_4bit` on the same NF4 + double-quant weight. An argument, a JSON launch, replaces the
half2 launch (e.g. '{"BN": 32, "BK": 1024, "num_warps": 16, "SMEM": true, "AHEAD": true}')."""

import json
import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1] / "src")]

from gpu_kernels import make_weights  # noqa: E402

from lowbit.kernels.lut4_gemv_half2 import lut4_gemv_half2  # noqa: E402

lw, bw, _ = make_weights(14336, 4096, torch.device("cuda"), 1, True)
x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
config = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {"BN": 4, "BK": 1024, "num_warps": 1}
for _ in range(4):
    lut4_gemv_half2(x, lw[0], config)
try:
    import bitsandbytes as bnb

    for _ in range(4):
        bnb.matmul_4bit(x, bw[0][0].t(), quant_state=bw[0][1])
except ImportError:
    pass
torch.cuda.synchronize()
