"""What a training run writes down: a JSONL log, TensorBoard scalars (if installed), a loss-curve plot.

`metrics.jsonl` gets one JSON object per line: {"step", "loss", "lr", "tokens_per_s", "memory_mb", …}
for training steps and {"step", "eval_loss", …} for evaluations. On resume the log is cut back to the
checkpoint's step first, so a killed-and-resumed run leaves the same log as an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import resource
import sys
from pathlib import Path

import torch

METRICS_NAME = "metrics.jsonl"
PLOT_NAME = "loss_curve.png"


def memory_mb(device: torch.device) -> float:
    """Peak memory of the run so far in MiB: CUDA allocator peak on a GPU, else peak process RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


class MetricsLog:
    """Append-only JSONL log (plus TensorBoard when `torch.utils.tensorboard` can be imported)."""

    def __init__(self, output_dir, resume_step: int | None = None, tensorboard: bool = True) -> None:
        self.path = Path(output_dir) / METRICS_NAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        else:
            self._truncate_after(resume_step)
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(Path(output_dir) / "tensorboard"))
            except Exception:  # tensorboard not installed: the JSONL log is the record
                self.writer = None

    def _truncate_after(self, step: int) -> None:
        keep = [line for line in read_metrics(self.path) if line.get("step", 0) <= step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in keep))

    def write(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())  # a killed run's log holds every step it finished
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(path) -> list[dict]:
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_NAME
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_loss_curve(records: list[dict], path, title: str = "training loss") -> Path | None:
    """Training loss (and eval loss, if logged) against the step; None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    train = [(r["step"], r["loss"]) for r in records if "loss" in r and r["loss"] is not None]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
