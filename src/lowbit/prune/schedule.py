"""Iterative pruning: prune a little, fine-tune, repeat — with optional lottery-ticket rewinding.

Sparsity rises from ``initial`` to ``final`` over ``steps`` rounds along Zhu & Gupta's (2017) cubic schedule

    s_t = s_f + (s_i − s_f) · (1 − t/n)³,   t = 1 … n

which prunes fast while many weights are redundant and slowly near the target. Each round prunes by magnitude to
s_t (already-pruned weights are zero, hence pruned first), calls ``finetune(model, round, masks)`` with the pruned
weights held at zero, and then ``evaluate(model)`` (e.g. perplexity) to record the trajectory.

With ``rewind=True`` the surviving weights are reset after every pruning round to their values at the start
(Frankle & Carbin 2019, the lottery ticket hypothesis; Frankle et al. 2020 rewind to an early checkpoint instead —
pass ``rewind_state``), so fine-tuning retrains the sparse "ticket" from there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from lowbit.prune.magnitude import _check_sparsity, keep_pruned, magnitude_masks
from lowbit.prune.report import DEFAULT_EXCLUDE, apply_masks, sparsity_report

SCHEDULES = ("cubic", "linear")


def sparsity_schedule(final: float, steps: int, initial: float = 0.0, kind: str = "cubic") -> list[float]:
    """Target sparsity after each of the ``steps`` rounds (the last one is ``final``)."""
    _check_sparsity(final)
    _check_sparsity(initial)
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if kind not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {kind!r}")
    if kind == "linear":
        return [initial + (final - initial) * t / steps for t in range(1, steps + 1)]
    return [final + (initial - final) * (1 - t / steps) ** 3 for t in range(1, steps + 1)]


@dataclass
class PruneStep:
    step: int
    target: float
    sparsity: float
    metric: float | None = None


def iterative_prune(model: nn.Module, final_sparsity: float, steps: int = 4,
                    finetune: Callable[[nn.Module, int, dict], None] | None = None,
                    evaluate: Callable[[nn.Module], float] | None = None, schedule: str = "cubic",
                    scope: str = "global", rewind: bool = False, rewind_state: dict | None = None,
                    include=("*",), exclude=DEFAULT_EXCLUDE) -> tuple[dict[str, torch.Tensor], list[PruneStep]]:  # fmt: skip
    """Prune ``model`` in place to ``final_sparsity`` in ``steps`` rounds; returns (final masks, history).

    ``history[0]`` is the unpruned model (step 0) when ``evaluate`` is given, then one entry per round.
    """
    targets = sparsity_schedule(final_sparsity, steps, kind=schedule)
    if rewind:
        source = rewind_state if rewind_state is not None else model.state_dict()
        start = {k: v.detach().clone() for k, v in source.items()}
    history = []
    if evaluate is not None:
        history.append(PruneStep(0, 0.0, sparsity_report(model, include, exclude).sparsity, evaluate(model)))
    masks: dict[str, torch.Tensor] = {}
    for step, target in enumerate(targets, start=1):
        masks = magnitude_masks(model, target, scope, include, exclude)
        apply_masks(model, masks)
        if rewind:
            _rewind(model, masks, start)
        if finetune is not None:
            with keep_pruned(model, masks):
                finetune(model, step, masks)
        report = sparsity_report(model, include, exclude)
        history.append(PruneStep(step, target, report.sparsity, evaluate(model) if evaluate else None))
    return masks, history


def _rewind(model: nn.Module, masks: dict[str, torch.Tensor], start: dict[str, torch.Tensor]) -> None:
    """Reset the surviving weights of the pruned layers to their starting values (pruned ones stay zero)."""
    with torch.no_grad():
        for name, mask in masks.items():
            weight = model.get_submodule(name).weight
            weight.copy_(start[f"{name}.weight"].to(weight.device, weight.dtype) * mask)
