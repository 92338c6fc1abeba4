"""N:M semi-structured sparsity (2:4 by default): in every group of M consecutive weights of a row, only the N
largest in magnitude survive (Mishra et al. 2021, "Accelerating Sparse Deep Neural Networks").

2:4 is the pattern NVIDIA's sparse tensor cores (Ampere and later) execute at up to twice the dense rate: exactly
50% sparsity, with the zeros spread evenly so the hardware can store two values and two 2-bit indices per group.
Groups run along the input dimension (the reduction dimension of the matmul), as the hardware requires.
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.prune.report import DEFAULT_EXCLUDE, PruneReport, apply_masks, sparsity_report, target_linears


def n_m_mask(weight: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """(out, in) bool mask keeping the n largest |w| in each group of m consecutive inputs of a row."""
    out_features, in_features = weight.shape
    if in_features % m:
        raise ValueError(f"in_features ({in_features}) must be a multiple of m={m} for {n}:{m} sparsity")
    groups = weight.detach().abs().reshape(out_features, in_features // m, m)  # (out, in/m, m)
    top = torch.topk(groups, n, dim=-1).indices  # (out, in/m, n)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, top, True)
    return keep.reshape(out_features, in_features)


def semi_structured_prune(model: nn.Module, n: int = 2, m: int = 4, include=("*",),
                          exclude=DEFAULT_EXCLUDE) -> tuple[dict[str, torch.Tensor], PruneReport]:  # fmt: skip
    """Apply N:M sparsity to every targeted linear layer in place; returns (masks, report)."""
    if not (isinstance(n, int) and isinstance(m, int) and 0 < n < m):
        raise ValueError(f"N:M sparsity needs integers 0 < n < m, got {n}:{m}")
    layers = target_linears(model, include, exclude)
    if not layers:
        raise ValueError("no nn.Linear layer matches; nothing to prune")
    masks = {name: n_m_mask(layer.weight, n, m) for name, layer in layers}
    apply_masks(model, masks)
    return masks, sparsity_report(model, include, exclude, method=f"{n}:{m} semi-structured")


def is_n_m_sparse(weight: torch.Tensor, n: int = 2, m: int = 4) -> bool:
    """True if every group of m consecutive inputs of every row has at most n nonzeros."""
    out_features, in_features = weight.shape
    if in_features % m:
        return False
    return bool(((weight.reshape(out_features, -1, m) != 0).sum(-1) <= n).all())
