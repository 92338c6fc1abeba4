"""Knowledge distillation loss (Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network").

The student learns the teacher's whole distribution, softened by a temperature T:

    p_T = softmax(z_teacher / T),   q_T = softmax(z_student / T)
    L = α · T² · KL(p_T ‖ q_T) + (1 - α) · CE(z_student, y)

The T² factor keeps the soft term's gradients on the same scale as the hard term's when T changes (the
gradient of the softened KL shrinks as 1/T², §2 of the paper). α = 1 is pure distillation, α = 0 plain
fine-tuning on the labels. Positions whose label is -100 (prompt tokens, padding) count in neither term.

Typical use in lowbit (QLoRA-distill): the teacher is the fp32 model, the student its NF4 copy with a LoRA
adapter, so the adapter learns to undo the quantization error: `train(student, ..., teacher=fp32_model,
distill=DistillConfig(temperature=2.0, alpha=0.5))`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

CONFIG_VERSION = 1
IGNORE_INDEX = -100


@dataclass(frozen=True)
class DistillConfig:
    """temperature: T > 0 (softens both distributions); alpha: weight of the soft (KL) term in [0, 1]."""

    temperature: float = 2.0
    alpha: float = 0.5
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        if self.version != CONFIG_VERSION:
            raise ValueError(f"DistillConfig version {self.version} is not supported (this lowbit reads {CONFIG_VERSION})")
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be a positive number, got {self.temperature!r}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha!r}")


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                      config: DistillConfig | None = None, reduction: str = "mean") -> torch.Tensor:  # fmt: skip
    """α·T²·KL(softmax(t/T) ‖ softmax(s/T)) + (1-α)·CE(s, y) per position, summed or averaged over the
    positions whose label is not -100.

    student_logits, teacher_logits: (…, V) aligned with labels (…,) — for a causal LM already shifted.
    """
    cfg = config or DistillConfig()
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} must have the same shape")  # fmt: skip
    if student_logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(student_logits.shape)} do not match labels {tuple(labels.shape)}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    keep = labels != IGNORE_INDEX  # (…,)
    s, t, y = student_logits[keep].float(), teacher_logits[keep].float(), labels[keep]  # (N, V), (N, V), (N,)
    T = cfg.temperature
    log_q = F.log_softmax(s / T, dim=-1)
    log_p = F.log_softmax(t / T, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)  # (N,)
    ce = F.cross_entropy(s, y, reduction="none")  # (N,)
    per_position = cfg.alpha * T * T * kl + (1.0 - cfg.alpha) * ce
    total = per_position.sum()
    return total if reduction == "sum" else total / max(int(keep.sum()), 1)
