"""Atomic checkpoints; a run killed with SIGKILL resumes and reproduces the uninterrupted losses exactly."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import lowbit
from lowbit.optim import AdamW8bit
from lowbit.train import checkpoint as ckpt
from lowbit.train import read_metrics
from tests.tiny_models import tiny_llama

ROOT = Path(__file__).resolve().parents[2]
STEPS = 14


def worker(out: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-m", "tests.train._resume_worker", str(out), str(STEPS)], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(out) if "loss" in r]


def test_killed_run_resumes_with_exactly_the_same_losses(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    reference = worker(straight)  # uninterrupted; runs while the other one is killed and resumed
    victim = worker(killed)
    deadline = time.monotonic() + 120
    while len(losses(killed)) < 7:  # a step marker: the metrics line of step 7 is on disk
        assert victim.poll() is None, victim.stderr.read().decode()
        assert time.monotonic() < deadline, "the worker made no progress"
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    done = len(losses(killed))
    last = ckpt.latest_checkpoint(killed)
    assert done < STEPS and last is not None and int(last.name.split("-")[1]) < STEPS
    resumed = worker(killed)
    assert resumed.wait(timeout=180) == 0, resumed.stderr.read().decode()
    assert reference.wait(timeout=180) == 0, reference.stderr.read().decode()
    expected = losses(straight)
    assert len(expected) == STEPS
    assert losses(killed) == expected  # bit for bit, every step, including those redone after the kill


def test_checkpoint_is_atomic_and_weights_only(tmp_path):
    model = lowbit.peft.apply_lora(tiny_llama(), lowbit.peft.LoraConfig(r=2, alpha=4))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = AdamW8bit(params, lr=1e-2, min_8bit_size=0)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    sched = lowbit.train.make_scheduler(opt, 10, 2)
    # A save killed half-way leaves a hidden temporary directory: it is ignored, then cleaned up.
    (tmp_path / ".checkpoint-00000001.abc.tmp").mkdir(parents=True)
    (tmp_path / ".checkpoint-00000001.abc.tmp" / "state.pt").write_bytes(b"garbage")
    assert ckpt.latest_checkpoint(tmp_path) is None
    for step in (1, 2, 3, 3):  # the same step twice: replaced, never missing
        path = ckpt.save_checkpoint(tmp_path, step, model, opt, sched, {"step": step, "epoch": 0}, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-00000002", "checkpoint-00000003"]
    assert not list(tmp_path.glob(".checkpoint-*"))
    state = torch.load(path / "state.pt", weights_only=True)  # plain tensors and containers only
    assert state["step"] == 3 and state["optimizer"]["state"][0]["exp_avg_codes"].dtype == torch.uint8
    fresh = lowbit.peft.apply_lora(tiny_llama(seed=1), lowbit.peft.LoraConfig(r=2, alpha=4))
    fresh_params = [p for p in fresh.parameters() if p.requires_grad]
    opt2 = AdamW8bit(fresh_params, lr=1e-2, min_8bit_size=0)
    trainer_state = ckpt.load_checkpoint(path, fresh, opt2, lowbit.train.make_scheduler(opt2, 10, 2))
    assert trainer_state == {"step": 3, "epoch": 0}
    for a, b in zip(params, fresh_params):
        assert torch.equal(a, b)
    wrong = lowbit.peft.apply_lora(tiny_llama(), lowbit.peft.LoraConfig(r=3, alpha=4))
    with pytest.raises(ValueError, match="shape"):
        ckpt.load_checkpoint(path, wrong)
    with pytest.raises(FileNotFoundError):
        ckpt.load_checkpoint(tmp_path / "nothing", fresh)
