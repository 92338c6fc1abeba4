"""The static-cache decoder against transformers' uncached forward, and against the dynamic-cache decoder."""

import copy

import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM, Qwen3Config, Qwen3ForCausalLM

import lowbit
from lowbit.generate import GenerateConfig, generate_ids
from lowbit.generate.static import StaticDecoder, layer_windows, supports
from tests.tiny_models import tiny_llama, tiny_qwen2

SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=300, max_position_embeddings=128, tie_word_embeddings=False)  # fmt: skip


def tiny_mistral(window: int) -> MistralForCausalLM:
    torch.manual_seed(0)
    return MistralForCausalLM(MistralConfig(**SHAPE, sliding_window=window)).eval()


def tiny_qwen3() -> Qwen3ForCausalLM:
    torch.manual_seed(0)
    return Qwen3ForCausalLM(Qwen3Config(**SHAPE, head_dim=24)).eval()  # head_dim ≠ hidden / heads on purpose


MODELS = {"llama": lambda: tiny_llama(tie=False), "qwen2": tiny_qwen2, "qwen3": tiny_qwen3,
          "mistral-window-4": lambda: tiny_mistral(4)}  # fmt: skip


def padded_batch(width: int = 7):
    torch.manual_seed(1)
    ids = torch.randint(3, 300, (2, width))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    return ids, mask


@pytest.mark.parametrize("fused_ops", [False, True])
@pytest.mark.parametrize("name", MODELS)
def test_every_step_matches_the_uncached_forward(name, fused_ops):
    """Prompt and 6 steps of a left-padded batch in float64: each step's logits equal transformers' forward over
    the whole sequence so far (no cache, its own masks and positions) at that step's position. With fused_ops
    the norms, rotation and SwiGLU are lowbit's fused ops (their torch references on the CPU)."""
    model = MODELS[name]().double()
    ids, mask = padded_batch()
    new = torch.randint(3, 300, (2, 6), generator=torch.Generator().manual_seed(2))
    decoder = StaticDecoder(model, ids, max_len=ids.shape[1] + 6, attention_mask=mask, fused_ops=fused_ops)
    got = [decoder.forward(ids)] + [decoder.advance(new[:, i]) for i in range(5)]
    full_ids, full_mask = torch.cat([ids, new], 1), torch.cat([mask, torch.ones_like(new)], 1)
    positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        want = model(input_ids=full_ids, attention_mask=full_mask, position_ids=positions).logits.float()
    # transformers' RMSNorm computes in float32 even for float64 inputs; lowbit's keeps float64
    atol = 1e-6 if fused_ops else 1e-9
    for step, logits in enumerate(got):
        torch.testing.assert_close(logits, want[:, ids.shape[1] - 1 + step], rtol=0, atol=atol)


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_fused_ops_run_their_triton_kernels(name):
    """The Triton kernels (interpreted on the CPU) in the decode step give the unfused step's logits, and
    replace the modules' own norms and MLP activation (which then never run)."""
    pytest.importorskip("triton")
    model = MODELS[name]()
    ids, mask = padded_batch()
    new = torch.randint(3, 300, (2, 3), generator=torch.Generator().manual_seed(2))
    calls = []
    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm") or type(module).__name__ == "SiLUActivation":
            module.register_forward_hook(lambda *_: calls.append(1))
    logits = []
    for fused in (True, False):
        decoder = StaticDecoder(model, ids, max_len=ids.shape[1] + 3, attention_mask=mask, fused_ops=fused,
                                backend="triton")  # fmt: skip
        logits.append([decoder.forward(ids)] + [decoder.advance(new[:, i]).clone() for i in range(3)])
        if fused:
            assert calls == []
    assert calls  # the unfused step ran the modules
    for got, want in zip(*logits):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_sliding_window_is_applied():
    """A window shorter than the sequence changes the logits, and the static decoder follows it."""
    ids, _ = padded_batch(width=9)
    logits = {}
    for window in (4, 64):
        model = tiny_mistral(window).double()
        assert layer_windows(model.config) == [window, window]
        with torch.no_grad():
            want = model(input_ids=ids).logits[:, -1].float()
        logits[window] = StaticDecoder(model, ids, max_len=16).forward(ids)
        torch.testing.assert_close(logits[window], want, rtol=0, atol=1e-9)
    assert (logits[4] - logits[64]).abs().max() > 1e-3


@pytest.mark.parametrize("kw", [dict(), dict(do_sample=True, top_k=20, seed=3), dict(repetition_penalty=1.5)])
def test_generation_matches_the_dynamic_cache_on_a_4bit_lora_model(kw):
    """NF4 base + LoRA (the modules the static step calls must be the model's own): same tokens either way."""
    model = tiny_llama(tie=False)
    lowbit.quantize(model, lowbit.QuantConfig(format="nf4", block_size=32))
    model = lowbit.peft.apply_lora(model, lowbit.peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    for p in model.parameters():  # a non-zero B, so that the adapter changes the output
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    ids, mask = padded_batch()
    config = GenerateConfig(max_new_tokens=20, eos_token_id=(), **kw)
    static = generate_ids(model, ids, config, attention_mask=mask, static_cache=True)
    assert static == generate_ids(model, ids, config, attention_mask=mask, static_cache=False)
    assert all(len(row) == 20 for row in static)


def test_real_smollm2_greedy_tokens_agree(smollm2):
    model, tokenizer = smollm2
    ids = tokenizer(["The capital of France is"], return_tensors="pt").input_ids
    config = GenerateConfig(max_new_tokens=16)
    assert generate_ids(model, ids, config, static_cache=True) == generate_ids(model, ids, config, static_cache=False)


def test_unsupported_models_are_named_and_the_default_falls_back():
    model = lowbit.peft.apply_prompt_tuning(tiny_llama(), lowbit.peft.PromptTuningConfig(num_virtual_tokens=3))
    assert not supports(model)
    ids, _ = padded_batch()
    with pytest.raises(ValueError, match="forward hooks"):
        generate_ids(model, ids, max_new_tokens=4, static_cache=True)
    assert len(generate_ids(model, ids, max_new_tokens=4)[0]) == 4  # None: the dynamic cache
    bert_like = copy.deepcopy(tiny_llama())
    bert_like.config.model_type = "gemma"  # same module names, different glue (a scaled embedding)
    with pytest.raises(ValueError, match="model type 'gemma'"):
        StaticDecoder(bert_like, ids, max_len=16)


def test_bad_calls_get_clear_errors():
    model = tiny_llama()
    ids, _ = padded_batch()
    with pytest.raises(ValueError, match="leaves no room"):
        StaticDecoder(model, ids, max_len=ids.shape[1])
    decoder = StaticDecoder(model, ids, max_len=ids.shape[1] + 1)
    with pytest.raises(ValueError, match="takes the prompt"):
        decoder.forward(ids[:, 1:])
    decoder.forward(ids)
    decoder.advance(ids[:, 0])
    with pytest.raises(ValueError, match="cache is full"):
        decoder.advance(ids[:, 0])
    with pytest.raises(ValueError, match="static_cache"):
        GenerateConfig(static_cache="yes")


def test_models_that_synchronise_with_the_host_are_not_captured():
    """LLM.int8's outlier split decides on the host: the decoder keeps eager steps for it (and stays exact)."""
    from lowbit.generate.static import graph_capturable

    model = tiny_llama(tie=False)
    assert graph_capturable(model)
    lowbit.quantize(model, lowbit.QuantConfig(format="int8", method="llm_int8"))
    assert not graph_capturable(model)
    ids, mask = padded_batch()
    assert StaticDecoder(model, ids, max_len=12, attention_mask=mask, cuda_graph=None).cuda_graph is False
    config = GenerateConfig(max_new_tokens=6, eos_token_id=())
    assert generate_ids(model, ids, config, attention_mask=mask, static_cache=True) == generate_ids(
        model, ids, config, attention_mask=mask, static_cache=False)  # fmt: skip


def test_make_decoder_fuses_the_step_by_default_only_on_cuda():
    from lowbit.generate.decode import make_decoder

    model, (ids, mask) = tiny_llama(tie=False), padded_batch()
    for fused_ops, expected in ((None, False), (True, True), (False, False)):  # None: on CUDA only; this is the CPU
        config = GenerateConfig(max_new_tokens=3, static_cache=True, fused_ops=fused_ops)
        assert make_decoder(model, ids, mask, config).fused_ops is expected
    with pytest.raises(ValueError, match="fused_ops"):
        GenerateConfig(fused_ops="yes")
