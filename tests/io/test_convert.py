"""`lowbit.io.convert`: every route on a tiny random Llama; lossless routes exact, lossy ones measured.

The lossy routes' reported KL is checked against a float64 computation written here from the definition
(KL(p‖q) = Σ_v p (log p − log q), averaged over scored tokens of the same non-overlapping windows).
"""

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lowbit
from lowbit.evaluate import reference_text
from lowbit.io import convert, load_any
from lowbit.io.bnb import _read_state
from lowbit.nn import ActOrderQuantLinear, QuantLinear
from tests.generate.conftest import train_bpe_tokenizer

WINDOWS, CONTEXT = 2, 128  # verification size for these tests: 254 scored tokens
FAST = dict(eval_windows=WINDOWS, eval_context=CONTEXT)
KL_ATOL = 1e-7  # the converter's KL sums float32 log-probabilities: ~1e-8 nats/token of rounding


@pytest.fixture(scope="module")
def fp_dir(tmp_path_factory):
    """A tiny random Llama (in_features 64 / 160: whole GPTQ words) with a real BPE tokenizer, saved as transformers."""
    tok = train_bpe_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=256,
                      tie_word_embeddings=True)  # fmt: skip
    path = tmp_path_factory.mktemp("convert") / "fp"
    LlamaForCausalLM(cfg).eval().save_pretrained(path)
    tok.save_pretrained(path)
    return path


@torch.no_grad()
def reference_kl(src, dst) -> tuple[float, float]:
    """(mean KL(src ‖ dst), max |Δlogit|) in float64 over the converter's windows of the reference text."""
    a, tok = load_any(src)
    b, _ = load_any(dst)
    text = reference_text()
    ids = tok(text[: len(text) // 2], return_tensors="pt").input_ids[0]
    kl, n, diff = 0.0, 0, 0.0
    for w in range(WINDOWS):
        window = ids[w * CONTEXT : (w + 1) * CONTEXT][None]
        la, lb = a(window).logits[0, :-1].double(), b(window).logits[0, :-1].double()
        p, q = la.log_softmax(-1), lb.log_softmax(-1)
        kl += float((p.exp() * (p - q)).sum())
        n += la.shape[0]
        diff = max(diff, float((la - lb).abs().max()))
    return kl / n, diff


def same_tensors(a, b) -> bool:
    sa, sb = _read_state(a), _read_state(b)
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_gptq_routes(fp_dir, tmp_path):
    r = convert(fp_dir, tmp_path / "gptq", "gptq", group_size=32, **FAST)
    assert r.route.startswith("quantized to int4 g32 (symmetric) by rtn") and r.lossless is False
    kl, diff = reference_kl(fp_dir, tmp_path / "gptq")
    assert r.kl_divergence == pytest.approx(kl, rel=1e-3, abs=KL_ATOL) and r.eval_tokens == WINDOWS * (CONTEXT - 1)
    assert r.max_abs_logit_diff == pytest.approx(diff, rel=1e-4)
    assert r.verdict().startswith(f"lossy: KL {r.kl_divergence:.2g} nats/token, perplexity ")

    r = convert(tmp_path / "gptq", tmp_path / "lowbit", "lowbit", **FAST)  # gptq → lowbit: exact
    assert r.lossless and r.verdict().startswith("lossless: max |Δlogit| 0 over 254 tokens")
    r = convert(tmp_path / "lowbit", tmp_path / "gptq2", "gptq", **FAST)  # and back: the same tensors
    assert r.lossless and same_tensors(tmp_path / "gptq", tmp_path / "gptq2")


def test_lowbit_fp32_scales_to_gptq_is_near_lossless(fp_dir, tmp_path):
    convert(fp_dir, tmp_path / "int4", "lowbit", format="int4", group_size=32, sym=False, verify=False)
    r = convert(tmp_path / "int4", tmp_path / "gptq", "gptq", checkpoint_format="gptq_v2", **FAST)
    assert "scales rounded to fp16" in r.route
    assert 0 < r.max_abs_logit_diff < 1e-3 and r.kl_divergence < 1e-6
    source, _ = load_any(tmp_path / "int4")
    result, _ = load_any(tmp_path / "gptq")
    a, b = source.model.layers[0].mlp.up_proj, result.model.layers[0].mlp.up_proj
    assert torch.equal(a.weight, b.weight) and torch.equal(a.weight_zero_point, b.weight_zero_point)
    assert json.loads((tmp_path / "gptq" / "quantize_config.json").read_text())["sym"] is False


def test_bnb_routes_are_byte_exact(fp_dir, tmp_path):
    r = convert(fp_dir, tmp_path / "bnb", "bnb-nf4", **FAST)
    assert r.route.startswith("quantized to nf4") and not r.lossless
    assert r.kl_divergence == pytest.approx(reference_kl(fp_dir, tmp_path / "bnb")[0], rel=1e-3, abs=KL_ATOL)
    assert convert(tmp_path / "bnb", tmp_path / "lowbit", "lowbit", **FAST).lossless
    assert convert(tmp_path / "lowbit", tmp_path / "bnb2", "bnb-nf4", **FAST).lossless
    assert same_tensors(tmp_path / "bnb", tmp_path / "bnb2")


def test_gguf_routes(fp_dir, tmp_path):
    assert convert(fp_dir, tmp_path / "f32.gguf", "gguf", gguf_type="f32", **FAST).lossless
    r = convert(fp_dir, tmp_path / "q8.gguf", "gguf", **FAST)  # default q8_0
    assert r.route == "written as GGUF q8_0" and not r.lossless
    assert r.kl_divergence == pytest.approx(reference_kl(fp_dir, tmp_path / "q8.gguf")[0], rel=1e-3, abs=KL_ATOL)
    # Q8_0 is absmax/127 in blocks of 32: lowbit's symmetric int8 with groups of 32 holds it exactly
    r = convert(tmp_path / "q8.gguf", tmp_path / "from-q8", "lowbit", format="int8", group_size=32, **FAST)
    assert r.route.startswith("GGUF dequantized by transformers, then quantized to int8 g32") and r.lossless
    r = convert(tmp_path / "q8.gguf", tmp_path / "from-q8-nf4", "lowbit", **FAST)  # default nf4: lossy
    assert not r.lossless and r.kl_divergence > 0


def test_gptq_method_with_act_order(fp_dir, tmp_path):
    r = convert(fp_dir, tmp_path / "gptq", "gptq", method="gptq", desc_act=True, group_size=32,
                calibration_samples=2, **FAST)  # fmt: skip
    assert r.route.endswith("by gptq")
    quant = json.loads((tmp_path / "gptq" / "config.json").read_text())["quantization_config"]
    assert quant["desc_act"] is True
    g_idx = _read_state(tmp_path / "gptq")["model.layers.0.mlp.down_proj.g_idx"]
    assert not torch.equal(g_idx, torch.arange(160, dtype=torch.int32) // 32)
    model, _ = load_any(tmp_path / "gptq")
    assert isinstance(model.model.layers[0].mlp.down_proj, ActOrderQuantLinear)
    assert r.kl_divergence == pytest.approx(reference_kl(fp_dir, tmp_path / "gptq")[0], rel=1e-3, abs=KL_ATOL)


def test_refusals_and_requantize(fp_dir, tmp_path):
    convert(fp_dir, tmp_path / "nf4", "lowbit", verify=False)
    with pytest.raises(ValueError, match="holds nf4 layers and gptq stores only int2/int3/int4/int8.*requantize"):
        convert(tmp_path / "nf4", tmp_path / "x", "gptq")
    r = convert(tmp_path / "nf4", tmp_path / "gptq", "gptq", requantize=True, group_size=32, **FAST)
    assert r.route.startswith("dequantized, then quantized to int4") and not r.lossless
    assert isinstance(load_any(tmp_path / "gptq")[0].model.layers[0].self_attn.q_proj, QuantLinear)
    with pytest.raises(ValueError, match="unknown target"):
        convert(fp_dir, tmp_path / "y", "awq")
    with pytest.raises(ValueError, match="cannot read"):
        convert(tmp_path / "missing", tmp_path / "y", "gptq")
    with pytest.raises(ValueError, match=".gguf"):
        convert(fp_dir, tmp_path / "y", "gguf")
    with pytest.raises(ValueError, match="desc_act"):
        convert(fp_dir, tmp_path / "y", "gptq", desc_act=True)
    with pytest.raises(ValueError, match="destination is the source"):
        convert(fp_dir, fp_dir, "lowbit")


def test_no_verify_reports_not_verified(fp_dir, tmp_path):
    r = convert(fp_dir, tmp_path / "q", "gptq", verify=False)
    assert r.kl_divergence is None and r.verdict() == "not verified"
    assert lowbit.io.checkpoint_kind(tmp_path / "q") == "gptq"


@pytest.mark.slow
def test_smollm2_to_gptq_rtn_and_back(tmp_path):
    # One 128-token window keeps this under a minute on a busy CPU (a SmolLM2 forward of 256 tokens takes ~3 s).
    # Measured on 2 × 256 tokens: int4 g128 symmetric RTN has KL 0.76 nats/token, perplexity 19.86 → 38.28.
    small = dict(eval_windows=1, eval_context=128)
    r = convert("smollm2-135m", tmp_path / "gptq", "gptq", group_size=128, **small)
    print(r.summary())
    assert r.source_kind == "packaged" and not r.lossless
    assert 0.05 < r.kl_divergence < 2 and r.perplexity_source < r.perplexity_result < 3 * r.perplexity_source
    r = convert(tmp_path / "gptq", tmp_path / "lowbit", "lowbit", **small)
    assert r.lossless


def test_cli_prints_route_and_verdict_or_one_line_error(fp_dir, tmp_path, capsys):
    from lowbit.cli import main

    assert main(["convert", str(fp_dir), str(tmp_path / "g"), "--to", "gptq", "--group-size", "32",
                 "--eval-windows", "1", "--eval-context", "64"]) == 0  # fmt: skip
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith("(gptq): quantized to int4 g32 (symmetric) by rtn") and out[1].startswith("lossy: KL ")
    assert main(["convert", str(tmp_path / "g"), str(tmp_path / "x"), "--to", "bnb-nf4"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds int4 layers and bnb-nf4 stores only nf4/fp4" in err
