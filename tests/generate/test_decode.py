"""Decoding against transformers' `model.generate` (same settings, same seed → same tokens) and a no-cache loop."""

import copy

import pytest
import torch
from transformers.generation.logits_process import LogitsProcessorList, RepetitionPenaltyLogitsProcessor

import lowbit
from lowbit.generate import GenerateConfig, generate_ids
from tests.tiny_models import tiny_llama, tiny_qwen2

EOS = 2


@pytest.fixture(scope="module")
def batch():
    """Two prompts, the second left-padded by three tokens.

    Tied random models mostly repeat one token; the parity tests use untied ones, whose outputs vary.
    """
    torch.manual_seed(1)
    ids = torch.randint(3, 300, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    ids[1, :3] = 0
    return ids, mask


def hf_generate(model, ids, mask, **kwargs) -> list[list[int]]:
    """transformers' tokens after the prompt, cut after the first EOS (transformers pads the rest)."""
    eos = kwargs.get("eos_token_id", EOS)
    out = model.generate(input_ids=ids, attention_mask=mask, pad_token_id=0, **kwargs)[:, ids.shape[1] :]
    rows = []
    for row in out.tolist():
        rows.append(row[: row.index(eos) + 1] if eos in row else row)
    return rows


GREEDY = [dict(max_new_tokens=24), dict(max_new_tokens=24, repetition_penalty=1.5)]


@pytest.mark.parametrize("make", [lambda: tiny_llama(tie=False), tiny_qwen2])
@pytest.mark.parametrize("kw", GREEDY)
def test_greedy_matches_transformers(make, kw, batch):
    model = make()
    ids, mask = batch
    assert generate_ids(model, ids, GenerateConfig(**kw), attention_mask=mask) == hf_generate(
        model, ids, mask, do_sample=False, **kw)  # fmt: skip


def test_repetition_penalty_on_generated_tokens_only(batch):
    """penalize_prompt=False equals transformers' processor told to ignore the prompt."""
    model = tiny_llama(tie=False)
    # A prompt that ends in what the model likes to say next, so that penalising it changes the output.
    ids = batch[0][:1]
    ids = torch.cat([ids, torch.tensor(generate_ids(model, ids, GenerateConfig(max_new_tokens=6)))], dim=1)
    mask = torch.ones_like(ids)
    proc = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(2.0, prompt_ignore_length=ids.shape[1])])
    want = hf_generate(model, ids, mask, do_sample=False, max_new_tokens=20, logits_processor=proc)
    got = generate_ids(model, ids, GenerateConfig(max_new_tokens=20, repetition_penalty=2.0, penalize_prompt=False))
    assert got == want
    assert got != generate_ids(model, ids, GenerateConfig(max_new_tokens=20, repetition_penalty=2.0))


SAMPLING = [
    dict(temperature=0.8),
    dict(temperature=1.3, top_k=12),
    dict(top_p=0.7, repetition_penalty=1.2),
    dict(temperature=0.6, top_k=30, top_p=0.9, repetition_penalty=1.3),
]


@pytest.mark.parametrize("kw", SAMPLING)
def test_seeded_sampling_matches_transformers(kw, batch):
    """transformers draws from torch's global generator; lowbit's seed makes a private one with the same stream."""
    model = tiny_llama()
    ids, mask = batch
    kw = {"top_k": 0, **kw}  # transformers' default top_k is 50; lowbit's is off
    torch.manual_seed(1234)
    want = hf_generate(model, ids, mask, do_sample=True, max_new_tokens=24, **kw)
    got = generate_ids(model, ids, GenerateConfig(do_sample=True, max_new_tokens=24, seed=1234, **kw), mask)
    assert got == want
    assert got != generate_ids(model, ids, GenerateConfig(do_sample=True, max_new_tokens=24, seed=99, **kw), mask)


def frequent_token(model, ids) -> int:
    """A token greedy decoding produces early: as EOS it ends beams at different steps."""
    return generate_ids(model, ids, GenerateConfig(max_new_tokens=3))[0][-1]


BEAMS = [
    dict(num_beams=3, max_new_tokens=12),
    dict(num_beams=4, max_new_tokens=10, length_penalty=0.3),
    dict(num_beams=4, max_new_tokens=10, length_penalty=2.0, early_stopping=True),
    dict(num_beams=2, max_new_tokens=10, repetition_penalty=1.4),
]


@pytest.mark.parametrize("kw", BEAMS)
@pytest.mark.parametrize("eos", ["model", "frequent"])
def test_beam_search_matches_transformers(kw, eos, batch):
    model = tiny_qwen2(seed=3)  # untied: its random outputs vary more than a tied model's
    ids, mask = batch
    eos_id = EOS if eos == "model" else frequent_token(model, ids[:1])
    want = hf_generate(model, ids, mask, do_sample=False, eos_token_id=eos_id, **kw)
    got = generate_ids(model, ids, GenerateConfig(eos_token_id=eos_id, **kw), attention_mask=mask)
    assert got == want


def no_cache_greedy(model, ids: torch.Tensor, n: int) -> list[int]:
    """Reference: the whole sequence through the model at every step, no KV cache."""
    seq = ids
    for _ in range(n):
        nxt = model(seq).logits[:, -1].argmax(-1)
        seq = torch.cat([seq, nxt[:, None]], dim=1)
    return seq[0, ids.shape[1] :].tolist()


def test_kv_cache_decoding_equals_full_recompute_on_quantized_model(batch):
    """float64 so that near-ties in a random model cannot flip; QuantLinear layers decode like nn.Linear."""
    model = tiny_llama(seed=5)
    lowbit.quantize(model, lowbit.QuantConfig(format="nf4", exclude=("lm_head",)))
    model = model.double()
    ids = batch[0][:1]
    with torch.no_grad():
        want = no_cache_greedy(model, ids, 16)
    assert generate_ids(model, ids, GenerateConfig(max_new_tokens=16, eos_token_id=299)) == [want]


def test_quantized_model_matches_transformers_beam(batch):
    model = tiny_qwen2(seed=6)
    lowbit.quantize(model, lowbit.QuantConfig(format="int4", group_size=32))
    ids, mask = batch
    kw = dict(num_beams=3, max_new_tokens=8)
    assert generate_ids(model, ids, GenerateConfig(**kw), mask) == hf_generate(model, ids, mask, do_sample=False, **kw)


def test_bad_inputs():
    model = tiny_llama()
    with pytest.raises(ValueError, match="shape"):
        generate_ids(model, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="tokenizer"):
        generate_ids(model, torch.tensor([[1, 2]]), stop_strings=("x",))
    with pytest.raises(TypeError):
        generate_ids(model, torch.tensor([[1, 2]]), beams=3)


def test_lora_model_matches_transformers(batch):
    """A model with LoRA layers (random B, so the adapter matters) decodes like transformers decodes it."""
    peft = pytest.importorskip("lowbit.peft")
    model = tiny_qwen2(seed=7)
    base = generate_ids(copy.deepcopy(model), batch[0], GenerateConfig(max_new_tokens=10), batch[1])
    peft.apply_lora(model, peft.LoraConfig(r=4, alpha=32, target_modules=("q_proj", "v_proj", "down_proj"),
                                           init_lora_weights=False))  # fmt: skip
    ids, mask = batch
    got = generate_ids(model, ids, GenerateConfig(max_new_tokens=10), mask)
    assert got == hf_generate(model, ids, mask, do_sample=False, max_new_tokens=10)
    assert got != base
