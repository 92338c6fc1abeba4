"""8-bit blockwise AdamW (Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization").

AdamW (Loshchilov & Hutter 2019) keeps two fp32 moments per parameter, 8 bytes — twice the weights
themselves in fp32. Here both moments are stored as 8-bit codes:

    m_t = β1·m_{t-1} + (1 - β1)·g_t           v_t = β2·v_{t-1} + (1 - β2)·g_t²
    θ_t = θ_{t-1}·(1 - lr·λ) - lr · (m_t / (1 - β1^t)) / (√(v_t / (1 - β2^t)) + ε)

Each step dequantizes the codes of one tensor to fp32, applies the update above exactly as AdamW does,
and quantizes the new moments again. Quantization is blockwise (paper §2.2): the flattened state is cut
into blocks (default 2048 values), each block is divided by its absolute maximum and every value is
replaced by the nearest entry of an 8-bit "dynamic" map (paper §2.1, Dettmers 2015): a float-like code
with a variable split between exponent and fraction, dense near zero, so both tiny and large moments
keep a few significant digits. m is signed and uses the signed map (`lowbit.formats.dynamic_codebook`);
v ≥ 0 uses the unsigned map, which spends the sign bit on one more fraction bit. A positive v never
becomes code 0: rounded to zero, an entry whose gradients are tiny next to its block's largest (v below
~1.6e-7 of the block's absmax) would divide its m by ε alone on the next step, an update of ~100× lr
(measured on random gradients: 1.45 after 25 steps of lr 1e-3). It gets the smallest positive code, which
overestimates such a v and so only shrinks its update. Per-block scaling
confines an outlier's damage to its own block, which is what makes 8-bit states stable.

State cost: 2 bytes per parameter + 2·4 bytes per block (≈ 2.004 B/param at block 2048) instead of 8.
Tensors smaller than `min_8bit_size` keep fp32 moments (bitsandbytes does the same: for them the
constants cost more than they save, and they are often sensitive biases or norms).

bitsandbytes ≥ 0.45 uses blocks of 256; pass `block_size=256` to reproduce its `AdamW8bit` (the
tests do, on CPU).

With ``backend="auto"`` (default) on CUDA, or "triton", the step of all 8-bit tensors of a dtype is one
Triton kernel launch (`lowbit.kernels.adam8bit`); on the CPU, or with ``backend="torch"``, the torch code
below. Both keep the same state, so a state dict moves freely between them. On an H100 (bench/RESULTS.md)
the kernel steps Llama-3-8B's 448 LoRA tensors (8 blocks) in 4.2 ms, against 348 ms for the torch code,
7.2 ms for torch's foreach AdamW and 23.8 ms for bitsandbytes' AdamW8bit.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

from lowbit.formats.blockwise import dequantize_blockwise, quantize_blocks
from lowbit.formats.codebooks import dynamic_codebook
from lowbit.optim.paged import fetch_state, offload_state, wait_offloaded

QUANTIZED_KEYS = ("exp_avg_codes", "exp_avg_sq_codes")
ABSMAX_KEYS = ("exp_avg_absmax", "exp_avg_sq_absmax")


@lru_cache(maxsize=None)
def _unsigned_dynamic_map() -> torch.Tensor:
    return _build_unsigned_dynamic_map()


def unsigned_dynamic_codebook() -> torch.Tensor:
    """The unsigned 8-bit dynamic map (for non-negative values, e.g. Adam's second moment).

    Like the signed map, each decade e ∈ [0, 6] covers magnitudes 10^(e-6)·[0.1, 1], here with 2^(e+1)
    fraction steps (the bit the signed map uses for the sign becomes a fraction bit): Σ 2^(e+1) = 254
    values, plus 0 and 1, 256 entries sorted ascending in [0, 1]. Float32, as bitsandbytes computes it.
    """
    return _unsigned_dynamic_map().clone()


def _build_unsigned_dynamic_map() -> torch.Tensor:
    values: list[float] = []
    for decade in range(7):
        edges = torch.linspace(0.1, 1.0, 2 ** (decade + 1) + 1, dtype=torch.float32)
        values += ((10.0 ** (decade - 6)) * (edges[:-1] + edges[1:]) / 2.0).tolist()
    values += [0.0, 1.0]
    return torch.tensor(sorted(values), dtype=torch.float32)


class AdamW8bit(torch.optim.Optimizer):
    """AdamW with both moments stored in 8 bits, blockwise (see the module docstring).

    Same arguments and `state_dict` round trip as `torch.optim.AdamW` (no amsgrad), plus:
    block_size: values per absmax block of the quantized states (paper: 2048).
    min_8bit_size: tensors with fewer elements keep fp32 moments.
    paged: keep the states in (pinned) CPU memory between steps when the parameters live on a GPU
        (`lowbit.optim.paged`); on CPU it changes nothing.
    backend: "auto" (default: the fused Triton step on CUDA, torch elsewhere; `kernels.dispatch.use_triton`),
        "triton" or "torch".
    capturable: as torch's AdamW: each tensor's step count is a device tensor and nothing in `step` reads a
        device value on the host, so the step can be captured in a CUDA graph (`lowbit.train.GraphedStep` sets
        it). The fused kernel then finds the tensors through an address table built before the capture: the
        parameters and gradients must keep their addresses (gradients zeroed in place, not set to None).
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, block_size: int = 2048, min_8bit_size: int = 4096,
                 paged: bool = False, backend: str = "auto", capturable: bool = False) -> None:  # fmt: skip
        from lowbit.kernels.dispatch import BACKENDS

        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
        if not (lr >= 0.0 and math.isfinite(lr)):
            raise ValueError(f"lr must be a finite number ≥ 0, got {lr}")
        if not all(0.0 <= b < 1.0 for b in betas) or len(betas) != 2:
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas}")
        if not eps > 0.0:
            raise ValueError(f"eps must be > 0, got {eps}")
        if weight_decay < 0.0:
            raise ValueError(f"weight_decay must be ≥ 0, got {weight_decay}")
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 2:
            raise ValueError(f"block_size must be an integer ≥ 2, got {block_size!r}")
        if min_8bit_size < 0:
            raise ValueError(f"min_8bit_size must be ≥ 0, got {min_8bit_size}")
        if paged and capturable:
            raise ValueError("a paged optimizer moves its states between steps, which a captured step cannot")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, block_size=block_size,
                        min_8bit_size=min_8bit_size, paged=paged, capturable=capturable)  # fmt: skip
        super().__init__(params, defaults)
        self.backend = backend
        self._maps: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._searches: dict[torch.device, tuple] = {}

    def _codebooks(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(signed, unsigned) dynamic maps on ``device``, built once: per tensor and step they would cost two
        table constructions and four host-to-device copies."""
        if device not in self._maps:
            self._maps[device] = (dynamic_codebook().to(device), unsigned_dynamic_codebook().to(device))
        return self._maps[device]

    def _code_searches(self, device: torch.device) -> tuple:
        """(signed, unsigned) maps prepared for the fused kernel, built once per device."""
        if device not in self._searches:
            from lowbit.kernels.adam8bit import CodeSearch

            self._searches[device] = tuple(CodeSearch.from_map(c) for c in self._codebooks(device))
        return self._searches[device]

    def _fused(self, p: torch.Tensor, state: dict) -> bool:
        from lowbit.kernels.dispatch import use_triton

        return "exp_avg_codes" in state and p.is_contiguous() and p.grad.is_contiguous() and use_triton(p, self.backend)

    def _init_state(self, p: torch.Tensor, group: dict) -> dict:
        state = self.state[p]
        state["step"] = 0 if not group.get("capturable") else torch.zeros((), dtype=torch.float32, device=p.device)
        if p.numel() >= group["min_8bit_size"]:
            n_blocks = math.ceil(p.numel() / group["block_size"])
            for codes, absmax in zip(QUANTIZED_KEYS, ABSMAX_KEYS):
                # All-zero absmax: every code dequantizes to 0, the moments' initial value.
                state[codes] = torch.zeros(p.numel(), dtype=torch.uint8, device=p.device)
                state[absmax] = torch.zeros(n_blocks, dtype=torch.float32, device=p.device)
        else:
            state["exp_avg"] = torch.zeros(p.numel(), dtype=torch.float32, device=p.device)
            state["exp_avg_sq"] = torch.zeros(p.numel(), dtype=torch.float32, device=p.device)
        return state

    def _read_moments(self, state: dict, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(m, v) as fp32 tensors of shape (numel,)."""
        if "exp_avg" in state:
            return state["exp_avg"], state["exp_avg_sq"]
        signed, unsigned = self._codebooks(state["exp_avg_codes"].device)
        m = dequantize_blockwise(state["exp_avg_codes"], state["exp_avg_absmax"], signed, block_size)
        v = dequantize_blockwise(state["exp_avg_sq_codes"], state["exp_avg_sq_absmax"], unsigned, block_size)
        return m, v

    def _write_moments(self, state: dict, m: torch.Tensor, v: torch.Tensor, block_size: int) -> None:
        if "exp_avg" in state:
            return  # fp32 moments were updated in place
        signed, unsigned = self._codebooks(m.device)
        for x, codebook, name in ((m, signed, "exp_avg"), (v, unsigned, "exp_avg_sq")):
            # the moments are finite whenever the gradients are (a trainer skips non-finite steps)
            codes, absmax = quantize_blocks(x, codebook, block_size, keep_positive=name == "exp_avg_sq")
            state[f"{name}_codes"], state[f"{name}_absmax"] = codes, absmax

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, wd, block = group["lr"], group["eps"], group["weight_decay"], group["block_size"]
            params = [p for p in group["params"] if p.grad is not None]
            if any(p.grad.is_sparse for p in params):
                raise RuntimeError("AdamW8bit does not support sparse gradients")
            states = [self._advance(p, group) for p in params]
            if group.get("capturable") and states:  # every counter + 1 in one launch
                torch._foreach_add_([s["step"] for s in states], 1.0)
            fused: dict[tuple, list[torch.Tensor]] = {}
            for p, state in zip(params, states):
                if self._fused(p, state):  # updated below, with the group's other tensors of its dtype
                    fused.setdefault((p.dtype, p.grad.dtype, p.device), []).append(p)
                    if group["paged"]:  # one tensor's states on the device at a time
                        self._fused_step(fused.popitem()[1], group)
                    continue
                t = state["step"]  # a number, or a device tensor (capturable): the same arithmetic for both
                t = t.double() if torch.is_tensor(t) else t
                step_size, bias2_sqrt = lr / (1.0 - beta1**t), (1.0 - beta2**t) ** 0.5
                g = p.grad.reshape(-1).float()  # (numel,)
                m, v = self._read_moments(state, block)
                m.mul_(beta1).add_(g, alpha=1.0 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
                denom = (v.sqrt() / bias2_sqrt).add_(eps)
                theta = p.reshape(-1).float().mul_(1.0 - lr * wd).sub_(m / denom * step_size)
                p.copy_(theta.view_as(p))
                self._write_moments(state, m, v, block)
                offload_state(state, group["paged"])
            for fused_params in fused.values():
                self._fused_step(fused_params, group)
            if group["paged"]:
                wait_offloaded(params)
        return loss

    def _advance(self, p: torch.Tensor, group: dict) -> dict:
        """p's state, created on its first step and fetched to p's device; a host step count moves on here, a
        device one (capturable) with the group's others in one launch."""
        state = self.state[p] if self.state[p] else self._init_state(p, group)
        fetch_state(state, p.device, group["paged"])
        if group.get("capturable") and not torch.is_tensor(state["step"]):  # a state from an uncaptured run
            state["step"] = torch.tensor(float(state["step"]), dtype=torch.float32, device=p.device)
        elif not group.get("capturable") and torch.is_tensor(state["step"]):
            state["step"] = int(state["step"])
        if not group.get("capturable"):
            state["step"] += 1
        return state

    def _fused_step(self, params: list[torch.Tensor], group: dict) -> None:
        """The update of these parameters (one dtype, one device) in one kernel launch."""
        from lowbit.kernels.adam8bit import adamw8bit_step

        beta1, beta2 = group["betas"]
        states = [self.state[p] for p in params]
        adamw8bit_step([p.data for p in params], [p.grad for p in params], states,
                       *self._code_searches(params[0].device), lr=group["lr"], beta1=beta1, beta2=beta2,
                       eps=group["eps"], weight_decay=group["weight_decay"], block_size=group["block_size"])  # fmt: skip
        for state in states:
            offload_state(state, group["paged"])

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        # torch casts every state tensor to its parameter's floating dtype on load: the codes must go back to
        # uint8 (the fused kernel reads bytes), the scales and fp32 moments to float32 whatever the parameter
        # dtype (bf16 LoRA weights, …).
        for state in self.state.values():
            for keys, dtype in ((QUANTIZED_KEYS, torch.uint8), (ABSMAX_KEYS + ("exp_avg", "exp_avg_sq"), torch.float32)):
                for key in keys:
                    if key in state:
                        state[key] = state[key].to(dtype)


class PagedAdamW8bit(AdamW8bit):
    """`AdamW8bit(..., paged=True)`: 8-bit blockwise states kept in pinned CPU memory between steps."""

    def __init__(self, params, **kwargs) -> None:
        super().__init__(params, paged=True, **kwargs)


def optimizer_state_nbytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by an optimizer's per-parameter state tensors (moments, codes, scales)."""
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                total += value.numel() * value.element_size()
    return total
