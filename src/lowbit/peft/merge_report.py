"""What a quantization-aware LoRA merge cost: per-layer weight error and the model's next-token drift.

`lowbit.peft.merge_adapter` fills a `MergeReport` with two kinds of numbers:

- per layer, the relative reconstruction error of the merged weight against what the merge aimed at,

      ‖W_merged − (W_base + ΔW)‖_F / ‖W_base + ΔW‖_F,     ΔW = Σ (alpha/r)·B·A   (LoRA eq. 3),

  where W_base is the weight the user chose to merge into (the original full-precision weight, or the
  dequantized 4-bit/int weight); next to it ‖ΔW‖/‖W_base‖, the size of the update the error is weighed
  against (requantization error above that size means the adapter is partly lost);
- for the whole model, on fixed text cut into non-overlapping windows, the mean KL divergence of the
  merged model's next-token distribution from the adapter-on (unmerged) model's,

      KL = (1/N) Σ_t Σ_v p(v | x_<t) · (log p(v | x_<t) − log q(v | x_<t)),   p adapter-on, q merged,

  and the token-level perplexity of both (the scheme of `lowbit.evaluate.perplexity` with stride ==
  context length, so the numbers equal what that function reports on the same text and windows).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.evaluate.perplexity import sliding_windows

REPORT_JSON = "merge_report.json"
REPORT_MARKDOWN = "merge_report.md"


@dataclass
class MergeLayer:
    name: str
    shape: tuple[int, int]  # (out_features, in_features)
    base: str  # what the layer held before the merge: "nf4", "int4", "dense float32", …
    result: str  # what it holds after: "dense float32", "nf4", …
    delta_norm: float  # ‖ΔW‖_F / ‖W_base‖_F
    relative_error: float  # ‖W_merged − (W_base + ΔW)‖_F / ‖W_base + ΔW‖_F


@dataclass
class MergeReport:
    target: str  # "fp" | "dequantized" | "requantized"
    method: str  # how requantized weights were chosen ("rtn" | "gptq"); "none" for dense targets
    layers: list[MergeLayer] = field(default_factory=list)
    kl_divergence: float | None = None  # mean nats per scored token; None when no evaluation ran
    perplexity_adapter: float | None = None  # the adapter-on model before the merge
    perplexity_merged: float | None = None
    eval_tokens: int = 0  # scored tokens behind the three numbers above
    seconds: float = 0.0
    config: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def summary(self) -> str:
        how = f"{self.target}" + (f" ({self.method})" if self.method != "none" else "")
        worst = max(self.layers, key=lambda r: r.relative_error, default=None)
        text = f"merge into {how}: {len(self.layers)} LoRA layers"
        if worst is not None:
            text += f", worst relative error {worst.relative_error:.3g} ({worst.name})"
        if self.kl_divergence is not None:
            text += (f"; KL(adapter-on ‖ merged) {self.kl_divergence:.4g} nats/token over {self.eval_tokens} tokens, "
                     f"perplexity {self.perplexity_adapter:.4f} → {self.perplexity_merged:.4f}")  # fmt: skip
        return text + f"; {self.seconds:.1f} s"

    def to_markdown(self) -> str:
        lines = [f"# LoRA merge report: {self.target}" + (f" ({self.method})" if self.method != "none" else ""), "",
                 self.summary(), ""]  # fmt: skip
        if self.kl_divergence is not None:
            lines += ["| model | perplexity |", "|---|---:|",
                      f"| adapter on (unmerged) | {self.perplexity_adapter:.4f} |",
                      f"| merged | {self.perplexity_merged:.4f} |", "",
                      f"KL(adapter-on ‖ merged): {self.kl_divergence:.6g} nats per token ({self.eval_tokens} tokens)",
                      ""]  # fmt: skip
        lines += ["| layer | shape | base | result | ‖ΔW‖/‖W‖ | rel. error |", "|---|---|---|---|---:|---:|"]
        for r in self.layers:
            lines.append(f"| {r.name} | {r.shape[0]}×{r.shape[1]} | {r.base} | {r.result} | {r.delta_norm:.4g} | "
                         f"{r.relative_error:.4g} |")  # fmt: skip
        return "\n".join(lines) + "\n"

    def save(self, directory: str | os.PathLike) -> tuple[Path, Path]:
        """Write merge_report.json and merge_report.md into `directory` (created); returns both paths."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        json_path, md_path = directory / REPORT_JSON, directory / REPORT_MARKDOWN
        json_path.write_text(self.to_json() + "\n")
        md_path.write_text(self.to_markdown())
        return json_path, md_path


def relative_error(merged: torch.Tensor, base: torch.Tensor, delta: torch.Tensor) -> tuple[float, float]:
    """(‖ΔW‖/‖W_base‖, ‖W_merged − (W_base + ΔW)‖/‖W_base + ΔW‖), computed in float64."""
    base, delta = base.double(), delta.double().to(base.device)
    target = base + delta
    err = (merged.double().to(base.device) - target).norm() / target.norm().clamp(min=1e-300)
    return float(delta.norm() / base.norm().clamp(min=1e-300)), float(err)


# --- next-token comparison on fixed text ----------------------------------------------------------------


def eval_token_ids(text, tokenizer) -> torch.Tensor:
    """Evaluation text → (N,) token ids, tokenized once as `lowbit.evaluate.perplexity` does; ids pass through."""
    if isinstance(text, torch.Tensor):
        if text.dtype not in (torch.int64, torch.int32) or text.dim() != 1:
            raise ValueError(f"evaluation token ids must be an integer (N,) tensor, "
                             f"got {text.dtype} {tuple(text.shape)}")  # fmt: skip
        return text.long()
    if tokenizer is None:
        raise ValueError("evaluating the merge on text needs a tokenizer (or pass eval_text as token ids, or "
                         "eval_windows=0 to skip the model-level comparison)")  # fmt: skip
    return tokenizer(text, return_tensors="pt", verbose=False).input_ids[0]


@dataclass
class NextTokenReference:
    """The adapter-on model's next-token log-probabilities on each window, kept to compare the merge against."""

    windows: list[torch.Tensor]  # token ids (T,) of each window
    log_probs: list[torch.Tensor]  # (T − 1, V) float32: position t predicts token t + 1


def _window_log_probs(model: nn.Module, window: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    logits = model(input_ids=window[None].to(device), use_cache=False).logits[0, :-1]  # (T − 1, V)
    return logits.float().log_softmax(-1).cpu()


@torch.no_grad()
def next_token_reference(model: nn.Module, ids: torch.Tensor, context_length: int, max_windows: int
                         ) -> NextTokenReference:  # fmt: skip
    if ids.numel() < 2:
        raise ValueError(f"the evaluation text has {ids.numel()} token(s); the comparison needs at least 2")
    if context_length < 2:
        raise ValueError("eval_context must be at least 2: a window needs a context token and a target")
    windows = [ids[w.begin : w.end] for w in sliding_windows(ids.numel(), context_length, context_length, max_windows)]
    windows = [w for w in windows if w.numel() >= 2]
    return NextTokenReference(windows, [_window_log_probs(model, w) for w in windows])


@torch.no_grad()
def compare_next_token(model: nn.Module, reference: NextTokenReference) -> tuple[float, float, float, int]:
    """(mean KL(reference ‖ model), perplexity of the reference, perplexity of `model`, scored tokens)."""
    kl = nll_ref = nll_model = 0.0
    n = 0
    for window, log_p in zip(reference.windows, reference.log_probs):
        log_q = _window_log_probs(model, window)  # (T − 1, V)
        targets = window[1:].long()  # (T − 1,)
        kl += float(F.kl_div(log_q, log_p, log_target=True, reduction="sum"))  # Σ p·(log p − log q)
        nll_ref -= float(log_p.gather(1, targets[:, None]).sum())
        nll_model -= float(log_q.gather(1, targets[:, None]).sum())
        n += targets.numel()
    return kl / n, math.exp(nll_ref / n), math.exp(nll_model / n), n
