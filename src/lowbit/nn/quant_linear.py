"""QuantLinear: a drop-in `nn.Linear` whose weight is stored in a low-bit format.

The weight lives only in its storage tensors (buffers: packed codes, scales, …). Each forward
dequantizes it to the compute dtype just for the matmul and drops it again; the backward pass
dequantizes once more instead of keeping the dense weight alive, so training through a QuantLinear
(QLoRA) costs the memory of the low-bit weight only. The weight itself is frozen: gradients flow to
the input (and to a bias, if it requires them).

`kernel` chooses how the matmul runs (`lowbit.kernels.select`): "dequant" is the path above; "fused"
the registered op `lowbit::lut4_linear` (Triton dequant-fused GEMV/GEMM on CUDA) for the 4-bit lookup
formats; "auto" (default) takes "fused" on CUDA when it can and "dequant" otherwise (the CPU path).
"""

from __future__ import annotations

import threading

import torch
from torch import nn

from lowbit import kernels
from lowbit.formats.weight import WeightFormat

COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


_scratch = threading.local()  # per thread: one float32 buffer, as large as the largest weight decoded on the CPU


def _transient_weight(module: QuantLinear, dtype: torch.dtype) -> torch.Tensor:
    """The dense weight for one matmul. On the CPU the 4-bit codebook formats decode into a reused per-thread
    buffer (a fresh one costs page faults on every call: SmolLM2's NF4 decode ran 4.9 → 6.8 tokens/s with it);
    the result may be a view of that buffer, so it must not outlive the caller's matmul."""
    if not (module.fmt.is_codebook and module.weight.device.type == "cpu"):
        return module.dequantize(dtype)
    n = module.in_features * module.out_features
    buffer = getattr(_scratch, "buffer", None)
    if buffer is None or buffer.numel() < n:
        buffer = _scratch.buffer = torch.empty(n)
    return module.fmt.decode(module.storage(), (module.out_features, module.in_features), dtype, scratch=buffer)


class _DequantMatmul(torch.autograd.Function):
    """y = x @ W.T with W re-materialised from its storage in forward and in backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, module: QuantLinear) -> torch.Tensor:
        ctx.module = module
        return x @ _transient_weight(module, x.dtype).t()  # (…, in) @ (in, out) → (…, out)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_x = grad_out @ _transient_weight(ctx.module, grad_out.dtype) if ctx.needs_input_grad[0] else None
        return grad_x, None


class QuantLinear(nn.Module):
    """y = x · dequant(W)ᵀ + b, with W stored as `fmt` describes and computed in `compute_dtype`."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        fmt: WeightFormat | None = None,
        compute_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        kernel: str = "auto",
    ) -> None:
        super().__init__()
        if compute_dtype not in COMPUTE_DTYPES:
            raise TypeError(f"compute_dtype must be one of {COMPUTE_DTYPES}, got {compute_dtype}")
        if kernel not in kernels.KERNEL_CHOICES:
            raise ValueError(f"kernel must be one of {kernels.KERNEL_CHOICES}, got {kernel!r}")
        self.kernel = kernel  # "auto" | "dequant" | "fused"; may be set later, resolved per call
        self.in_features, self.out_features = in_features, out_features
        self.fmt = fmt or WeightFormat()
        self.compute_dtype = compute_dtype
        self.storage_names = []
        for name, tensor in self.fmt.empty((out_features, in_features), device).items():
            self._register_storage(name, tensor)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None

    def _register_storage(self, name: str, tensor: torch.Tensor) -> None:
        # Buffers, not Parameters: they move with .to() and live in the state dict, but no optimizer
        # ever sees them (integer storage cannot take gradients).
        self.register_buffer(f"weight_{name}" if name != "weight" else "weight", tensor)
        if name not in self.storage_names:
            self.storage_names.append(name)

    def storage_as_parameters(self) -> None:
        """Hold the storage tensors as frozen (requires_grad=False) nn.Parameters instead of buffers.

        For FSDP2, which shards parameters (along dim 0, padding the last shard) and all-gathers them
        before each forward and backward, but replicates buffers. Every storage tensor is flat or
        row-major and decoded only after the all-gather, so dim-0 shards of the bytes are exact: the
        gathered tensors are the original ones. Names, shapes, dtypes and so the state dict are unchanged;
        no optimizer sees them (trainers collect parameters that require grad).
        """
        for name in self.storage_names:
            attr = "weight" if name == "weight" else f"weight_{name}"
            tensor = self._buffers.pop(attr, None)
            if tensor is not None:  # already a parameter: nothing to do
                self.register_parameter(attr, nn.Parameter(tensor, requires_grad=False))

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, fmt: WeightFormat, compute_dtype: torch.dtype | None = None
    ) -> QuantLinear:
        """Quantize an `nn.Linear` (round-to-nearest in `fmt`)."""
        return cls.from_storage(linear, fmt.encode(linear.weight.detach()), fmt, compute_dtype)

    @classmethod
    def from_storage(
        cls,
        linear: nn.Linear,
        storage: dict[str, torch.Tensor],
        fmt: WeightFormat,
        compute_dtype: torch.dtype | None = None,
    ) -> QuantLinear:
        """Build from storage tensors an algorithm produced for `linear`'s weight (its bias is kept)."""
        dtype = compute_dtype or (linear.weight.dtype if linear.weight.dtype in COMPUTE_DTYPES else torch.float32)
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, fmt, dtype, device="meta")
        for name, tensor in storage.items():
            module._register_storage(name, tensor)
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.detach().to(dtype), requires_grad=False)
        return module

    def to_meta(self) -> dict:
        """JSON-able construction arguments; `from_meta` builds an empty twin for a checkpoint to fill."""
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias is not None,
            "compute_dtype": str(self.compute_dtype).removeprefix("torch."),
            "weight_format": self.fmt.to_dict(),
        }

    @classmethod
    def from_meta(cls, meta: dict, device: torch.device | str | None = "meta") -> QuantLinear:
        """An empty module (uninitialised storage on `device`) of the layout `to_meta` describes."""
        dtype = getattr(torch, meta["compute_dtype"], None)
        if dtype not in COMPUTE_DTYPES:
            raise ValueError(f"unknown compute dtype {meta['compute_dtype']!r}")
        return cls(meta["in_features"], meta["out_features"], meta["bias"], WeightFormat(**meta["weight_format"]),
                   dtype, device=device)  # fmt: skip

    def storage(self) -> dict[str, torch.Tensor]:
        """The storage tensors by their format names (`weight`, `absmax`, …)."""
        return {n: getattr(self, "weight" if n == "weight" else f"weight_{n}") for n in self.storage_names}

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense (out, in) weight in `dtype` (default: the compute dtype)."""
        return self.fmt.decode(self.storage(), (self.out_features, self.in_features), dtype or self.compute_dtype)

    def weight_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.storage().values())

    def bits_per_parameter(self) -> float:
        return 8 * self.weight_nbytes() / (self.in_features * self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"QuantLinear expects input (…, {self.in_features}), got {tuple(x.shape)}")
        if kernels.select(self.kernel, self.fmt, x.device) == "fused":
            shape = (self.out_features, self.in_features)
            y = kernels.fused_linear(x.to(self.compute_dtype), self.fmt, self.storage(), shape)
        else:
            y = _DequantMatmul.apply(x.to(self.compute_dtype), self)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.to(x.dtype)  # like nn.Linear in a model of x's dtype, whatever the compute dtype

    def extra_repr(self) -> str:
        f = self.fmt
        detail = f"block_size={f.block_size}, double_quant={f.double_quant}" if f.is_codebook else (
            f"group_size={f.group_size}, symmetric={f.symmetric}")  # fmt: skip
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"format={f.name}, {detail}, compute_dtype={self.compute_dtype}")  # fmt: skip
