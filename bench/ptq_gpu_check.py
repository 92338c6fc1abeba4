"""PTQ modules on a CUDA GPU: same answers as on CPU, int8 GEMM through torch._int_mm, save/load across devices.

Run on a machine with a GPU (CI has none, so this is a script, not a test):

    PYTHONPATH=src:. python bench/ptq_gpu_check.py

Prints one line per check and a small int8-vs-fp16 matmul timing; exits non-zero on the first mismatch.
"""

from __future__ import annotations

import copy
import sys
import tempfile
import time

import torch
from torch import nn

import lowbit
from lowbit.nn import Int8Linear, SpQRLinear, W8A8Linear, int8_matmul
from tests.tiny_models import tiny_llama


def check(name: str, ok: bool, detail: str = "") -> None:
    print(f"{'ok  ' if ok else 'FAIL'} {name} {detail}", flush=True)
    if not ok:
        sys.exit(1)


def int8_gemm_checks(dev: str) -> None:
    g = torch.Generator().manual_seed(0)
    for m, k, n in [(1, 64, 64), (16, 60, 7), (17, 96, 40), (300, 1536, 576)]:  # padding paths and a real shape
        a = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
        b = torch.randint(-127, 128, (k, n), generator=g, dtype=torch.int8)
        out = int8_matmul(a.to(dev), b.to(dev)).cpu()
        check(f"int8_matmul {m}x{k}x{n} (_int_mm)", torch.equal(out.long(), a.long() @ b.long()))


def module_checks(dev: str) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(96, 40)
    x = torch.randn(3, 5, 96) * 2
    x[0, 0, 7] = 20.0  # an outlier column for LLM.int8()
    for module in (Int8Linear.from_linear(linear), W8A8Linear.from_linear(linear),
                   W8A8Linear.from_linear(linear, act_scheme="per_tensor", input_absmax=5.0)):  # fmt: skip
        cpu = module(x)
        gpu = copy.deepcopy(module).to(dev)(x.to(dev)).cpu()
        err = (gpu - cpu).abs().max().item()
        label = f"{type(module).__name__}({getattr(module, 'act_scheme', 'threshold 6')})"
        check(f"{label} GPU == CPU", err < 1e-4, f"max |Δ| {err:.2e}")


def act_order_kernel_check(dev: str) -> None:
    """GPTQ act-order storage read by the fused 4-bit kernel (permuted input) and by dequantization."""
    from lowbit.formats import WeightFormat
    from lowbit.quantize.gptq import GPTQOptions, gptq_linear

    torch.manual_seed(0)
    linear = nn.Linear(256, 128)
    x = torch.randn(64, 256)
    xs = x.double() * torch.linspace(0.1, 3, 256, dtype=torch.float64)  # features of uneven scale
    h = 2 * xs.t() @ xs / 64
    fmt = WeightFormat("int4", group_size=32, symmetric=False)
    module = gptq_linear(linear, h, fmt, GPTQOptions(act_order=True)).to(dev)
    expected = x.double() @ module.dequantize(torch.float64).cpu().t() + linear.bias.double()
    for kernel in ("dequant", "fused"):
        module.kernel = kernel
        for rows in (1, 64):  # GEMV and GEMM
            y = module(x[:rows].to(dev)).cpu().double()
            err = (y - expected[:rows]).abs().max().item()
            check(f"ActOrderQuantLinear int4 g32 kernel={kernel} M={rows}", err < 1e-3, f"max |Δ| {err:.1e}")


def model_checks(dev: str) -> None:
    ids = torch.randint(0, 300, (4, 24), generator=torch.Generator().manual_seed(1))
    configs = {
        "gptq int4 g16 act-order": lowbit.QuantConfig(method="gptq", format="int4", group_size=16,
                                                      options={"act_order": True}),  # fmt: skip
        "llm_int8": lowbit.QuantConfig(method="llm_int8", format="int8"),
        "smoothquant per-token": lowbit.QuantConfig(method="smoothquant", format="int8"),
        "smoothquant per-tensor": lowbit.QuantConfig(method="smoothquant", format="int8",
                                                     options={"act_scheme": "per_tensor"}),  # fmt: skip
        "spqr w3 g16": lowbit.QuantConfig(method="spqr", format="int3", group_size=16),
    }
    for name, config in configs.items():
        kwargs = {} if config.method == "llm_int8" else {"calibration": ids}
        on_cpu, on_gpu = tiny_llama(), tiny_llama().to(dev)
        lowbit.quantize(on_cpu, config, **kwargs)
        lowbit.quantize(on_gpu, config, **kwargs)
        with torch.no_grad():
            ref = tiny_llama()(ids).logits
            a, b = on_cpu(ids).logits, on_gpu(ids.to(dev)).logits.cpu()
        rel = ((a - b).norm() / a.norm()).item()
        err_cpu, err_gpu = ((a - ref).norm() / ref.norm()).item(), ((b - ref).norm() / ref.norm()).item()
        # float32 rounding differs between devices, so a rounding decision may flip: compare the quality
        check(f"{name}: quantized on GPU ≈ on CPU", rel < 0.05 and err_gpu < 1.5 * err_cpu + 1e-3,
              f"GPU vs CPU {rel:.1e}; error vs fp32 CPU {err_cpu:.3f} GPU {err_gpu:.3f}")  # fmt: skip
        with tempfile.TemporaryDirectory() as d:
            lowbit.save_quantized(on_gpu, d)
            loaded = lowbit.load_quantized(d, device="cpu")
            with torch.no_grad():
                c = loaded(ids).logits
            kinds = {type(m).__name__ for m in loaded.modules() if isinstance(m, (lowbit.QuantLinear, SpQRLinear))}
            check(f"{name}: saved on GPU, loaded on CPU", ((c - b).norm() / b.norm()).item() < 1e-4, str(sorted(kinds)))


def timing(dev: str) -> None:
    """int8 × int8 GEMM vs fp16 on a Llama-7B q_proj-sized product (2048 tokens × 4096 × 4096)."""
    a = torch.randint(-127, 128, (2048, 4096), dtype=torch.int8, device=dev)
    w = torch.randint(-127, 128, (4096, 4096), dtype=torch.int8, device=dev)
    ah, wh = a.half(), w.half()
    for name, fn in (("int8 _int_mm", lambda: int8_matmul(a, w.t())), ("fp16 matmul", lambda: ah @ wh.t())):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        ms = (time.perf_counter() - t) / 20 * 1e3
        print(f"time {name}: {ms:.3f} ms, {2 * 2048 * 4096 * 4096 / ms / 1e9:.0f} TOP/s", flush=True)


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("no CUDA device")
    print(torch.__version__, torch.cuda.get_device_name(), flush=True)
    int8_gemm_checks("cuda")
    module_checks("cuda")
    act_order_kernel_check("cuda")
    model_checks("cuda")
    timing("cuda")
