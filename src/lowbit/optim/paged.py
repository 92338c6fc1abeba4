"""Paged optimizer states: keep them in CPU memory and bring each one to the GPU only for its update.

QLoRA (Dettmers et al. 2023, §3 "Paged Optimizers") puts optimizer states in NVIDIA unified memory, so
that when a long sequence makes activation memory spike the driver evicts states to CPU RAM instead of
the step dying with out-of-memory. Here the same goal is reached explicitly and portably: between steps a
parameter's state tensors live in pinned CPU memory; `fetch_state` copies them to the parameter's device
just before its update and `offload_state` copies them back right after, so at any moment the GPU holds
the state of one tensor only. The price is a host↔device copy of the states every step (for LoRA
adapters a few MB). With parameters on the CPU both functions do nothing: the same code and the same
`paged=True` flag run everywhere.

    opt = lowbit.optim.PagedAdamW8bit(params, lr=2e-4)   # = AdamW8bit(..., paged=True), in adam8bit.py
    opt = lowbit.optim.PagedAdamW(params, lr=2e-4)       # 32-bit AdamW with paged states
"""

from __future__ import annotations

import torch


def _state_tensors(state: dict):
    return [(k, v) for k, v in state.items() if isinstance(v, torch.Tensor) and v.dim() > 0]


def fetch_state(state: dict, device: torch.device, paged: bool) -> None:
    """Move a parameter's state tensors to `device` for its update (no-op unless paged on a GPU)."""
    if not paged or device.type == "cpu":
        return
    for key, value in _state_tensors(state):
        state[key] = value.to(device, non_blocking=True)


def offload_state(state: dict, paged: bool) -> None:
    """Move a parameter's state tensors back to pinned CPU memory (no-op unless paged on a GPU)."""
    if not paged:
        return
    for key, value in _state_tensors(state):
        if value.device.type != "cpu":
            host = torch.empty(value.shape, dtype=value.dtype, pin_memory=torch.cuda.is_available())
            state[key] = host.copy_(value, non_blocking=False)


class PagedAdamW(torch.optim.AdamW):
    """`torch.optim.AdamW` (fp32 states) whose states wait in pinned CPU memory between steps."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2) -> None:  # fmt: skip
        # foreach=False: the per-tensor path, so each state is on the GPU only during its own update.
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=False)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and self.state[p]:
                    fetch_state(self.state[p], p.device, True)
        super().step()
        for state in self.state.values():
            offload_state(state, True)
        return loss
