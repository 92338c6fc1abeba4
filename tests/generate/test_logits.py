"""Score processing against float64 loop references and against transformers' own logits processors."""

import math

import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from lowbit.generate import GenerateConfig, process_scores, repetition_penalty, top_k_filter, top_p_filter


def ref_top_p(row: list[float], p: float) -> set[int]:
    """Nucleus by its definition: most likely tokens first, until their probability mass reaches p."""
    z = max(row)
    probs = [math.exp(s - z) for s in row]
    total = sum(probs)
    order = sorted(range(len(row)), key=lambda i: -row[i])
    kept, mass = set(), 0.0
    for i in order:
        kept.add(i)
        mass += probs[i] / total
        if mass >= p:
            break
    return kept


def ref_penalty(row: list[float], seen: set[int], theta: float) -> list[float]:
    return [(s * theta if s < 0 else s / theta) if i in seen else s for i, s in enumerate(row)]


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9, 0.99])
def test_top_p_keeps_the_nucleus(p):
    torch.manual_seed(0)
    scores = torch.randn(4, 50) * 3
    out = top_p_filter(scores, p)
    for b in range(4):
        kept = {i for i in range(50) if out[b, i] > float("-inf")}
        assert kept == ref_top_p(scores[b].double().tolist(), p)
        assert torch.equal(out[b][list(kept)], scores[b][list(kept)])  # survivors unchanged


def test_top_k_and_penalty_against_loops():
    torch.manual_seed(1)
    scores = torch.randn(3, 40)
    out = top_k_filter(scores, 5)
    for b in range(3):
        top5 = sorted(range(40), key=lambda i: -scores[b, i].item())[:5]
        assert {i for i in range(40) if out[b, i] > float("-inf")} == set(top5)
    tokens = torch.randint(0, 40, (3, 12))
    ignore = torch.zeros(3, 12, dtype=torch.bool)
    ignore[1, :4] = True  # e.g. left padding of row 1
    got = repetition_penalty(scores, tokens, 1.7, ignore)
    for b in range(3):
        seen = {t for t, skip in zip(tokens[b].tolist(), ignore[b].tolist()) if not skip}
        want = ref_penalty(scores[b].double().tolist(), seen, 1.7)
        torch.testing.assert_close(got[b].double(), torch.tensor(want, dtype=torch.float64), rtol=1e-6, atol=1e-7)


def test_processing_equals_transformers_processors():
    """The whole chain against transformers' processors, in their order, bit for bit."""
    torch.manual_seed(2)
    scores = torch.randn(3, 64) * 2
    tokens = torch.randint(0, 64, (3, 10))
    cfg = GenerateConfig(do_sample=True, temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.3)
    want = scores.clone()
    for proc in (RepetitionPenaltyLogitsProcessor(1.3), TemperatureLogitsWarper(0.7), TopKLogitsWarper(20),
                 TopPLogitsWarper(0.8)):  # fmt: skip
        want = proc(tokens, want)
    assert torch.equal(process_scores(scores, tokens, cfg), want)


def test_config_validation():
    for bad in (dict(temperature=0), dict(top_p=0), dict(top_p=1.5), dict(max_new_tokens=0), dict(top_k=-1),
                dict(num_beams=0), dict(repetition_penalty=0), dict(num_beams=2, do_sample=True),
                dict(stop_strings=("",)), dict(eos_token_id=-1), dict(version=99)):  # fmt: skip
        with pytest.raises(ValueError):
            GenerateConfig(**bad)
    cfg = GenerateConfig(stop_strings="\n", eos_token_id=[1, 2])
    assert cfg.stop_strings == ("\n",) and cfg.eos_token_id == (1, 2)
    assert GenerateConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown"):
        GenerateConfig.from_dict({"beams": 2})
