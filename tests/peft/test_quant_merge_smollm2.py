"""Requantizing a merged QLoRA on the real SmolLM2-135M: GPTQ's error feedback against plain rounding.

CPU-sized: the first 2 of the 30 blocks are NF4 (QLoRA's NF4 + double quant, blocks of 64) and carry a
rank-8 LoRA on every linear layer; B is random, scaled per layer so that ‖ΔW‖ = 5% of ‖dequant(Q)‖ (a
realistic size for a fine-tune, and below NF4's rounding step: plain requantization keeps little of it).
GPTQ calibrates on 16 windows of 256 tokens from the second half of the reference text with damp 0.1
(with 4 × 256 tokens and damp 0.01 it overfits the 1536-wide down_proj: held-out output error above
RTN's); KL and perplexity are over 2 non-overlapping 256-token windows of the first half. (That the dense
"dequantized" merge is the adapter-on model is checked on tiny models in test_quant_merge.py.)
"""

import copy

import pytest
import torch

import lowbit
from lowbit.evaluate import reference_text
from lowbit.peft import LoraConfig, apply_lora, lora_layers, merge_adapter

pytestmark = pytest.mark.slow

SUBSET = ("model.layers.[0-1].*",)
DELTA_SIZE = 0.05
EVAL = {"eval_context": 256, "eval_windows": 2, "verbose": False}
GPTQ = {"n_samples": 16, "seq_len": 256, "damp": 0.1}


@pytest.fixture(scope="module")
def merges(smollm2):
    """{"rtn" | "gptq": MergeReport} of the same NF4 QLoRA model requantized both ways."""
    model, tokenizer = smollm2
    text = reference_text()
    eval_ids = tokenizer(text[:20_000], return_tensors="pt", verbose=False).input_ids[0]
    calibration = text[len(text) // 2 :]
    qlora = copy.deepcopy(model)  # the session's model stays untouched
    lowbit.quantize(qlora, lowbit.QuantConfig(format="nf4", include=SUBSET))
    torch.manual_seed(0)  # A's Kaiming init draws from the global generator
    apply_lora(qlora, LoraConfig(r=8, alpha=16, target_modules=SUBSET))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in lora_layers(qlora):
            b = layer.lora_B["default"]
            b.copy_(torch.randn(b.shape, generator=g))
            w = layer.base_layer.dequantize(torch.float32)
            b.mul_(DELTA_SIZE * w.norm() / layer.delta_weight("default").norm())
    settings = {"rtn": {"target": "requantized", "method": "rtn"},
                "gptq": {"target": "requantized", "method": "gptq", "calibration": calibration,
                         "tokenizer": tokenizer, **GPTQ}}  # fmt: skip
    return {name: merge_adapter(copy.deepcopy(qlora), eval_text=eval_ids, **EVAL, **kw)
            for name, kw in settings.items()}  # fmt: skip


def test_gptq_requantized_merge_keeps_closer_to_the_adapter_than_rounding(merges):
    rtn, gptq = merges["rtn"], merges["gptq"]
    print(f"\nKL(adapter-on ‖ merged): rtn {rtn.kl_divergence:.5f}, gptq {gptq.kl_divergence:.5f}; perplexity "
          f"{rtn.perplexity_adapter:.4f} → rtn {rtn.perplexity_merged:.4f}, gptq {gptq.perplexity_merged:.4f}")
    assert len(rtn.layers) == len(gptq.layers) == 14
    assert all(r.result == "nf4" for r in rtn.layers + gptq.layers)
    assert all(r.delta_norm == pytest.approx(DELTA_SIZE, rel=1e-3) for r in rtn.layers)
    # measured (seed 0): KL rtn 0.00631, gptq 0.00275 nats/token (ratio 0.44); perplexity 20.2385 adapter-on,
    # 20.3120 rtn, 20.2559 gptq. Another draw of A measured 0.00663 vs 0.00378 (0.57): the ratio depends on
    # the adapter, so the bound holds this seed's margin, not a general one.
    assert gptq.kl_divergence < 0.5 * rtn.kl_divergence
    # GPTQ trades weight error for output error: its weights are further from W + ΔW than rounding's.
    assert sum(r.relative_error for r in gptq.layers) > sum(r.relative_error for r in rtn.layers)

