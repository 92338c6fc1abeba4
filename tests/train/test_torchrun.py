"""`torchrun --nproc-per-node 2 -m lowbit.train` end to end on CPU (gloo): QLoRA under FSDP2 on a tiny Llama
gives the losses and the adapter of the one-process run with the same global batch."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from lowbit.cli import main
from lowbit.peft.io import read_adapter_weights
from lowbit.train import read_metrics
from tests.tiny_models import tiny_llama
from tests.train.tiny_tokenizer import tiny_tokenizer

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(out) if "loss" in r]


def test_torchrun_fsdp_qlora_matches_one_process(tmp_path):
    model_dir, data = tmp_path / "tiny", tmp_path / "train.jsonl"
    tiny_llama().save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    data.write_text("".join((ROOT / "data" / "instruct" / "train.jsonl").read_text().splitlines(True)[:48]))
    args = [str(model_dir), "--data", str(data), "--method", "qlora", "--lora-r", "4", "--dropout", "0",
            "--steps", "3", "--lr", "1e-2", "--optimizer", "adamw", "--warmup-steps", "0", "--max-length", "160",
            "--save-every", "2", "--prompt", "Define lawn."]  # fmt: skip
    # `--lora-r`, not `--r`: torchrun's own argparse takes `--r` as an ambiguous abbreviation (--rdzv-*, --role, …)
    # even after the script name.
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "lowbit.train", *args, "--batch-size", "2", "--strategy", "fsdp",
                          "--out", str(tmp_path / "two")], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert two.returncode == 0, two.stderr[-4000:]
    main(["finetune", *args, "--batch-size", "4", "--strategy", "none", "--out", str(tmp_path / "one")])
    assert len(losses(tmp_path / "two")) == 3
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-5)
    assert [p.name for p in sorted((tmp_path / "two").glob("checkpoint-*"))] == ["checkpoint-00000002",
                                                                                "checkpoint-00000003"]  # fmt: skip
    a, b = read_adapter_weights(tmp_path / "one" / "adapter"), read_adapter_weights(tmp_path / "two" / "adapter")
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] - b[k]).abs().max() < 1e-5, k
    assert {v.shape[0] for k, v in b.items() if "lora_A" in k} == {4}
