"""Unstructured magnitude pruning: zero the weights of smallest absolute value (Han et al. 2015).

``scope="layer"`` gives every targeted layer the same sparsity s: in a layer of n weights the ⌊s·n⌋ smallest
|w| are zeroed. ``scope="global"`` ranks the weights of all targeted layers together and zeroes the ⌊s·N⌋
smallest overall, so layers with many small weights lose more (a single threshold τ with |w| ≤ τ pruned).
The model keeps its shapes; the returned masks (True = kept) let a fine-tuning loop keep pruned weights at
zero (`keep_pruned`, `apply_masks`).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from lowbit.prune.report import DEFAULT_EXCLUDE, PruneReport, apply_masks, sparsity_report, target_linears

SCOPES = ("layer", "global")


def _check_sparsity(sparsity: float) -> None:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must be a fraction in [0, 1), got {sparsity!r}")


def _smallest_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of ``scores``' shape, False on exactly the k smallest entries (ties broken by position)."""
    keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if k > 0:
        keep[torch.topk(scores.flatten(), k, largest=False, sorted=False).indices] = False
    return keep.view_as(scores)


def magnitude_masks(model: nn.Module, sparsity: float, scope: str = "layer", include=("*",),
                    exclude=DEFAULT_EXCLUDE) -> dict[str, torch.Tensor]:  # fmt: skip
    """Masks (True = keep) that zero a ``sparsity`` fraction of the targeted weights by magnitude."""
    _check_sparsity(sparsity)
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    layers = target_linears(model, include, exclude)
    if not layers:
        raise ValueError("no nn.Linear layer matches; nothing to prune")
    if scope == "layer":
        return {n: _smallest_mask(m.weight.detach().abs(), int(sparsity * m.weight.numel())) for n, m in layers}
    flat = torch.cat([m.weight.detach().abs().float().flatten().cpu() for _, m in layers])  # (N,)
    keep = _smallest_mask(flat, int(sparsity * flat.numel()))
    masks, start = {}, 0
    for name, m in layers:
        masks[name] = keep[start : start + m.weight.numel()].view_as(m.weight).to(m.weight.device)
        start += m.weight.numel()
    return masks


def magnitude_prune(model: nn.Module, sparsity: float, scope: str = "layer", include=("*",),
                    exclude=DEFAULT_EXCLUDE) -> tuple[dict[str, torch.Tensor], PruneReport]:  # fmt: skip
    """Zero the smallest-magnitude weights in place; returns (masks, report)."""
    masks = magnitude_masks(model, sparsity, scope, include, exclude)
    apply_masks(model, masks)
    return masks, sparsity_report(model, include, exclude, method=f"magnitude ({scope}, {sparsity:.0%})")


@contextlib.contextmanager
def keep_pruned(model: nn.Module, masks: dict[str, torch.Tensor]):
    """While fine-tuning inside this block, pruned weights get zero gradients (so SGD / Adam leave them at zero);
    on exit the masks are applied once more, in case an optimizer's weight decay moved anything."""
    handles = []
    for name, mask in masks.items():
        weight = model.get_submodule(name).weight
        m = mask.to(weight.device, weight.dtype)
        handles.append(weight.register_hook(lambda grad, m=m: grad * m))
    try:
        yield model
    finally:
        for h in handles:
            h.remove()
        apply_masks(model, masks)
