"""`python -m lowbit.train MODEL --data ...` = `lowbit finetune`, and the entry point for torchrun:

    torchrun --nproc-per-node 2 -m lowbit.train smollm2-135m --data data/instruct/train.jsonl --strategy ddp

Each process joins the process group torchrun describes (gloo on CPU, NCCL on GPUs) before training.
"""

import sys

from lowbit.cli import main
from lowbit.train.distributed import init_from_env

if __name__ == "__main__":
    init_from_env()
    sys.exit(main(["finetune", *sys.argv[1:]]))
