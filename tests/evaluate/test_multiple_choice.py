"""Multiple-choice scoring against a float64 full-sequence reference, and on the real model."""

import json
from pathlib import Path

import pytest
import torch

from lowbit.evaluate import MCQuestion, evaluate_multiple_choice, load_mc_jsonl
from tests.generate.conftest import smol_tokenizer, tiny_llama_for  # noqa: F401 (fixture)

SAMPLE = Path(__file__).parent / "data" / "mc_sample.jsonl"


def ref_loglik(model, tokenizer, prompt: str, continuation: str) -> tuple[float, int]:
    """Σ log p(continuation tokens | prompt), one float64 forward pass of the whole sequence, no padding."""
    ctx = tokenizer(prompt).input_ids
    cont = tokenizer(continuation, add_special_tokens=False).input_ids
    with torch.no_grad():
        logits = model(torch.tensor([ctx + cont])).logits[0].double()
    total = 0.0
    for t, token in enumerate(cont):
        total += torch.log_softmax(logits[len(ctx) + t - 1], dim=-1)[token].item()
    return total, len(cont)


@pytest.mark.parametrize("normalization", ["tokens", "chars", "none"])
def test_scores_equal_the_reference_log_likelihoods(smol_tokenizer, normalization):
    model = tiny_llama_for(smol_tokenizer, seed=1).double()
    questions = load_mc_jsonl(SAMPLE)[:5]
    result = evaluate_multiple_choice(model, smol_tokenizer, questions, normalization=normalization)
    for q, scores, pred in zip(questions, result.scores, result.predictions):
        want = []
        for choice in q.choices:
            lp, n = ref_loglik(model, smol_tokenizer, f"Question: {q.question}\nAnswer:", f" {choice}")
            want.append(lp / {"tokens": n, "chars": len(choice) + 1, "none": 1}[normalization])
        torch.testing.assert_close(torch.tensor(scores, dtype=torch.float64), torch.tensor(want, dtype=torch.float64),
                                   rtol=1e-9, atol=1e-9)  # fmt: skip
        assert pred == max(range(len(want)), key=want.__getitem__)
    correct = sum(p == q.answer for p, q in zip(result.predictions, questions))
    assert result.accuracy == correct / 5 and result.n_questions == 5


def test_letters_style_and_per_subject(smol_tokenizer):
    model = tiny_llama_for(smol_tokenizer, seed=2)
    q = MCQuestion("2 + 2 = ?", ("3", "4", "5"), answer=1, subject="math")
    result = evaluate_multiple_choice(model, smol_tokenizer, [q, q], style="letters")
    prompt = "Question: 2 + 2 = ?\nA. 3\nB. 4\nC. 5\nAnswer:"
    want = [ref_loglik(model, smol_tokenizer, prompt, f" {letter}")[0] for letter in "ABC"]
    torch.testing.assert_close(torch.tensor(result.scores[0]), torch.tensor(want), rtol=1e-5, atol=1e-5)
    assert set(result.per_subject) == {"math"} and "| **all (2)**" in result.to_markdown()


def test_loader_reads_letters_and_rejects_bad_lines(tmp_path):
    questions = load_mc_jsonl(SAMPLE)
    assert len(questions) == 24 and all(len(q.choices) == 4 for q in questions)
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"question": "x?", "choices": ["a", "b"], "answer": "B"}) + "\n\n")
    assert load_mc_jsonl(path)[0].answer == 1
    bad_rows = [{"question": "x?", "choices": ["a"], "answer": 0},
                {"question": "x?", "choices": ["a", "b"], "answer": 5},
                {"choices": ["a", "b"], "answer": 0},
                {"question": "x?", "choices": ["a", "b"], "answer": "Z"}]
    for bad in bad_rows:
        path.write_text(json.dumps(bad) + "\n")
        with pytest.raises(ValueError, match=":1:"):
            load_mc_jsonl(path)
    path.write_text("")
    with pytest.raises(ValueError, match="no questions"):
        load_mc_jsonl(path)
    with pytest.raises(ValueError, match="normalization"):
        evaluate_multiple_choice(None, None, questions, normalization="bytes")


@pytest.mark.slow
def test_smollm2_beats_chance_on_the_sample(smollm2):
    model, tokenizer = smollm2
    result = evaluate_multiple_choice(model, tokenizer, SAMPLE)
    assert result.accuracy >= 0.45  # chance is 0.25; measured 0.54 (13 of 24)
