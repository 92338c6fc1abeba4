"""Which kernel a QuantLinear runs: an explicit choice, resolved per call from the input's device.

- "dequant": decode W to a dense matrix, then a plain matmul (lowbit's original path, every format,
  every device; the CPU path).
- "fused": the registered `lowbit::lut4_linear` op (Triton kernels on CUDA, the torch reference
  elsewhere) for the 4-bit lookup formats (nf4, fp4, e2m1, int4).
- "auto" (the default): "fused" when the input is on CUDA, the format is a 4-bit lookup format and
  Triton is installed; otherwise "dequant". On a CPU nothing changes.

Nothing is switched globally or behind the user's back: the choice is the module's `kernel`
attribute, and `select` says what it resolves to.
"""

from __future__ import annotations

import importlib.util
from functools import cache

import torch

from lowbit.formats.weight import WeightFormat
from lowbit.kernels import ops
from lowbit.kernels.lut4 import lut4_weight, supports

KERNEL_CHOICES = ("auto", "dequant", "fused")


@cache  # find_spec walks sys.path (~36 µs), and the fused ops ask on every call
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def select(kernel: str, fmt: WeightFormat, device: torch.device | str) -> str:
    """Resolve a kernel choice for a weight format and an input device to "dequant" or "fused"."""
    if kernel not in KERNEL_CHOICES:
        raise ValueError(f"unknown kernel {kernel!r}; choose one of {KERNEL_CHOICES}")
    device = torch.device(device)
    if kernel == "dequant":
        return "dequant"
    if kernel == "fused":
        if not supports(fmt):
            raise ValueError(f"kernel='fused' takes the 4-bit lookup formats (nf4, fp4, e2m1, int4), not "
                             f"{fmt.name!r}; use kernel='dequant' or 'auto'")  # fmt: skip
        if device.type == "cuda" and not triton_available():
            raise RuntimeError("kernel='fused' on CUDA needs Triton: pip install 'lowbit[gpu]'")
        return "fused"
    return "fused" if device.type == "cuda" and supports(fmt) and triton_available() else "dequant"


def direct_cuda(x: torch.Tensor) -> bool:
    """Whether to call the CUDA kernels without the custom op, whose dispatch costs ~100 µs of host time a call
    (bench/RESULTS.md, session 17): on CUDA, outside torch.compile (which traces ops, not Triton launches).
    The op stays on the CPU (its reference)."""
    return x.is_cuda and not torch.compiler.is_compiling()


def fused_linear(
    x: torch.Tensor, fmt: WeightFormat, storage: dict[str, torch.Tensor], shape: tuple[int, int]
) -> torch.Tensor:
    """y = x · Wᵀ, x (…, K) → (…, N), through `lowbit::lut4_linear` (differentiable in x); where no gradient
    is wanted (inference: generation calls every linear once a token, so host time adds up) the CUDA kernels
    directly."""
    w = lut4_weight(fmt, storage, shape)
    x2 = x.reshape(-1, w.in_features)
    if direct_cuda(x) and not (x.requires_grad and torch.is_grad_enabled()):
        y = ops.linear_cuda(x2, w)
    else:
        y = ops.lut4_linear(x2, w.packed, w.table, w.scale, w.zero_point, w.nested_code, w.nested_scale, w.offset,
                            w.out_features, w.group_size, w.flat)  # fmt: skip
    return y.reshape(*x.shape[:-1], w.out_features)


BACKENDS = ("auto", "torch", "triton")


def use_triton(x: torch.Tensor, backend: str) -> bool:
    """Whether a fused training op (norms, swiglu, rope, cross_entropy, lora_fused) runs its Triton kernel.

    "auto": on CUDA when Triton is installed; "torch": the reference; "triton": always (on the CPU only
    under TRITON_INTERPRET=1, which is how the tests run the kernels without a GPU).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if backend == "auto":
        return x.is_cuda and triton_available()
    return backend == "triton"


def autocast_dtype(device: torch.device, default: torch.dtype) -> torch.dtype:
    """The dtype autocast would run a matmul in on `device` right now, else `default`.

    The fused Functions do their matmuls with autocast switched off (their backward runs outside it, and
    mixed dtypes there would fail), casting explicitly to this dtype instead: the same precision the
    unfused path gets from autocast.
    """
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else default
