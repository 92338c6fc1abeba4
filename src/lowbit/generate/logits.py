"""Next-token score processing: repetition penalty, temperature, top-k and top-p (nucleus) filtering.

Each function takes scores of shape (B, V) (float32 logits, or log-probabilities in beam search) and returns
new scores of the same shape; a filtered-out token gets -inf, so softmax gives it probability 0. The order is
the one transformers uses: repetition penalty (every decoding mode), then — only when sampling —
temperature, top-k, top-p.
"""

from __future__ import annotations

import torch

from lowbit.generate.config import GenerateConfig


def repetition_penalty(scores: torch.Tensor, tokens: torch.Tensor, penalty: float,
                       ignore: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """CTRL's penalty (Keskar et al. 2019, §4.1) on every token that occurs in ``tokens``.

    scores (B, V); tokens (B, T) ids of the sequence so far; ignore (B, T) bool marks positions that do not
    count (left padding; the prompt when only generated tokens are penalised). A present token's score ``s``
    becomes ``s / penalty`` if ``s > 0`` else ``s * penalty``: dividing a negative score would raise it.
    """
    if penalty == 1.0:
        return scores
    counted = torch.ones_like(tokens, dtype=scores.dtype) if ignore is None else (~ignore).to(scores.dtype)
    present = torch.zeros_like(scores).scatter_add_(1, tokens, counted) > 0  # (B, V): occurs at a counted position
    penalised = torch.where(scores < 0, scores * penalty, scores / penalty)
    return torch.where(present, penalised, scores)


def temperature(scores: torch.Tensor, t: float) -> torch.Tensor:
    """softmax(s / t): t < 1 sharpens the distribution, t > 1 flattens it."""
    return scores if t == 1.0 else scores / t


def top_k_filter(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k highest scores of each row (Fan et al. 2018); ties with the k-th score are kept too."""
    if k <= 0 or k >= scores.shape[-1]:
        return scores
    kth = torch.topk(scores, k, dim=-1).values[..., -1:]  # (B, 1)
    return scores.masked_fill(scores < kth, float("-inf"))


def top_p_filter(scores: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering (Holtzman et al. 2020, eq. 2): keep the smallest set of most likely tokens whose
    probability mass reaches ``p``.

    Computed from the unlikely end: sorted in ascending order, a token is dropped when the total mass of it and
    every less likely token is ≤ 1 - p — whatever remains has mass ≥ p, and dropping one more would go below.
    The most likely token is always kept.
    """
    if p >= 1.0:
        return scores
    ascending, order = torch.sort(scores, dim=-1)  # (B, V)
    tail_mass = ascending.softmax(dim=-1).cumsum(dim=-1)  # mass of this token and all less likely ones
    drop_sorted = tail_mass <= 1 - p
    drop_sorted[..., -1] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # back to vocabulary order
    return scores.masked_fill(drop, float("-inf"))


def process_scores(scores: torch.Tensor, tokens: torch.Tensor, config: GenerateConfig,
                   ignore: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """All processing ``config`` asks for, in transformers' order. scores (B, V) float32, tokens (B, T)."""
    scores = repetition_penalty(scores, tokens, config.repetition_penalty, ignore)
    if config.do_sample:
        scores = temperature(scores, config.temperature)
        scores = top_k_filter(scores, config.top_k)
        scores = top_p_filter(scores, config.top_p)
    return scores
