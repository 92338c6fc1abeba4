"""GGUF export, read back with the `gguf` package and with transformers' GGUF loader."""

import math

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import lowbit
from lowbit.io.gguf_export import export_gguf
from tests.generate.conftest import CHAT_TEMPLATE, train_bpe_tokenizer
from tests.tiny_models import tiny_llama, tiny_qwen2

gguf = pytest.importorskip("gguf")

X = torch.randint(0, 300, (2, 11), generator=torch.Generator().manual_seed(0))


def logits(model):
    with torch.no_grad():
        return model(X).logits


def ref_q8_0(w: torch.Tensor) -> torch.Tensor:
    """ggml Q8_0 by its definition: per 32 values d = absmax/127 (stored fp16), q = round-half-away(w/d)."""
    blocks = w.double().reshape(-1, 32)
    d = blocks.abs().amax(dim=1, keepdim=True) / 127
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    q = torch.sign(blocks * inv) * torch.floor((blocks * inv).abs() + 0.5)
    return (q * d.half().double()).reshape(w.shape)


def ref_q4_0(w: torch.Tensor) -> torch.Tensor:
    """ggml Q4_0: per 32 values m = the value of largest magnitude, d = m / -8 (fp16), q = min(15, ⌊w/d + 8.5⌋)."""
    blocks = w.double().reshape(-1, 32)
    m = blocks.gather(1, blocks.abs().argmax(dim=1, keepdim=True))
    d = m / -8
    inv = torch.where(d != 0, 1 / d, torch.zeros_like(d))
    q = torch.clamp(torch.floor(blocks * inv + 8.5), max=15)
    return ((q - 8) * d.half().double()).reshape(w.shape)


REFERENCE = {"f32": lambda w: w, "f16": lambda w: w.half().float(), "q8_0": ref_q8_0, "q4_0": ref_q4_0}


def reference_model(model, kind):
    """The source model with every matrix rounded as the GGUF type says (1-D tensors stay exact)."""
    ref = tiny_llama(tie=False) if type(model).__name__.startswith("Llama") else tiny_qwen2()
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if p.dim() == 2:
                p.copy_(REFERENCE[kind](p.detach()).float())
    return ref


@pytest.mark.parametrize("kind", ["f32", "f16", "q8_0", "q4_0"])
def test_llama_export_loads_in_transformers_with_the_formats_error(tmp_path, kind):
    model = tiny_llama(tie=False)
    path = export_gguf(model, tmp_path / f"tiny-{kind}.gguf", dtype=kind)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name)
    torch.testing.assert_close(logits(loaded), logits(reference_model(model, kind)), atol=2e-5, rtol=1e-4)
    if kind != "f32":  # the rounding is real: the exported model is not the source
        assert (logits(loaded) - logits(model)).abs().max() > 1e-5


def test_file_layout_read_back_with_gguf(tmp_path):
    model = tiny_llama()  # tied: no output.weight
    path = export_gguf(model, tmp_path / "tiny.gguf", dtype="q8_0", name="tiny")
    reader = gguf.GGUFReader(path)
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    assert field("general.architecture") == "llama" and field("general.name") == "tiny"
    cfg = model.config
    assert (field("llama.block_count"), field("llama.embedding_length"), field("llama.feed_forward_length"),
            field("llama.attention.head_count"), field("llama.attention.head_count_kv")) == (
        cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads)
    assert math.isclose(field("llama.attention.layer_norm_rms_epsilon"), cfg.rms_norm_eps, rel_tol=1e-6)
    tensors = {t.name: t for t in reader.tensors}
    per_layer = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"]
    want = {"token_embd.weight", "output_norm.weight"} | {f"blk.{i}.{n}.weight" for i in range(2) for n in per_layer}
    assert set(tensors) == want
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert tensors["blk.0.ffn_up.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    # v_proj is not permuted: its dequantized GGUF tensor is the Q8_0 rounding of the source weight.
    v = tensors["blk.1.attn_v.weight"]
    got = gguf.quants.dequantize(v.data, v.tensor_type).reshape(model.model.layers[1].self_attn.v_proj.weight.shape)
    want_v = ref_q8_0(model.model.layers[1].self_attn.v_proj.weight.detach())
    np.testing.assert_allclose(got, want_v.numpy(), atol=1e-6)
    # q_proj rows are interleaved per head: row 2i of head h is source row i, row 2i+1 is row i + d/2.
    q = tensors["blk.0.attn_q.weight"]
    src = model.model.layers[0].self_attn.q_proj.weight.detach()
    got_q = torch.from_numpy(gguf.quants.dequantize(q.data, q.tensor_type).reshape(src.shape).copy())
    d = src.shape[0] // cfg.num_attention_heads
    for h in range(cfg.num_attention_heads):
        for i in range(d // 2):
            torch.testing.assert_close(got_q[h * d + 2 * i].double(), ref_q8_0(src)[h * d + i], atol=1e-6, rtol=0)
            torch.testing.assert_close(got_q[h * d + 2 * i + 1].double(), ref_q8_0(src)[h * d + d // 2 + i],
                                       atol=1e-6, rtol=0)  # fmt: skip


def test_qwen2_and_quantized_sources(tmp_path):
    model = tiny_qwen2()  # biases on q/k/v, no rope permutation
    path = export_gguf(model, tmp_path / "qwen.gguf", dtype="f32")
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name)),
                               logits(model), atol=1e-5, rtol=1e-5)  # fmt: skip
    lowbit.quantize(model, lowbit.QuantConfig(format="nf4"))  # exported through its dequantized weights
    path = export_gguf(model, tmp_path / "qwen-nf4.gguf", dtype="f32")
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name)),
                               logits(model), atol=1e-5, rtol=1e-5)  # fmt: skip


@pytest.fixture(scope="module")
def bpe_tokenizer():
    """A real byte-level BPE tokenizer trained on 8 kB of English: the gguf reader needs ~15 s for SmolLM2's 49k-token
    vocabulary, this one reads back in well under a second through the same code paths."""
    return train_bpe_tokenizer()


def test_tokenizer_round_trip(tmp_path, bpe_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok0 = bpe_tokenizer
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, vocab_size=len(tok0))).eval()  # fmt: skip
    path = export_gguf(model, tmp_path / "bpe.gguf", tokenizer=tok0, dtype="f16", tokenizer_pre="smollm")
    tok = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    texts = ["Hello, world!", "  spaces\tand\nnewlines  ", "naïve café 東京 🙂", "<|im_start|>user\nhi<|im_end|>"]
    for text in texts:
        assert tok(text).input_ids == tok0(text).input_ids, text
        assert tok.decode(tok(text).input_ids) == text
    assert (tok.eos_token, tok.bos_token) == (tok0.eos_token, tok0.bos_token)
    assert tok.chat_template == CHAT_TEMPLATE
    reader = gguf.GGUFReader(path)
    assert reader.fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert reader.fields["tokenizer.ggml.pre"].contents() == "smollm"
    assert reader.fields["tokenizer.ggml.token_type"].contents()[:3] == [gguf.TokenType.CONTROL] * 3


def test_bad_requests(tmp_path):
    with pytest.raises(ValueError, match="dtype"):
        export_gguf(tiny_llama(), tmp_path / "x.gguf", dtype="q3_k")
    from tests.tiny_models import tiny_bert

    with pytest.raises(ValueError, match="supports"):
        export_gguf(tiny_bert(), tmp_path / "x.gguf")
