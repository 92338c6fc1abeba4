"""W8A8Linear: int8 weights and int8 activations, one int8 × int8 → int32 matmul (SmoothQuant's layer).

Xiao et al. 2023, "SmoothQuant: Accurate and Efficient Post-Training Quantization for Large Language
Models", §2 and Table 2: W is quantized per output channel, `W ≈ s_w · W_q` (symmetric int8, the
`WeightFormat("int8")` row layout); X is quantized

- per token, dynamically (`act_scheme="per_token"`): every row of X gets its absmax scale at run time;
- per tensor, statically (`act_scheme="per_tensor"`): one scale `input_scale`, precomputed from the
  calibration set's absmax (SmoothQuant's O3 setting), values beyond it saturate at ±127.

Then `Y = (s_x s_wᵀ) ⊙ (X_q W_qᵀ) + b`. SmoothQuant's smoothing (quantize/smoothquant.py) has already
moved the activation outliers into the weights before this layer is built; the layer itself is plain W8A8.
"""

from __future__ import annotations

import torch

from lowbit.formats.weight import WeightFormat
from lowbit.nn.int8_linear import INT8_ROWWISE, _Int8Matmul, int8_matmul, quantize_rows_int8
from lowbit.nn.quant_linear import QuantLinear

ACT_SCHEMES = ("per_token", "per_tensor")


def quantize_static_int8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(M, K) float → int8 levels with one precomputed scale, saturating."""
    return torch.round(x.float() / scale.float()).clamp(-127, 127).to(torch.int8)


class W8A8Linear(QuantLinear):
    """y = s_x s_wᵀ ⊙ (Q(x) W_qᵀ) + b. Gradients reach x through the dequantized weight (straight through)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        fmt: WeightFormat | None = None,
        compute_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        act_scheme: str = "per_token",
    ) -> None:
        if (fmt or INT8_ROWWISE) != INT8_ROWWISE:
            raise ValueError(f"W8A8Linear stores symmetric int8 rows ({INT8_ROWWISE}), got {fmt}")
        super().__init__(in_features, out_features, bias, INT8_ROWWISE, compute_dtype, device)
        self._set_act_scheme(act_scheme, device)

    def _set_act_scheme(self, act_scheme: str, device) -> None:
        if act_scheme not in ACT_SCHEMES:
            raise ValueError(f"act_scheme must be one of {ACT_SCHEMES}, got {act_scheme!r}")
        self.act_scheme = act_scheme
        if act_scheme == "per_tensor":
            self.register_buffer("input_scale", torch.ones((), device=device))
        elif hasattr(self, "input_scale"):
            del self.input_scale

    @classmethod
    def from_linear(cls, linear, fmt: WeightFormat | None = None, compute_dtype=None, act_scheme: str = "per_token",
                    input_absmax: float | None = None):  # fmt: skip
        """Quantize an `nn.Linear` (already smoothed, if smoothing is wanted) to W8A8.

        `input_absmax`: the largest |x| of this layer's input over the calibration set; required by the
        static per-tensor scheme (scale = absmax / 127), unused by the per-token one.
        """
        module = cls.from_storage(linear, INT8_ROWWISE.encode(linear.weight.detach()), fmt or INT8_ROWWISE,
                                  compute_dtype)  # fmt: skip
        module._set_act_scheme(act_scheme, linear.weight.device)
        if act_scheme == "per_tensor":
            if input_absmax is None or not 0 <= float(input_absmax) < float("inf"):
                raise ValueError(f"the per_tensor scheme needs a finite input_absmax ≥ 0, got {input_absmax!r}")
            module.input_scale.fill_(max(float(input_absmax), 1e-30) / 127)
        return module

    def to_meta(self) -> dict:
        return {**super().to_meta(), "act_scheme": self.act_scheme}

    @classmethod
    def from_meta(cls, meta: dict, device="meta") -> W8A8Linear:
        module = super().from_meta({k: v for k, v in meta.items() if k != "act_scheme"}, device)
        module._set_act_scheme(meta["act_scheme"], device)
        return module

    def weight_nbytes(self) -> int:
        static = self.input_scale.numel() * self.input_scale.element_size() if self.act_scheme == "per_tensor" else 0
        return super().weight_nbytes() + static

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"W8A8Linear expects input (…, {self.in_features}), got {tuple(x.shape)}")

        def compute(inp: torch.Tensor) -> torch.Tensor:
            flat = inp.reshape(-1, self.in_features)  # (M, K)
            if self.act_scheme == "per_token":
                xq, sx = quantize_rows_int8(flat)  # (M, K) int8, (M,)
                sx = sx[:, None]
            else:
                xq, sx = quantize_static_int8(flat, self.input_scale), self.input_scale.float()
            y = int8_matmul(xq, self.weight.t()).float() * sx * self.weight_scale.float()[None, :]
            return y.reshape(*inp.shape[:-1], self.out_features).to(self.compute_dtype)

        y = _Int8Matmul.apply(x.to(self.compute_dtype), self, compute)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"act_scheme={self.act_scheme}, compute_dtype={self.compute_dtype}")  # fmt: skip
