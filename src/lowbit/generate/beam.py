"""Beam search with a KV cache and length penalty.

Each batch row keeps ``num_beams`` running hypotheses. At every step each running beam adds the
log-probabilities of all next tokens to its running score (the sum of its tokens' log-probabilities),
and the best ``2 · num_beams`` (more with several EOS ids) continuations over all beams × vocabulary are
ranked. A continuation that ends (EOS, stop string or the length limit) and ranks among the first
``num_beams`` becomes a finished hypothesis with score

    score(y) = Σ_t log p(y_t | y_<t, x) / |y|^length_penalty          (|y| = generated tokens, EOS included)

(Wu et al. 2016 normalise by length the same way; length_penalty > 0 favours longer outputs). The best
``num_beams`` unfinished continuations run on, each continuing its parent's KV cache (the cache rows are
reordered). A row is done when ``num_beams`` hypotheses are finished and the best running beam, normalised by
the current length, cannot beat the worst of them — or, with ``early_stopping``, as soon as ``num_beams`` are
finished. This is transformers' beam search (``early_stopping=False`` heuristic), so both return the same text.
"""

from __future__ import annotations

from typing import Callable

import torch

from lowbit.generate.config import GenerateConfig
from lowbit.generate.decode import KVDecoder, ignore_mask
from lowbit.generate.logits import process_scores

NEG = -1.0e9  # "impossible" score: keeps shapes fixed where a beam has no valid continuation


class _Finished:
    """The best ``n`` finished hypotheses of one batch row: (normalised score, generated ids)."""

    def __init__(self, n: int) -> None:
        self.n, self.items = n, []

    def add(self, score: float, ids: list[int]) -> None:
        self.items.append((score, ids))
        self.items.sort(key=lambda item: -item[0])  # stable: an earlier hypothesis wins a tie
        del self.items[self.n :]

    @property
    def full(self) -> bool:
        return len(self.items) == self.n

    def worst(self) -> float:
        return self.items[-1][0]


def beam_search(model, input_ids: torch.Tensor, config: GenerateConfig, attention_mask: torch.Tensor | None,
                eos: tuple[int, ...], is_done: Callable[[int, list[int]], bool] | None = None) -> list[list[int]]:  # fmt: skip
    """Best hypothesis (generated ids) per row of ``input_ids`` (B, T); see the module docstring."""
    batch, prompt_len = input_ids.shape
    k, lp = config.num_beams, config.length_penalty
    n_keep = max(2, 1 + len(eos)) * k  # enough candidates that k of them can always run on
    ids = input_ids.repeat_interleave(k, dim=0)  # (B·k, T): every beam starts from the prompt
    mask = attention_mask.repeat_interleave(k, dim=0) if attention_mask is not None else None
    decoder = KVDecoder(model, ids, mask)
    running = torch.zeros(batch, k, device=ids.device)  # (B, k) sums of log-probabilities
    running[:, 1:] = NEG  # the k start beams are identical: expand only the first one at step 0
    finished = [_Finished(k) for _ in range(batch)]
    closed = [False] * batch  # no finished hypothesis can be improved any more
    eos_t = torch.tensor(eos, dtype=torch.long, device=ids.device)
    with torch.no_grad():
        logits = decoder.forward(ids)
        for step in range(config.max_new_tokens):
            gen_len = step + 1
            logp = process_scores(torch.log_softmax(logits, dim=-1), ids, config,
                                  ignore_mask(ids, mask, prompt_len, config))  # fmt: skip  (B·k, V)
            vocab = logp.shape[-1]
            total = (logp.view(batch, k, vocab) + running[:, :, None]).view(batch, k * vocab)
            cand_scores, flat = torch.topk(total, n_keep, dim=1)  # (B, n_keep), best first
            parent, token = flat // vocab, flat % vocab
            parent_rows = parent + torch.arange(batch, device=ids.device)[:, None] * k  # rows of ids / the cache
            cand_ids = torch.cat([ids[parent_rows.flatten()], token.flatten()[:, None]], dim=1)  # (B·n_keep, L+1)
            ends = _ends(cand_ids, token, eos_t, prompt_len, is_done, last=gen_len == config.max_new_tokens)
            _collect(finished, closed, cand_scores, cand_ids, ends, prompt_len, k, gen_len, lp, config.early_stopping)
            # The best k candidates that did not end run on.
            running, pick = torch.topk(cand_scores + ends.float() * NEG, k, dim=1)  # (B, k)
            rows = parent_rows.gather(1, pick).flatten()  # (B·k,) parent row of each new beam
            ids = cand_ids.view(batch, n_keep, -1).gather(1, pick[:, :, None].expand(-1, -1, cand_ids.shape[1]))
            ids = ids.reshape(batch * k, -1)
            mask = None if mask is None else torch.cat([mask[rows], mask.new_ones(batch * k, 1)], dim=1)
            for b in range(batch):  # can the best running beam still beat the worst finished one?
                best = (running[b, 0] / gen_len**lp).item()  # float32, like the stored scores
                if not closed[b] and finished[b].full and best <= finished[b].worst():
                    closed[b] = True
            full = all(f.full for f in finished)
            if all(closed) or bool(ends.all()) or (config.early_stopping and full):
                break
            decoder.reorder(rows)
            logits = decoder.advance(ids[:, -1])
    return [f.items[0][1] for f in finished]


def _ends(cand_ids: torch.Tensor, token: torch.Tensor, eos_t: torch.Tensor, prompt_len: int,
          is_done: Callable | None, last: bool) -> torch.Tensor:  # fmt: skip
    """(B, n_keep) bool: the candidate ends here (EOS, stop string, or the last allowed token)."""
    if last:
        return torch.ones_like(token, dtype=torch.bool)
    ends = torch.isin(token, eos_t) if eos_t.numel() else torch.zeros_like(token, dtype=torch.bool)
    if is_done is not None:
        flat = ends.flatten()
        for i, row in enumerate(cand_ids[:, prompt_len:].tolist()):
            flat[i] = flat[i] or is_done(i, row)
        ends = flat.view_as(token)
    return ends


def _collect(finished: list[_Finished], closed: list[bool], cand_scores: torch.Tensor, cand_ids: torch.Tensor,
             ends: torch.Tensor, prompt_len: int, k: int, gen_len: int, lp: float, early_stopping: bool) -> None:  # fmt: skip
    """Add the ending candidates among each row's top k to its finished hypotheses (score / length^lp)."""
    n_keep = cand_scores.shape[1]
    normed = cand_scores / gen_len**lp  # (B, n_keep) float32
    for b in range(len(finished)):
        if closed[b] or (early_stopping and finished[b].full):
            continue
        for j in range(k):  # candidates ranked below k only back up the running beams
            if ends[b, j]:
                row = cand_ids[b * n_keep + j, prompt_len:].tolist()
                finished[b].add(normed[b, j].item(), row)
