"""Processes of test_distributed.py: the same tiny LoRA run on 1 or 2 gloo processes (torch.multiprocessing)."""

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

import lowbit
from lowbit.train import DataConfig, TrainConfig, build_examples, read_records, train
from tests.tiny_models import tiny_llama
from tests.train.tiny_tokenizer import tiny_tokenizer

DATA = Path(__file__).resolve().parents[2] / "data"


RUNS = (("ddp", False), ("fsdp", True))  # (strategy, NF4 base)


def one_run(rank: int, world: int, strategy: str, quantized: bool) -> list[float]:
    tok = tiny_tokenizer()
    examples, _ = build_examples(read_records(DATA / "instruct" / "train.jsonl")[:48], tok, DataConfig(max_length=160))
    model = tiny_llama()
    if quantized:
        lowbit.quantize(model, lowbit.QuantConfig(format="nf4", block_size=64))
    torch.manual_seed(0)  # identical LoRA initialisation in every process
    model = lowbit.peft.apply_lora(model, lowbit.peft.LoraConfig(r=4, alpha=8))
    cfg = TrainConfig(max_steps=5, batch_size=8 // world, lr=1e-2, strategy=strategy, progress=False, plot=False)
    return train(model, examples, cfg, pad_token_id=tok.pad_token_id).losses


def run(rank: int, world: int, out: str) -> None:
    """Every run of RUNS in this process group; rank 0 writes {strategy: losses}."""
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=world)
    losses = {f"{s}-{q}": one_run(rank, world, s if world > 1 else "none", q) for s, q in RUNS}
    if rank == 0:
        Path(out, f"losses-{world}.json").write_text(json.dumps(losses))
    if world > 1:
        dist.destroy_process_group()


def spawn(world: int, out: str) -> dict[str, list[float]]:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if world == 1:
        run(0, 1, out)
    else:
        torch.multiprocessing.spawn(run, args=(world, out), nprocs=world, join=True)
    return json.loads(Path(out, f"losses-{world}.json").read_text())
