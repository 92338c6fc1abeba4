"""lowbit.evaluate.perplexity against a float64 reference that scores tokens one by one."""

import copy
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from lowbit.evaluate import perplexity, reference_text
from lowbit.evaluate.perplexity import Window, sliding_windows

TEXT = reference_text(1500)  # 351 SmolLM2 tokens


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    return smollm2[1]


@pytest.fixture(scope="module")
def tiny_model(tokenizer):
    """A random 2-layer Llama over the real vocabulary; a large init makes its predictions far from uniform,
    so scoring the wrong tokens would move the perplexity a lot."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.3,
    )
    return AutoModelForCausalLM.from_config(config).eval()


def reference_perplexity(model, ids, context_length, stride, max_windows=None):
    """Score window by window in float64, remembering which token positions already have a score."""
    n = len(ids)
    has_score = [False] * n
    nll = []
    starts = list(range(0, n, stride))
    if max_windows is not None:
        starts = starts[:max_windows]
    for start in starts:
        stop = min(start + context_length, n)
        # The window's first token has no context inside the window, so it is never a target here.
        targets = [i for i in range(start + 1, stop) if not has_score[i]]
        if not targets:
            continue
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids[start:stop]])).logits[0]  # (T, V)
        log_probs = torch.log_softmax(logits.double(), dim=-1)
        for i in targets:
            nll.append(-log_probs[i - 1 - start, ids[i]].item())  # logit row of token i - 1 predicts token i
            has_score[i] = True
    return math.exp(math.fsum(nll) / len(nll)), len(nll)


@pytest.mark.parametrize(
    "context_length, stride, max_windows, batch_size",
    [
        (64, 64, None, 1),  # non-overlapping, short last window
        (64, 64, 5, 2),  # fixed number of windows, batched
        (64, 24, None, 1),  # sliding: each window scores 24 new tokens with >= 40 of context
        (64, 24, 7, 3),
        (128, 128, None, 4),  # a batch of full windows, then the short last one alone
    ],
)
def test_matches_float64_reference(tiny_model, tokenizer, context_length, stride, max_windows, batch_size):
    ids = tokenizer(TEXT).input_ids
    assert len(ids) % context_length != 0  # the last window is a short one
    expected, n_scored = reference_perplexity(tiny_model, ids, context_length, stride, max_windows)
    got = perplexity(
        tiny_model, tokenizer, TEXT, context_length=context_length, stride=stride,
        max_windows=max_windows, batch_size=batch_size,
    )
    assert got == pytest.approx(expected, rel=1e-5)
    if max_windows is None:  # the reference's own bookkeeping: which tokens never get a score
        never_scored = math.ceil(len(ids) / stride) if stride == context_length else 1  # window starts / token 0
        assert n_scored == len(ids) - never_scored


def test_window_plan():
    assert sliding_windows(10, context_length=4, stride=2) == [
        Window(0, 4, 4), Window(2, 6, 2), Window(4, 8, 2), Window(6, 10, 2)
    ]
    assert sliding_windows(10, context_length=4, stride=4) == [Window(0, 4, 4), Window(4, 8, 4), Window(8, 10, 2)]
    assert sliding_windows(10, context_length=4, stride=4, max_windows=2) == [Window(0, 4, 4), Window(4, 8, 4)]
    assert sliding_windows(3, context_length=4, stride=4, max_windows=2) == [Window(0, 3, 3)]


def test_overlap_changes_the_result(tiny_model, tokenizer):
    """Guards the reference comparison: the tests above would not notice if all settings gave one number."""
    plain = perplexity(tiny_model, tokenizer, TEXT, context_length=64, stride=64)
    sliding = perplexity(tiny_model, tokenizer, TEXT, context_length=64, stride=24)
    assert abs(plain - sliding) / plain > 1e-3


def test_bfloat16_model_is_scored_in_float32(tiny_model, tokenizer):
    full = perplexity(tiny_model, tokenizer, TEXT, context_length=64, stride=64, max_windows=4)
    half_model = copy.deepcopy(tiny_model).to(torch.bfloat16)
    half = perplexity(half_model, tokenizer, TEXT, context_length=64, stride=64, max_windows=4, show_progress=True)
    assert math.isfinite(half) and half == pytest.approx(full, rel=0.05)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(context_length=64, stride=65), "must not exceed"),
        (dict(context_length=0), "context_length must be a positive int"),
        (dict(context_length=1, stride=1), "at least 2"),
        (dict(stride=-1), "stride must be a positive int"),
        (dict(stride=2.5), "stride must be a positive int"),
        (dict(batch_size=0), "batch_size must be a positive int"),
        (dict(max_windows=0), "max_windows must be a positive int"),
        (dict(max_windows=True), "max_windows must be a positive int"),
        (dict(text=""), "at least 2"),
        (dict(text="a"), "at least 2"),
    ],
)
def test_bad_arguments(tiny_model, tokenizer, kwargs, message):
    kwargs = {"text": TEXT, **kwargs}
    with pytest.raises(ValueError, match=message):
        perplexity(tiny_model, tokenizer, **kwargs)


@pytest.mark.parametrize("n_chars", [0, -5, 1.5, 10**9])
def test_reference_text_rejects_bad_lengths(n_chars):
    with pytest.raises(ValueError, match="n_chars"):
        reference_text(n_chars)


def test_reference_text_is_deterministic_prose():
    text = reference_text()
    assert text == reference_text() and len(text) > 100_000
    assert reference_text(500) == text[:500]
    assert "statement" in text[:500]


@pytest.mark.slow
def test_smollm2_perplexity_is_plausible(smollm2):
    """4 non-overlapping windows of 256 tokens of Python documentation; measured 17.40 (torch 2.13 CPU)."""
    model, tokenizer = smollm2
    ppl = perplexity(model, tokenizer, reference_text(), context_length=256, stride=256, max_windows=4, batch_size=4)
    assert math.isfinite(ppl) and 5 < ppl < 100
