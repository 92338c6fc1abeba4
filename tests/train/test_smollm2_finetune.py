"""One short run on the real SmolLM2-135M-Instruct: train a LoRA adapter on the shipped instruction data,
save it, and load it with HF peft (the peer), which must compute the same logits."""

import copy
from pathlib import Path

import pytest
import torch

import lowbit
from lowbit.train import DataConfig, TrainConfig, build_examples, read_records, train

DATA = Path(__file__).resolve().parents[2] / "data"


@pytest.mark.slow
def test_trained_adapter_loads_in_hf_peft(smollm2, tmp_path):
    peft = pytest.importorskip("peft")
    base, tok = smollm2
    model = lowbit.peft.apply_lora(copy.deepcopy(base), lowbit.peft.LoraConfig(r=8, alpha=16, target_modules=("q_proj", "v_proj")))
    examples, report = build_examples(read_records(DATA / "instruct" / "train.jsonl")[:8], tok, DataConfig(max_length=96))
    assert report.examples >= 4
    result = train(model, examples[:4], TrainConfig(max_steps=2, batch_size=2, lr=1e-3, progress=False, plot=False),
                   pad_token_id=tok.pad_token_id, output_dir=tmp_path / "run")  # fmt: skip
    assert all(torch.isfinite(torch.tensor(result.losses)))
    path = lowbit.peft.save_adapter(model, tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(path)).eval()
    ids = torch.tensor([examples[0]["input_ids"]])
    with torch.no_grad():
        ours_logits, theirs_logits = model(input_ids=ids).logits, theirs(input_ids=ids).logits
        base_logits = base(input_ids=ids).logits
    torch.testing.assert_close(theirs_logits, ours_logits, rtol=1e-4, atol=1e-4)
    assert (ours_logits - base_logits).abs().max() > 1e-3  # the adapter did change the model
