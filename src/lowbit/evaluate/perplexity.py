"""Token-level perplexity of a causal LM over a long text, with (optionally overlapping) sliding windows.

This is the scheme of the transformers documentation ("Perplexity of fixed-length models"): the text is
tokenized once, a window of ``context_length`` tokens starts every ``stride`` tokens, and each window scores
only the tokens the previous window has not scored yet, so every token is scored at most once and, when
``stride < context_length``, with at least ``context_length - stride`` tokens of context. Within a window
position ``t`` predicts token ``t + 1``, so the first token of a window is never a target: with
``stride == context_length`` (non-overlapping windows, the GPTQ/AWQ convention) each window scores
``context_length - 1`` tokens. The result is

    PPL = exp( -(1/N) * sum_i log p(x_i | x_<i within its window) ),   N = number of scored tokens.

Tables should say which variant they report (non-overlapping vs sliding) and never mix it with word-level
perplexity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@dataclass(frozen=True)
class Window:
    """Tokens ``[begin, end)`` go into the model; the last ``n_new`` of them were not scored before."""

    begin: int
    end: int
    n_new: int


def sliding_windows(n_tokens: int, context_length: int, stride: int, max_windows: int | None = None) -> list[Window]:
    """The windows of the transformers-docs scheme over ``n_tokens`` tokens, at most ``max_windows`` of them."""
    windows, scored_until = [], 0
    for begin in range(0, n_tokens, stride):
        if max_windows is not None and len(windows) == max_windows:
            break
        end = min(begin + context_length, n_tokens)
        windows.append(Window(begin, end, end - scored_until))
        scored_until = end
        if end == n_tokens:  # later windows would score nothing new
            break
    return windows


def perplexity(
    model,
    tokenizer,
    text: str,
    context_length: int = 512,
    stride: int = 512,
    max_windows: int | None = None,
    batch_size: int = 1,
    show_progress: bool = False,
) -> float:
    """Token-level perplexity of ``model`` on ``text`` (see the module docstring for the exact scheme).

    The text is tokenized once with the tokenizer's defaults: special tokens are added only if the tokenizer
    itself adds them (e.g. a BOS at the very start for Llama-2; none for SmolLM2), never per window, so the
    number is the model's perplexity on the text as the tokenizer sees it. ``max_windows`` caps the number of
    windows, for fixed and comparable runs (e.g. 32 windows of 512 tokens). ``batch_size`` windows of equal
    length run in one forward pass. Logits are upcast to float32 before the log-softmax, so bf16/fp16 models
    are scored as precisely as their logits allow.
    """
    for name, value in (("context_length", context_length), ("stride", stride), ("batch_size", batch_size)):
        _check_positive_int(name, value)
    if max_windows is not None:
        _check_positive_int("max_windows", max_windows)
    if stride > context_length:
        raise ValueError(
            f"stride ({stride}) must not exceed context_length ({context_length}): tokens would be skipped"
        )
    if context_length < 2:
        raise ValueError("context_length must be at least 2: a window needs a context token and a target")

    # verbose=False: a long text exceeds model_max_length on purpose; the windows keep each pass short.
    ids = tokenizer(text, return_tensors="pt", verbose=False).input_ids[0]  # (N,)
    if ids.numel() < 2:
        raise ValueError(f"text has {ids.numel()} token(s); perplexity needs at least 2")
    windows = sliding_windows(ids.numel(), context_length, stride, max_windows)
    device = next(model.parameters()).device

    total_nll, n_scored = 0.0, 0
    with torch.no_grad(), tqdm(total=len(windows), desc="perplexity", disable=not show_progress) as progress:
        for batch in _equal_length_batches(windows, batch_size):
            nll, count = _batch_nll(model, ids, batch, device)
            total_nll += nll
            n_scored += count
            progress.update(len(batch))
    return math.exp(total_nll / n_scored)


def _batch_nll(model, ids: torch.Tensor, batch: list[Window], device) -> tuple[float, int]:
    """Summed negative log-likelihood of the new tokens of equal-length windows, and how many there are."""
    inputs = torch.stack([ids[w.begin : w.end] for w in batch]).to(device)  # (B, T)
    targets = inputs.clone()
    for row, w in enumerate(batch):
        targets[row, : inputs.shape[1] - w.n_new] = -100  # already scored by the previous window
    logits = model(input_ids=inputs, use_cache=False).logits  # (B, T, V)
    # Position t predicts token t + 1: drop the last logit and the first target.
    logits = logits[:, :-1].float().flatten(0, 1)  # (B * (T - 1), V)
    targets = targets[:, 1:].flatten()  # (B * (T - 1),)
    nll = F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")
    return nll.item(), int((targets != -100).sum())


def _equal_length_batches(windows: list[Window], batch_size: int):
    """Group consecutive windows into batches of at most ``batch_size`` windows of the same length.

    Only the final window can be shorter than the others, so this never pads.
    """
    batch: list[Window] = []
    for window in windows:
        length = window.end - window.begin
        if batch and (len(batch) == batch_size or length != batch[0].end - batch[0].begin):
            yield batch
            batch = []
        batch.append(window)
    if batch:
        yield batch


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
