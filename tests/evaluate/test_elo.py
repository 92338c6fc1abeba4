"""Elo tournament: the update rule by hand, bootstrap intervals, judges."""

import copy
import json
import math

import pytest
import torch

from lowbit.evaluate import (
    Match,
    bootstrap_elo,
    elo_ratings,
    human_judge,
    likelihood_judge,
    model_judge,
    play_tournament,
    read_answers,
    read_prompts,
    write_answers,
)
from tests.generate.conftest import smol_tokenizer, tiny_llama_for  # noqa: F401 (fixture)


def test_elo_update_by_hand():
    matches = [Match(0, "a", "b", 1.0), Match(0, "b", "c", 0.5), Match(1, "c", "a", 1.0)]
    r = elo_ratings(matches, k=32, initial=1000)
    # 1) a beats b from 1000/1000: expected 0.5 → a 1016, b 984
    # 2) b (984) ties c (1000): E_b = 1/(1+10^(16/400)); b += 32(0.5 - E_b)
    e_b = 1 / (1 + 10 ** (16 / 400))
    b, c = 984 + 32 * (0.5 - e_b), 1000 - 32 * (0.5 - e_b)
    # 3) c beats a (1016)
    e_c = 1 / (1 + 10 ** ((1016 - c) / 400))
    c2, a2 = c + 32 * (1 - e_c), 1016 - 32 * (1 - e_c)
    assert r == pytest.approx({"a": a2, "b": b, "c": c2}, abs=1e-9)
    assert math.isclose(sum(r.values()), 3000)  # Elo is zero-sum


def test_tournament_and_bootstrap_rank_the_better_player_first():
    prompts = [f"q{i}" for i in range(6)]
    answers = {"long": ["x" * 20] * 6, "mid": ["x" * 10] * 6, "short": ["x"] * 6}
    judge = lambda p, a, b: 1.0 if len(a) > len(b) else (0.5 if len(a) == len(b) else 0.0)  # noqa: E731
    matches = play_tournament(answers, prompts, judge)
    assert len(matches) == 6 * 3 * 2  # prompts × pairs × both orders
    table = bootstrap_elo(matches, rounds=200, seed=1)
    assert [r.player for r in table.rows] == ["long", "mid", "short"]
    best, worst = table.rows[0], table.rows[-1]
    assert best.wins == 24 and best.losses == 0 and worst.losses == 24
    assert best.lower > worst.upper and best.lower <= best.rating <= best.upper
    assert table == bootstrap_elo(matches, rounds=200, seed=1)  # reproducible
    assert "| 1 | long |" in table.to_markdown()
    with pytest.raises(ValueError):
        play_tournament({"solo": ["a"]}, ["q"], judge)
    with pytest.raises(ValueError, match="answers"):
        play_tournament({"a": ["x"], "b": []}, ["q"], judge)
    with pytest.raises(ValueError):
        Match(0, "a", "b", 0.7)


def test_human_judge_asks_until_it_understands():
    replies = iter(["maybe", "B"])
    shown = []
    judge = human_judge(read=lambda _: next(replies), write=shown.append)
    assert judge("Q?", "first", "second") == 0.0
    assert "first" in shown[0] and "second" in shown[0] and shown[1] == "please type a, b or t"
    assert human_judge(read=lambda _: "t", write=lambda s: None)("q", "a", "b") == 0.5


def test_model_judge_reads_the_verdict_from_the_next_token(smol_tokenizer):
    model = tiny_llama_for(smol_tokenizer)
    judge = model_judge(model, smol_tokenizer)
    verdict = judge("What is 2 + 2?", "4", "five")
    assert verdict in (0.0, 1.0)
    assert model_judge(model, smol_tokenizer, tie_margin=1e9)("q", "a", "b") == 0.5


def reference_mean_logprob(model, tokenizer, prompt: str, answer: str) -> float:
    """Mean log p(answer token | everything before) in float64, from one forward pass over the whole text."""
    turn = [{"role": "user", "content": prompt}]
    context = tokenizer(tokenizer.apply_chat_template(turn, add_generation_prompt=True, tokenize=False)).input_ids
    target = tokenizer(answer, add_special_tokens=False).input_ids
    with torch.no_grad():
        logits = model.double()(input_ids=torch.tensor([context + target])).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)[len(context) - 1 : -1]  # row t predicts token t + 1
    return float(logp[torch.arange(len(target)), torch.tensor(target)].mean())


def test_likelihood_judge_prefers_the_answer_the_judge_finds_more_likely(smol_tokenizer):
    model = tiny_llama_for(smol_tokenizer)
    judge = likelihood_judge(model, smol_tokenizer)
    prompt, a, b = "What is the capital of France?", "Paris is the capital.", "Bananas, seven of them."
    ref_a, ref_b = (reference_mean_logprob(copy.deepcopy(model), smol_tokenizer, prompt, x) for x in (a, b))
    assert abs(ref_a - ref_b) > 1e-3  # a random model still has a clear preference between these two
    expected = 1.0 if ref_a > ref_b else 0.0
    assert judge(prompt, a, b) == expected and judge(prompt, b, a) == 1.0 - expected  # no position bias
    assert judge(prompt, a, a) == 0.5 and judge(prompt, "", "") == 0.5
    assert judge(prompt, "", a) == 0.0 and judge(prompt, a, "  ") == 1.0  # an empty answer loses
    gap = abs(ref_a - ref_b)
    assert likelihood_judge(model, smol_tokenizer, tie_margin=gap * 1.01)(prompt, a, b) == 0.5
    assert likelihood_judge(model, smol_tokenizer, tie_margin=gap * 0.99)(prompt, a, b) == expected


def test_answers_files_in_both_layouts(tmp_path):
    wide = tmp_path / "wide.jsonl"
    wide.write_text('{"prompt": "q1", "answers": {"b": "b1", "a": "a1"}}\n\n{"prompt": "q2", "answers": '
                    '{"a": "a2", "b": "b2"}}\n')  # fmt: skip
    expected = (["q1", "q2"], {"a": ["a1", "a2"], "b": ["b1", "b2"]})
    assert read_answers(wide) == expected
    long = tmp_path / "long.jsonl"
    long.write_text("".join(json.dumps({"prompt": q, "model": m, "answer": f"{m}{q[1]}"}) + "\n"
                            for m in "ba" for q in ("q1", "q2")))  # fmt: skip
    assert read_answers(long) == expected
    assert read_answers(write_answers(tmp_path / "again.jsonl", *expected)) == expected
    long.write_text('{"prompt": "q1", "model": "a", "answer": "x"}\n{"prompt": "q2", "model": "b", "answer": "y"}\n')
    with pytest.raises(ValueError, match="did not answer"):
        read_answers(long)
    long.write_text('{"prompt": "q1", "model": "a", "answer": "x"}\n{"prompt": "q1", "model": "a", "answer": "y"}\n')
    with pytest.raises(ValueError, match="twice"):
        read_answers(long)
    long.write_text('{"prompt": "q1", "model": "a", "answer": "x"}\nnot json\n')
    with pytest.raises(ValueError, match=r"long.jsonl:2: not JSON"):
        read_answers(long)
    (tmp_path / "p.txt").write_text("first prompt\n\nsecond prompt\n")
    (tmp_path / "p.jsonl").write_text('{"prompt": "first prompt"}\n{"prompt": "second prompt", "id": 2}\n')
    assert read_prompts(tmp_path / "p.txt") == read_prompts(tmp_path / "p.jsonl") == ["first prompt", "second prompt"]
