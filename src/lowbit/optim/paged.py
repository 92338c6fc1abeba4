"""Paged optimizer states: keep them in CPU memory and bring each one to the GPU only for its update.

QLoRA (Dettmers et al. 2023, §3 "Paged Optimizers") puts optimizer states in NVIDIA unified memory, so
that when a long sequence makes activation memory spike the driver evicts states to CPU RAM instead of
the step dying with out-of-memory. Here the same goal is reached explicitly and portably: between steps a
parameter's state tensors live in pinned CPU memory; `fetch_state` copies them to the parameter's device
just before its update and `offload_state` copies them back right after, so at any moment the GPU holds
the state of one tensor only (the copies back are queued, and the step waits for them once, at its end).
The price is a host↔device copy of the states every step (for LoRA adapters a few MB). With parameters on the CPU both functions do nothing: the same code and the same
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
    """Move a parameter's state tensors back to pinned CPU memory (no-op unless paged on a GPU). The copies are
    queued, not waited for: `wait_offloaded` after the step's last one (a wait per tensor cost an 8B model's
    LoRA ~100 ms a step on an H100, four waits for each of its 448 tensors). Freeing the device copies at once
    is safe: the allocator hands their memory only to work queued after the copies."""
    if not paged:
        return
    for key, value in _state_tensors(state):
        if value.device.type != "cpu":
            pinned = torch.cuda.is_available()
            host = torch.empty(value.shape, dtype=value.dtype, pin_memory=pinned)
            state[key] = host.copy_(value, non_blocking=pinned)


def wait_offloaded(params) -> None:
    """Wait until the copies `offload_state` queued for these parameters' states have landed: the states are
    whole on the host when the step returns (a state dict, a checkpoint read them there)."""
    for device in {p.device for p in params if p.device.type == "cuda"}:
        torch.cuda.current_stream(device).synchronize()


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
        wait_offloaded(p for group in self.param_groups for p in group["params"])
        return loss
