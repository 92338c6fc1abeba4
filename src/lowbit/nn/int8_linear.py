"""Int8Linear: LLM.int8() — vector-wise int8 matmul with the outlier columns of X kept in floating point.

Dettmers et al. 2022, "LLM.int8(): 8-bit Matrix Multiplication for Transformers at Scale", §3:

- vector-wise quantization (eq. 5): every row of X (a token) and every row of W (an output channel) gets
  its own absmax scale, `X ≈ s_x · X_q`, `W ≈ s_w · W_q` with levels in [-127, 127]; then
  `X Wᵀ ≈ (s_x s_wᵀ) ⊙ (X_q W_qᵀ)`, the product accumulated exactly in int32.
- mixed-precision decomposition (eq. 7): the input columns O = { j : any |X_ij| ≥ threshold } (default
  6.0) carry the emergent outlier features; they are multiplied in floating point and only the rest go
  through int8:  `Y = X[:, O] Ŵ[:, O]ᵀ + (s_x s_wᵀ) ⊙ (Q(X[:, ¬O]) W_q[:, ¬O]ᵀ)`.

As in bitsandbytes' inference layer, only the int8 weight is stored (`weight`, int8 per row, and
`weight_scale` = absmax / 127, the `WeightFormat("int8")` layout), and the outlier columns use its
dequantization Ŵ. The outlier set is chosen anew for every input, at run time.

`int8_matmul` computes the int8 × int8 → int32 product exactly: `torch._int_mm` on CUDA, float32 GEMMs on
chunks short enough to be exact on CPU (faster there than torch's CPU `_int_mm`), float64 elsewhere.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lowbit.formats.weight import WeightFormat
from lowbit.nn.quant_linear import QuantLinear

INT8_ROWWISE = WeightFormat("int8", group_size=None, symmetric=True)  # one absmax scale per output row
_TINY = torch.finfo(torch.float32).tiny


INT8_BACKENDS = ("int_mm", "float32", "float64")
_EXACT_F32_K = 1040  # 127² · K < 2^24: every partial sum of a K-long int8 dot product is exact in float32


def int8_matmul(a: torch.Tensor, b: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """(M, K) int8 @ (K, N) int8 → (M, N) int32, exact, by one of three backends:

    - "int_mm": `torch._int_mm` (cuBLASLt int8 GEMM on CUDA; shapes zero-padded to its constraints,
      M > 16 and K, N multiples of 8, which changes no sum, and B column-major as cuBLASLt wants);
    - "float32": float32 GEMMs over chunks of ≤ 1040 columns of K, each exact (|partial sum| ≤ 127²·1040
      < 2^24), added in int32 — the CPU default: torch's CPU `_int_mm` measured ~25× slower than this;
    - "float64": one float64 GEMM (exact below 2^53), for devices without an int8 GEMM.
    Default: int_mm on CUDA, float32 on CPU, float64 elsewhere.
    """
    if a.dtype != torch.int8 or b.dtype != torch.int8:
        raise TypeError(f"int8_matmul takes int8 operands, got {a.dtype} and {b.dtype}")
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"int8_matmul needs (M, K) @ (K, N), got {tuple(a.shape)} @ {tuple(b.shape)}")
    if backend is None:
        backend = {"cuda": "int_mm", "cpu": "float32"}.get(a.device.type, "float64")
    if backend == "int_mm" and hasattr(torch, "_int_mm"):
        m, k = a.shape
        n = b.shape[1]
        if a.device.type != "cuda":
            return torch._int_mm(a, b)
        pad_m, pad_k, pad_n = max(17 - m, 0), -k % 8, -n % 8
        if pad_m or pad_k:
            a = F.pad(a, (0, pad_k, 0, pad_m))
        if pad_k or pad_n:
            b = F.pad(b, (0, pad_n, 0, pad_k))
        b = b if b.stride(0) == 1 else b.t().contiguous().t()  # cuBLASLt's int8 GEMM takes B column-major ("TN")
        return torch._int_mm(a.contiguous(), b)[:m, :n]
    if backend == "float32":
        out = torch.zeros(a.shape[0], b.shape[1], dtype=torch.int32, device=a.device)
        for k0 in range(0, a.shape[1], _EXACT_F32_K):
            out += (a[:, k0 : k0 + _EXACT_F32_K].float() @ b[k0 : k0 + _EXACT_F32_K].float()).to(torch.int32)
        return out
    if backend not in INT8_BACKENDS:
        raise ValueError(f"unknown int8 matmul backend {backend!r}; choose one of {INT8_BACKENDS}")
    return (a.double() @ b.double()).to(torch.int32)  # float64, or int_mm where torch lacks it


def quantize_rows_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row absmax int8 (eq. 5): (M, K) float → (M, K) int8 levels in [-127, 127], (M,) float32 scales."""
    x = x.float()
    scale = (x.abs().amax(dim=1) / 127).clamp(min=_TINY)  # all-zero rows stay zero
    return torch.round(x / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def llm_int8_matmul(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, threshold: float, dtype: torch.dtype
) -> torch.Tensor:
    """Eq. (7): (M, K) x, (N, K) int8 weight, (N,) scales → (M, N) float32."""
    outlier = (x.abs() >= threshold).any(dim=0)  # (K,) columns holding an outlier feature
    xq, sx = quantize_rows_int8(x.masked_fill(outlier, 0))  # the regular part, outlier columns zeroed
    y = int8_matmul(xq, weight.t()).float() * sx[:, None] * weight_scale.float()[None, :]
    if outlier.any():
        cols = outlier.nonzero().squeeze(1)
        w_cols = weight[:, cols].to(dtype) * weight_scale.to(dtype)[:, None]  # (N, |O|) dequantized columns
        y = y + (x[:, cols].to(dtype) @ w_cols.t()).float()
    return y


def outlier_columns(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """(…, K) → (K,) bool: the columns LLM.int8() would compute in floating point for this input."""
    return (x.reshape(-1, x.shape[-1]).abs() >= threshold).any(dim=0)


class _Int8Matmul(torch.autograd.Function):
    """Forward: `compute(x)`; backward: the gradient through the dequantized weight (straight through)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, module: QuantLinear, compute) -> torch.Tensor:
        ctx.module = module
        return compute(x)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_x = grad_out @ ctx.module.dequantize(grad_out.dtype) if ctx.needs_input_grad[0] else None
        return grad_x, None, None


def check_threshold(threshold: float) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold > 0:
        raise ValueError(f"threshold must be a positive number (math.inf: no outlier columns), got {threshold!r}")
    return float(threshold)


class Int8Linear(QuantLinear):
    """y = LLM.int8(x, W) + b; W stored int8 per row. Gradients reach x through the dequantized weight."""

    # Which columns hold outliers is decided on the host (a data-dependent branch and gather), so a step that
    # contains this layer cannot be captured as a CUDA graph (lowbit.generate.static reads this).
    graph_capturable = False

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        fmt: WeightFormat | None = None,
        compute_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        threshold: float = 6.0,
    ) -> None:
        if (fmt or INT8_ROWWISE) != INT8_ROWWISE:
            raise ValueError(f"Int8Linear stores symmetric int8 rows ({INT8_ROWWISE}), got {fmt}")
        super().__init__(in_features, out_features, bias, INT8_ROWWISE, compute_dtype, device)
        self.threshold = check_threshold(threshold)

    @classmethod
    def from_linear(cls, linear, fmt: WeightFormat | None = None, compute_dtype=None, threshold: float = 6.0):
        """Quantize an `nn.Linear`'s weight to int8 rows (vector-wise, eq. 5)."""
        module = cls.from_storage(linear, INT8_ROWWISE.encode(linear.weight.detach()), fmt or INT8_ROWWISE,
                                  compute_dtype)  # fmt: skip
        module.threshold = check_threshold(threshold)
        return module

    def to_meta(self) -> dict:
        return {**super().to_meta(), "threshold": self.threshold}

    @classmethod
    def from_meta(cls, meta: dict, device="meta") -> Int8Linear:
        module = super().from_meta({k: v for k, v in meta.items() if k != "threshold"}, device)
        module.threshold = check_threshold(meta["threshold"])
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"Int8Linear expects input (…, {self.in_features}), got {tuple(x.shape)}")

        def compute(inp: torch.Tensor) -> torch.Tensor:
            flat = inp.reshape(-1, self.in_features)  # (M, K)
            y = llm_int8_matmul(flat, self.weight, self.weight_scale, self.threshold, self.compute_dtype)
            return y.reshape(*inp.shape[:-1], self.out_features).to(self.compute_dtype)

        y = _Int8Matmul.apply(x.to(self.compute_dtype), self, compute)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        threshold = "inf" if math.isinf(self.threshold) else f"{self.threshold:g}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"threshold={threshold}, compute_dtype={self.compute_dtype}")  # fmt: skip
