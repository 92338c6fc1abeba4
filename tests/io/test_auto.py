"""`load_any` recognises every checkpoint kind lowbit reads, by its files only."""

import pytest

import lowbit
from lowbit.io import checkpoint_kind, load_any, save_bnb_4bit
from tests.generate.conftest import train_bpe_tokenizer
from tests.tiny_models import tiny_llama


def test_checkpoint_kinds_and_loading(tmp_path):
    tok = train_bpe_tokenizer()
    model = tiny_llama()
    model.save_pretrained(tmp_path / "plain")
    lowbit.quantize(model, lowbit.QuantConfig(format="nf4"))
    lowbit.save_quantized(model, tmp_path / "lowbit", tokenizer=tok)
    save_bnb_4bit(model, tmp_path / "bnb", tokenizer=tok)
    (tmp_path / "x.gguf").write_bytes(b"")
    assert checkpoint_kind("smollm2-135m") == "packaged"
    assert checkpoint_kind(tmp_path / "plain") == "transformers"
    assert checkpoint_kind(tmp_path / "lowbit") == "lowbit"
    assert checkpoint_kind(tmp_path / "bnb") == "bnb-4bit"
    assert checkpoint_kind(tmp_path / "x.gguf") == "gguf"
    assert checkpoint_kind(tmp_path / "missing") == "unknown"
    for kind in ("lowbit", "bnb"):
        loaded, tokenizer = load_any(tmp_path / kind)
        assert isinstance(loaded.model.layers[0].mlp.up_proj, lowbit.QuantLinear)
        assert tokenizer("hello").input_ids == tok("hello").input_ids
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        lowbit.save_quantized(model, tmp_path / "no-tok")
        load_any(tmp_path / "no-tok")
