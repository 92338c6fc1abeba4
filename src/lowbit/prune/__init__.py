"""Pruning: unstructured magnitude (per layer or global), N:M semi-structured (2:4), structured heads / MLP
channels that shrink the model, and iterative prune → fine-tune schedules with lottery-ticket rewinding.

    masks, report = lowbit.prune.magnitude_prune(model, sparsity=0.5, scope="global")
    lowbit.prune.prune_mlp_channels(model, n_remove=256)      # smaller tensors, config updated
"""

from lowbit.prune.importance import activation_importance
from lowbit.prune.magnitude import keep_pruned, magnitude_masks, magnitude_prune
from lowbit.prune.report import LayerSparsity, PruneReport, apply_masks, sparsity_report
from lowbit.prune.schedule import PruneStep, iterative_prune, sparsity_schedule
from lowbit.prune.semi_structured import is_n_m_sparse, n_m_mask, semi_structured_prune
from lowbit.prune.structured import (
    channel_importance,
    head_importance,
    parameter_count,
    prune_attention_heads,
    prune_mlp_channels,
)

__all__ = [
    "LayerSparsity",
    "PruneReport",
    "PruneStep",
    "activation_importance",
    "apply_masks",
    "channel_importance",
    "head_importance",
    "is_n_m_sparse",
    "iterative_prune",
    "keep_pruned",
    "magnitude_masks",
    "magnitude_prune",
    "n_m_mask",
    "parameter_count",
    "prune_attention_heads",
    "prune_mlp_channels",
    "semi_structured_prune",
    "sparsity_report",
    "sparsity_schedule",
]
