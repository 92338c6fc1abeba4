"""Training: the fine-tuning loop, data, checkpoints, QAT, distillation and data parallelism.

    records = lowbit.train.read_records("data/instruct/train.jsonl")
    examples, report = lowbit.train.build_examples(records, tokenizer, lowbit.train.DataConfig(max_length=512))
    result = lowbit.train.train(model, examples, lowbit.train.TrainConfig(max_steps=300), output_dir="run")
"""

from lowbit.train.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from lowbit.train.data import DataConfig, DataReport, build_examples, collate, pack_examples, read_records
from lowbit.train.distill import DistillConfig, distillation_loss
from lowbit.train.graphed import GraphedStep
from lowbit.train.metrics import plot_loss_curve, read_metrics
from lowbit.train.schedule import lr_factor, make_scheduler
from lowbit.train.trainer import TrainConfig, TrainingDiverged, TrainResult, evaluate, train

__all__ = [
    "DataConfig",
    "DataReport",
    "DistillConfig",
    "GraphedStep",
    "TrainConfig",
    "TrainResult",
    "TrainingDiverged",
    "build_examples",
    "collate",
    "distillation_loss",
    "evaluate",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "lr_factor",
    "make_scheduler",
    "pack_examples",
    "plot_loss_curve",
    "read_metrics",
    "read_records",
    "save_checkpoint",
    "train",
]
