"""Subprocess of test_checkpoint.py: a short LoRA run on the shipped data that can be killed and resumed.

    python -m tests.train._resume_worker OUTPUT_DIR STEPS
"""

import sys
from pathlib import Path

import torch

import lowbit
from lowbit.train import DataConfig, TrainConfig, build_examples, read_records, train
from tests.tiny_models import tiny_llama
from tests.train.tiny_tokenizer import tiny_tokenizer

DATA = Path(__file__).resolve().parents[2] / "data"


def main(out: str, steps: int) -> None:
    torch.set_num_threads(1)  # same kernels, same float sums in every process
    tok = tiny_tokenizer()
    examples, _ = build_examples(read_records(DATA / "instruct" / "train.jsonl")[:40], tok, DataConfig(max_length=160))
    model = lowbit.peft.apply_lora(tiny_llama(), lowbit.peft.LoraConfig(r=4, alpha=8, dropout=0.1))  # dropout: RNG
    cfg = TrainConfig(max_steps=steps, batch_size=4, lr=5e-3, warmup_steps=2, optimizer="adamw8bit",
                      optimizer_block_size=256, save_every=2, keep_checkpoints=2, progress=False, plot=False)  # fmt: skip
    train(model, examples, cfg, pad_token_id=tok.pad_token_id, output_dir=out, resume="auto")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
