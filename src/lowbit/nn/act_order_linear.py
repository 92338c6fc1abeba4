"""ActOrderQuantLinear: a QuantLinear whose weight columns are stored in GPTQ's act-order.

GPTQ with act-order (Frantar et al. 2023, "desc_act") quantizes the input columns in order of decreasing
Hessian diagonal, and its groups of `group_size` are consecutive in *that* order. The storage here keeps
the columns permuted, `stored[:, i] = W[:, input_perm[i]]`, so the groups stay consecutive and any
`WeightFormat` stores them unchanged; `dequantize` scatters the columns back (GPTQ checkpoints express the
same thing with `g_idx[input_perm[i]] = i // group_size`). A fused GPU kernel, which reads the storage as
it is, gets the input columns in act-order instead. Everything else is QuantLinear's.
"""

from __future__ import annotations

import torch

from lowbit import kernels
from lowbit.formats.weight import WeightFormat
from lowbit.nn.quant_linear import QuantLinear


class ActOrderQuantLinear(QuantLinear):
    """QuantLinear with column permutation `input_perm` (int32, (in_features,)) applied at dequantization."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        fmt: WeightFormat | None = None,
        compute_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias, fmt, compute_dtype, device)
        self.register_buffer("input_perm", torch.arange(in_features, dtype=torch.int32, device=device))

    @classmethod
    def from_permuted_storage(cls, linear, storage: dict[str, torch.Tensor], fmt: WeightFormat, perm: torch.Tensor,
                              compute_dtype: torch.dtype | None = None) -> ActOrderQuantLinear:  # fmt: skip
        """Storage of `W[:, perm]` (as `fmt.encode_int` made it) and the permutation itself."""
        perm = torch.as_tensor(perm)
        if perm.shape != (linear.in_features,) or not torch.equal(
            torch.sort(perm.long().cpu()).values, torch.arange(linear.in_features)
        ):
            raise ValueError(f"perm must be a permutation of range({linear.in_features})")
        module = cls.from_storage(linear, storage, fmt, compute_dtype)
        module.input_perm = perm.to(device=storage["weight"].device, dtype=torch.int32)
        return module

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        stored = super().dequantize(dtype)  # (out, in), columns in act-order
        weight = torch.empty_like(stored)
        weight[:, self.input_perm.long()] = stored
        return weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] == self.in_features and kernels.select(self.kernel, self.fmt, x.device) == "fused":
            # A fused kernel reads the storage as it is (act-order): x Wᵀ = x[…, perm] storedᵀ.
            return super().forward(x.index_select(-1, self.input_perm.long()))
        return super().forward(x)  # the dequantizing path goes through `dequantize`, columns restored

    def weight_nbytes(self) -> int:
        return super().weight_nbytes() + self.input_perm.numel() * self.input_perm.element_size()
