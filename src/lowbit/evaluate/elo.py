"""Elo tournament: models answer the same prompts, a judge compares answers pairwise, Elo ranks the models.

This is the evaluation QLoRA uses for its chatbots (Dettmers et al. 2023, §5): every pair of models meets on
every prompt, a judge (GPT-4 or a human there; here any callable, a local judge model or a person at the
terminal) says which answer is better, and Elo ratings summarise the outcomes. After a match between A and B
with outcome S_A (1 win, 0.5 tie, 0 loss), with ratings R_A and R_B (Elo 1978):

    E_A = 1 / (1 + 10^((R_B − R_A) / 400))            expected score of A
    R_A ← R_A + K · (S_A − E_A),   R_B ← R_B − K · (S_A − E_A)

Sequential Elo depends on the order of the matches, so — as in the paper — the ratings are averaged over many
random orderings; here each round also resamples the matches with replacement (a bootstrap), which gives a
confidence interval for every rating. Judges are asked about both orders (A, B) and (B, A) to cancel their
preference for the first (or second) position.
"""

from __future__ import annotations

import itertools
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

Judge = Callable[[str, str, str], float]  # (prompt, answer_a, answer_b) → score of A: 1, 0.5 or 0
OUTCOMES = (0.0, 0.5, 1.0)


@dataclass(frozen=True)
class Match:
    prompt_index: int
    player_a: str
    player_b: str
    score_a: float  # 1 = A's answer better, 0.5 = tie, 0 = B's better

    def __post_init__(self) -> None:
        if self.score_a not in OUTCOMES:
            raise ValueError(f"a match outcome is 1 (A wins), 0.5 (tie) or 0 (B wins), got {self.score_a!r}")
        if self.player_a == self.player_b:
            raise ValueError(f"a player cannot play itself ({self.player_a!r})")


def play_tournament(answers: dict[str, list[str]], prompts: list[str], judge: Judge, both_orders: bool = True,
                    progress: bool = False) -> list[Match]:  # fmt: skip
    """Every pair of players on every prompt, judged once per order of presentation (twice with ``both_orders``)."""
    players = sorted(answers)
    if len(players) < 2:
        raise ValueError("a tournament needs at least two players")
    for name in players:
        if len(answers[name]) != len(prompts):
            raise ValueError(f"player {name!r} has {len(answers[name])} answers for {len(prompts)} prompts")
    games = [(i, a, b) for i in range(len(prompts)) for a, b in itertools.combinations(players, 2)]
    if both_orders:
        games += [(i, b, a) for i, a, b in games]
    if progress:
        from tqdm.auto import tqdm

        games = tqdm(games, desc="judging", unit="match")
    return [Match(i, a, b, float(judge(prompts[i], answers[a][i], answers[b][i]))) for i, a, b in games]


def expected_score(rating_a: float, rating_b: float) -> float:
    return 1.0 / (1.0 + 10.0 ** ((rating_b - rating_a) / 400.0))


def elo_ratings(matches: list[Match], k: float = 32.0, initial: float = 1000.0) -> dict[str, float]:
    """Sequential Elo over ``matches`` in the given order; every player starts at ``initial``."""
    ratings: dict[str, float] = {}
    for m in matches:
        ra, rb = ratings.setdefault(m.player_a, initial), ratings.setdefault(m.player_b, initial)
        delta = k * (m.score_a - expected_score(ra, rb))
        ratings[m.player_a], ratings[m.player_b] = ra + delta, rb - delta
    return ratings


@dataclass
class EloRow:
    player: str
    rating: float  # mean over bootstrap rounds
    lower: float
    upper: float
    wins: int
    ties: int
    losses: int


@dataclass
class EloTable:
    rows: list[EloRow] = field(default_factory=list)  # best first
    confidence: float = 0.95
    rounds: int = 0

    def to_markdown(self) -> str:
        pct = f"{self.confidence:.0%}"
        lines = [f"| rank | player | Elo | {pct} CI | wins | ties | losses |", "|---:|---|---:|---|---:|---:|---:|"]
        for rank, r in enumerate(self.rows, start=1):
            lines.append(f"| {rank} | {r.player} | {r.rating:.0f} | {r.lower:.0f} – {r.upper:.0f} | {r.wins} | "
                         f"{r.ties} | {r.losses} |")  # fmt: skip
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_markdown()


def bootstrap_elo(matches: list[Match], rounds: int = 1000, seed: int = 0, k: float = 32.0,
                  initial: float = 1000.0, confidence: float = 0.95) -> EloTable:  # fmt: skip
    """Elo ratings averaged over ``rounds`` bootstrap resamples (random order, drawn with replacement).

    The interval is the central ``confidence`` percentile range of a player's rating over the rounds.
    """
    if not matches:
        raise ValueError("no matches to rate")
    if rounds < 1 or not 0 < confidence < 1:
        raise ValueError(f"rounds must be ≥ 1 and confidence in (0, 1), got {rounds}, {confidence}")
    rng = random.Random(seed)
    players = sorted({m.player_a for m in matches} | {m.player_b for m in matches})
    samples: dict[str, list[float]] = {p: [] for p in players}
    for _ in range(rounds):
        resampled = [matches[rng.randrange(len(matches))] for _ in matches]
        ratings = elo_ratings(resampled, k, initial)
        for p in players:
            samples[p].append(ratings.get(p, initial))  # a player absent from this resample keeps its start
    table = EloTable(confidence=confidence, rounds=rounds)
    for p in players:
        values = sorted(samples[p])
        lo = values[int((1 - confidence) / 2 * (rounds - 1))]
        hi = values[int(round((1 + confidence) / 2 * (rounds - 1)))]
        wins = sum(1 for m in matches if (m.player_a == p and m.score_a == 1) or (m.player_b == p and m.score_a == 0))
        ties = sum(1 for m in matches if p in (m.player_a, m.player_b) and m.score_a == 0.5)
        losses = sum(1 for m in matches if p in (m.player_a, m.player_b)) - wins - ties
        table.rows.append(EloRow(p, sum(values) / rounds, lo, hi, wins, ties, losses))
    table.rows.sort(key=lambda r: -r.rating)
    return table


def human_judge(read: Callable[[str], str] = input, write: Callable[[str], None] = print) -> Judge:
    """A judge that shows the prompt and both answers at the terminal and asks: A, B or T (tie)."""

    def judge(prompt: str, answer_a: str, answer_b: str) -> float:
        write(f"\n=== prompt ===\n{prompt}\n\n--- answer A ---\n{answer_a}\n\n--- answer B ---\n{answer_b}\n")
        while True:
            choice = read("Which answer is better? [a/b/t(ie)] ").strip().lower()
            if choice in ("a", "b", "t", "tie"):
                return {"a": 1.0, "b": 0.0}.get(choice, 0.5)
            write("please type a, b or t")

    return judge


JUDGE_TEMPLATE = ("Compare two answers to the same question and say which one is better: more correct, more "
                  "helpful and clearer.\n\nQuestion: {prompt}\n\nAnswer A: {a}\n\nAnswer B: {b}\n\n"
                  "The better answer is Answer")  # fmt: skip


def model_judge(model, tokenizer, template: str = JUDGE_TEMPLATE, tie_margin: float = 0.0) -> Judge:
    """A local model as judge: it reads both answers and the judge's verdict is whichever of " A" / " B" it
    finds more likely next; a log-probability gap within ``tie_margin`` is a tie. (QLoRA uses GPT-4 this way.)"""
    import torch

    ids_a, ids_b = (tokenizer(s, add_special_tokens=False).input_ids for s in (" A", " B"))
    if len(ids_a) != 1 or len(ids_b) != 1 or ids_a == ids_b:
        raise ValueError("the judge's tokenizer must encode ' A' and ' B' as two different single tokens")
    device = next(model.parameters()).device

    def judge(prompt: str, answer_a: str, answer_b: str) -> float:
        text = template.replace("{prompt}", prompt).replace("{a}", answer_a).replace("{b}", answer_b)
        ids = torch.tensor([tokenizer(text).input_ids], device=device)
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0, -1].float(), dim=-1)
        gap = float(logp[ids_a[0]] - logp[ids_b[0]])
        return 0.5 if abs(gap) <= tie_margin else (1.0 if gap > 0 else 0.0)

    return judge


def generate_answers(players: dict[str, tuple], prompts: list[str], config=None) -> dict[str, list[str]]:
    """Each player's (model, tokenizer) answers every prompt through its chat template (greedy by default)."""
    from lowbit.generate import ChatSession, GenerateConfig

    config = config or GenerateConfig(max_new_tokens=128)
    answers = {}
    for name, (model, tokenizer) in players.items():
        answers[name] = [ChatSession(model, tokenizer, config).send(p) for p in prompts]
    return answers


def likelihood_judge(model, tokenizer, tie_margin: float = 0.0) -> Judge:
    """A local model as a scorer: the better answer is the one it finds more likely after the prompt.

    Each answer's score is its mean log-probability per token, log p(answer | prompt) / |answer| (the prompt in
    the judge's chat template when it has one), so longer answers are not punished for their length alone; a
    gap within ``tie_margin`` nats per token is a tie, an empty answer loses to any other. Unlike `model_judge`
    the judge never sees both answers, so it has no position bias; it rates fluency under its own model more
    than correctness. Scores are cached: every answer meets each other player's twice.
    """
    from lowbit.evaluate.multiple_choice import continuation_logprobs

    chat = bool(getattr(tokenizer, "chat_template", None))
    scores: dict[tuple[str, str], float] = {}

    def score(prompt: str, answer: str) -> float:
        if (prompt, answer) not in scores:
            if not answer.strip():
                scores[prompt, answer] = float("-inf")
            else:
                context, text = prompt, " " + answer.lstrip()
                if chat:  # the answer is the assistant's turn after the templated prompt
                    turn = [{"role": "user", "content": prompt}]
                    context = tokenizer.apply_chat_template(turn, add_generation_prompt=True, tokenize=False)
                    text = answer
                [(total, n)] = continuation_logprobs(model, tokenizer, context, [text])
                scores[prompt, answer] = total / n
        return scores[prompt, answer]

    def judge(prompt: str, answer_a: str, answer_b: str) -> float:
        a, b = score(prompt, answer_a), score(prompt, answer_b)
        if a == b or abs(a - b) <= tie_margin:  # a == b also covers two empty answers (-inf)
            return 0.5
        return 1.0 if a > b else 0.0

    return judge


def read_prompts(path: str | os.PathLike) -> list[str]:
    """Prompts from a .txt file (one per non-empty line) or a JSONL file (a ``"prompt"`` field per line)."""
    path = Path(path)
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix.lower() not in (".jsonl", ".json"):
        return lines
    return [_json_line(path, n, line, ("prompt",))["prompt"] for n, line in enumerate(lines, start=1)]


def read_answers(path: str | os.PathLike) -> tuple[list[str], dict[str, list[str]]]:
    """``(prompts, {player: answers})`` from a JSONL file in either layout:

        {"prompt": "...", "answers": {"model-a": "...", "model-b": "..."}}    one line per prompt, or
        {"prompt": "...", "model": "model-a", "answer": "..."}                one line per answer.

    Every player must answer every prompt (each once).
    """
    path = Path(path)
    table: dict[str, dict[str, str]] = {}  # prompt → player → answer, in file order
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        row = _json_line(path, n, line, ("prompt",))
        pairs = row["answers"].items() if isinstance(row.get("answers"), dict) else None
        if pairs is None:
            pairs = [(_json_line(path, n, line, ("model", "answer"))["model"], row["answer"])]
        for player, answer in pairs:
            if str(player) in table.setdefault(row["prompt"], {}):
                raise ValueError(f"{path}:{n}: {player!r} answers the prompt {row['prompt'][:40]!r} twice")
            table[row["prompt"]][str(player)] = str(answer)
    prompts = list(table)
    players = sorted({p for answers in table.values() for p in answers})
    for prompt, answers in table.items():
        missing = [p for p in players if p not in answers]
        if missing:
            raise ValueError(f"{path}: {', '.join(missing)} did not answer the prompt {prompt[:40]!r}")
    return prompts, {p: [table[q][p] for q in prompts] for p in players}


def write_answers(path: str | os.PathLike, prompts: list[str], answers: dict[str, list[str]]) -> Path:
    """The one-line-per-prompt layout `read_answers` reads."""
    path = Path(path)
    rows = [{"prompt": q, "answers": {p: answers[p][i] for p in sorted(answers)}} for i, q in enumerate(prompts)]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _json_line(path: Path, n: int, line: str, required: tuple[str, ...]) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{n}: not JSON ({e.msg})") from None
    if not isinstance(row, dict) or any(not isinstance(row.get(k), str) for k in required):
        raise ValueError(f"{path}:{n}: expected an object with string field(s) {', '.join(required)}")
    return row
