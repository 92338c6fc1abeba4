"""Multiple-choice evaluation by log-likelihood ("rank classification"), for MMLU-style JSONL files.

Each answer choice is scored by how likely the model finds it as a continuation of the question:

    score(c) = Σ_{t ∈ c} log p(c_t | prompt, c_<t)                  normalization="none"
    score(c) = Σ_{t ∈ c} log p(c_t | prompt, c_<t) / |c|_tokens      normalization="tokens" (T-Few/IA3, Liu 2022)
    score(c) = Σ_{t ∈ c} log p(c_t | prompt, c_<t) / |c|_chars       normalization="chars" (lm-eval's acc_norm)

and the prediction is the best-scoring choice. Without normalization longer answers lose just for being long
(every extra token multiplies in a probability < 1), hence the division — on log-probabilities, not on
probabilities. ``style="letters"`` instead lists the choices as "A. …" under the question and scores the
single-letter continuations " A", " B", … (MMLU's original format), where no normalization is needed.

File format, one question per line:
    {"question": "…", "choices": ["…", "…", "…", "…"], "answer": 2, "subject": "geography"}
``answer`` is a 0-based index or a letter ("C"); ``subject`` is optional (accuracy is also reported per subject).
"""

from __future__ import annotations

import json
import os
import string
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lowbit.hf_compat import cache_kwarg, output_cache

NORMALIZATIONS = ("tokens", "chars", "none")
STYLES = ("cloze", "letters")


@dataclass(frozen=True)
class MCQuestion:
    question: str
    choices: tuple[str, ...]
    answer: int
    subject: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "choices", tuple(self.choices))
        if len(self.choices) < 2 or not all(isinstance(c, str) and c for c in self.choices):
            raise ValueError(f"a question needs at least two non-empty choices, got {self.choices!r}")
        a = self.answer
        if isinstance(a, bool) or not isinstance(a, int) or not 0 <= a < len(self.choices):
            raise ValueError(f"answer must index one of the {len(self.choices)} choices, got {self.answer!r}")


@dataclass
class MCResult:
    """Accuracy overall and per subject; ``scores[i][j]`` is choice j's score for question i."""

    accuracy: float
    n_questions: int
    normalization: str
    style: str
    predictions: list[int] = field(default_factory=list)
    scores: list[list[float]] = field(default_factory=list)
    per_subject: dict[str, float] = field(default_factory=dict)

    def to_markdown(self) -> str:
        lines = ["| subject | accuracy |", "|---|---:|"]
        lines += [f"| {s} | {a:.3f} |" for s, a in sorted(self.per_subject.items())]
        lines.append(f"| **all ({self.n_questions})** | **{self.accuracy:.3f}** |")
        return "\n".join(lines)

    def __str__(self) -> str:
        return (f"multiple choice ({self.style}, normalization={self.normalization}): accuracy {self.accuracy:.3f} "
                f"on {self.n_questions} questions")  # fmt: skip


def load_mc_jsonl(path: str | os.PathLike) -> list[MCQuestion]:
    """Read an MMLU-style JSONL file (see the module docstring); bad lines raise with their line number."""
    questions = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            answer = row["answer"]
            if isinstance(answer, str):
                answer = string.ascii_uppercase.index(answer.strip().upper())
            questions.append(MCQuestion(row["question"], tuple(row["choices"]), answer, row.get("subject")))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}:{number}: not a multiple-choice question ({type(e).__name__}: {e})") from e
    if not questions:
        raise ValueError(f"{path} holds no questions")
    return questions


def prompt_and_continuations(q: MCQuestion, style: str) -> tuple[str, list[str]]:
    """The shared prompt and each choice's continuation text."""
    if style == "letters":
        letters = string.ascii_uppercase[: len(q.choices)]
        options = "\n".join(f"{letter}. {choice}" for letter, choice in zip(letters, q.choices))
        return f"Question: {q.question}\n{options}\nAnswer:", [f" {letter}" for letter in letters]
    return f"Question: {q.question}\nAnswer:", [f" {choice}" for choice in q.choices]


def continuation_logprobs(model, tokenizer, prompt: str, continuations: list[str]) -> list[tuple[float, int]]:
    """(Σ log p of the continuation's tokens, number of tokens) for each continuation of ``prompt``.

    The prompt and each continuation are tokenized separately and concatenated, so every choice is scored on
    the same prompt tokens. The prompt runs once; its KV cache is copied for every choice and the continuations
    run as one right-padded batch after it (MMLU prompts are long and answers short: this is most of the work).
    """
    context = tokenizer(prompt).input_ids
    conts = [tokenizer(c, add_special_tokens=False).input_ids for c in continuations]
    if not context or any(not c for c in conts):
        raise ValueError("the prompt and every choice must encode to at least one token")
    device = next(model.parameters()).device
    with torch.no_grad():
        out = model(input_ids=torch.tensor([context], device=device), use_cache=True)
        first = _log_softmax(out.logits[0, -1])  # (V,): predicts every continuation's first token
        rest = _continuation_logits(model, output_cache(out), len(context), conts, device)  # (C, L-1, V) or None
    scored = []
    for i, c in enumerate(conts):
        total = first[c[0]]
        if len(c) > 1:  # position t of the continuation batch predicts continuation token t + 1
            targets = torch.tensor(c[1:], device=device)[:, None]  # (len(c) - 1, 1)
            total = total + _log_softmax(rest[i, : len(c) - 1]).gather(1, targets).sum()
        scored.append((float(total), len(c)))
    return scored


def _log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """log_softmax in float32 at least (bf16/fp16 logits are upcast; float64 stays float64)."""
    return torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)


def _continuation_logits(model, cache, n_context: int, conts: list[list[int]], device) -> torch.Tensor | None:
    """Logits after each continuation token but the last, all continuations in one batch over the shared cache."""
    width = max(map(len, conts)) - 1
    if width == 0:
        return None
    cache.batch_repeat_interleave(len(conts))  # (1, …) → (C, …): every choice continues the same prompt
    ids = torch.tensor([c[:-1] + [0] * (width - len(c) + 1) for c in conts], device=device)  # (C, L-1)
    mask = torch.tensor([[1] * n_context + [1] * (len(c) - 1) + [0] * (width - len(c) + 1) for c in conts],
                        device=device)  # fmt: skip  (C, n_context + L-1)
    positions = torch.arange(n_context, n_context + width, device=device).expand(len(conts), -1)
    return model(input_ids=ids, attention_mask=mask, position_ids=positions, **{cache_kwarg(model): cache}).logits


def evaluate_multiple_choice(model, tokenizer, questions: list[MCQuestion] | str | os.PathLike,
                             normalization: str = "tokens", style: str = "cloze",
                             show_progress: bool = False) -> MCResult:  # fmt: skip
    """Accuracy of ``model`` on ``questions`` (a list, or a JSONL path) by log-likelihood ranking."""
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    if not isinstance(questions, list):
        questions = load_mc_jsonl(questions)
    result = MCResult(0.0, len(questions), normalization, style)
    by_subject: dict[str, list[bool]] = defaultdict(list)
    for q in tqdm(questions, desc="multiple choice", disable=not show_progress):
        prompt, conts = prompt_and_continuations(q, style)
        scored = continuation_logprobs(model, tokenizer, prompt, conts)
        divisors = {"tokens": [n for _, n in scored], "chars": [len(c) for c in conts], "none": [1] * len(conts)}
        scores = [lp / d for (lp, _), d in zip(scored, divisors[normalization])]
        pred = max(range(len(scores)), key=scores.__getitem__)
        result.scores.append(scores)
        result.predictions.append(pred)
        by_subject[q.subject or "(none)"].append(pred == q.answer)
    correct = [p == q.answer for p, q in zip(result.predictions, questions)]
    result.accuracy = sum(correct) / len(correct)
    result.per_subject = {s: sum(v) / len(v) for s, v in by_subject.items()}
    return result
