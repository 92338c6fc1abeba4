"""GPU kernels for low-bit matmuls, each a registered op with a pure-PyTorch reference.

- 4-bit lookup weights (NF4/FP4/E2M1 blockwise absmax with double quantization, int4 groups; the
  LUT4 layout in `lut4.py`): dequant-fused GEMV for decode (`lut4_gemv.py`), a one-pass decoder and
  dequant-fused GEMM forward / input-gradient kernels (`lut4_gemm.py`), all reading tiles through
  `lut4_tile.py`; op `lowbit::lut4_linear` (+ `lowbit::lut4_linear_grad_input` for autograd), which
  on CUDA runs the GEMV at M ≤ 4 and decode + cuBLAS above (see `ops.py` and bench/RESULTS.md).
- int8 × int8 GEMM with fused row/column scales for W8A8 (`int8_gemm.py`); op `lowbit::int8_scaled_mm`.
- `select` / `fused_linear` (`dispatch.py`): the explicit kernel choice of `QuantLinear`.
- Fused training ops (issue 8), each an autograd Function with a hand-written backward, a torch
  reference and a Triton kernel (`train_triton.py`): `norms.rms_norm`, `swiglu.swiglu`, `rope.apply_rope`,
  `cross_entropy.linear_cross_entropy` (chunked, never the (tokens, vocab) logits), `lora_fused.qlora_linear`
  (4-bit base + LoRA in one node); `fuse_for_training(model)` (`fuse.py`) swaps them into a Llama-family model.

Triton is optional (`pip install 'lowbit[gpu]'`): without it the ops run their torch references and
`select("auto", …)` keeps the dequantize-then-matmul path. Importing this package never imports Triton.
"""

from lowbit.kernels.dispatch import KERNEL_CHOICES, fused_linear, select, triton_available
from lowbit.kernels.lut4 import Lut4Weight, dequantize, lut4_weight, supports
from lowbit.kernels.ops import int8_scaled_mm, lut4_linear, lut4_linear_grad_input

__all__ = [
    "KERNEL_CHOICES", "Lut4Weight", "dequantize", "fuse_for_training", "fused_linear", "int8_scaled_mm",
    "lut4_linear", "lut4_linear_grad_input", "lut4_weight", "select", "supports", "triton_available",
]  # fmt: skip


def fuse_for_training(model, **kwargs) -> dict:
    """Route a Llama / Qwen2 / Mistral model through the fused training ops; see `lowbit.kernels.fuse`.

    Imported on call: the fused LoRA layer builds on lowbit.peft, which itself imports this package.
    """
    from lowbit.kernels.fuse import fuse_for_training as fuse

    return fuse(model, **kwargs)
