"""Learning-rate schedules with linear warm-up: constant, linear decay, cosine decay.

The factor multiplies the peak learning rate at optimizer step `step` (0-based, the value used by the
step that is about to run), with the conventions of transformers' `get_*_schedule_with_warmup`, so a run
here and one with transformers' scheduler see the same learning rates:

    warm-up   step < W:  step / W                                   (0 at the very first step)
    constant:            1
    linear:              max(0, (N - step) / (N - W))               → 0 at step N
    cosine:              ½·(1 + cos(π·p)),  p = (step - W) / (N - W)  (Loshchilov & Hutter 2017, SGDR
                                                                     without restarts)

`min_lr_ratio` r lifts the decaying schedules to r + (1 - r)·factor, so the rate ends at r·peak.
"""

from __future__ import annotations

import math

import torch

SCHEDULES = ("constant", "linear", "cosine")


def lr_factor(step: int, total_steps: int, warmup_steps: int = 0, kind: str = "cosine",
              min_lr_ratio: float = 0.0) -> float:  # fmt: skip
    """The multiplier of the peak learning rate at `step` (see the module docstring)."""
    if kind not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {kind!r}")
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    if kind == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    decay = max(0.0, 1.0 - progress) if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return min_lr_ratio + (1.0 - min_lr_ratio) * decay


def make_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0, kind: str = "cosine",
                   min_lr_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:  # fmt: skip
    """A `LambdaLR` following `lr_factor`; its state_dict is plain numbers (safe to save and reload)."""
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    if warmup_steps < 0 or total_steps < 1:
        raise ValueError(f"need total_steps ≥ 1 and warmup_steps ≥ 0, got {total_steps}, {warmup_steps}")
    lr_factor(0, total_steps, warmup_steps, kind, min_lr_ratio)  # validates `kind` now, not at step 1

    def factor(step: int) -> float:
        return lr_factor(step, total_steps, warmup_steps, kind, min_lr_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
