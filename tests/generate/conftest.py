"""Fixtures for decoding tests: the real SmolLM2 tokenizer on a tiny random Llama of the same vocabulary."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM


@pytest.fixture(scope="session")
def smol_tokenizer(request):
    """SmolLM2's tokenizer, read from lowbit's model cache (built by the `smollm2` fixture if missing)."""
    from transformers import AutoTokenizer

    from lowbit.io.loading import CACHE_SUBDIR, default_cache_dir

    path = default_cache_dir() / CACHE_SUBDIR
    if not (path / "tokenizer.json").is_file():
        return request.getfixturevalue("smollm2")[1]
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def tiny_llama_for(tokenizer, seed: int = 0) -> LlamaForCausalLM:
    """A 2-layer random Llama whose vocabulary (and special ids) fit ``tokenizer``.

    Untied: a tied random model mostly repeats the last prompt token, which would make stop-string tests vacuous.
    """
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=256,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def smol_tiny(smol_tokenizer):
    return tiny_llama_for(smol_tokenizer), smol_tokenizer


CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def train_bpe_tokenizer(vocab_size: int = 400):
    """A real byte-level BPE tokenizer (GPT-2 / SmolLM2 style) with a ChatML template, trained in a moment on
    8 kB of lowbit's reference text — for tests that need small vocabularies (GGUF files, saved model dirs)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from lowbit.evaluate import reference_text

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)  # fmt: skip
    backend.train_from_iterator([reference_text(8000)], trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  unk_token="<|endoftext|>", pad_token="<|im_end|>")  # fmt: skip
    tok.chat_template = CHAT_TEMPLATE
    return tok
