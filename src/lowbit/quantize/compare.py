"""Compare quantization methods on one model: bits, bytes, perplexity, time (`lowbit compare`).

Each setting quantizes a fresh copy of the model through `lowbit.quantize` and is scored on the same
fixed text windows: token-level perplexity over `windows` non-overlapping windows of `context_length`
tokens from the start of lowbit's offline reference text (the GPTQ/AWQ convention). Calibration data
for the methods that need it comes from the second half of the same text, so it never overlaps the
evaluation windows. Results go to a Markdown table, a CSV file and a plot of perplexity against bits.
"""

from __future__ import annotations

import copy
import csv
import io
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from lowbit.quantize.config import QuantConfig

# name → config (None: the unquantized model). int3/int4 are affine (zero point), as in the GPTQ paper.
SETTINGS: dict[str, QuantConfig | None] = {
    "fp32": None,
    "rtn-int8": QuantConfig(format="int8"),
    "llm.int8": QuantConfig(method="llm_int8", format="int8"),
    "smoothquant-w8a8": QuantConfig(method="smoothquant", format="int8"),
    "smoothquant-w8a8-static": QuantConfig(method="smoothquant", format="int8", options={"act_scheme": "per_tensor"}),
    "rtn-nf4": QuantConfig(format="nf4"),
    "rtn-int4-g128": QuantConfig(format="int4", group_size=128, symmetric=False),
    "gptq-int4-g128": QuantConfig(method="gptq", format="int4", group_size=128, symmetric=False),
    "gptq-int4-g128-actorder": QuantConfig(method="gptq", format="int4", group_size=128, symmetric=False,
                                           options={"act_order": True}),  # fmt: skip
    "rtn-int3-g128": QuantConfig(format="int3", group_size=128, symmetric=False),
    "gptq-int3-g128": QuantConfig(method="gptq", format="int3", group_size=128, symmetric=False),
    "spqr-w3g16": QuantConfig(method="spqr", format="int3", group_size=16),  # the paper's τ = 0.2
    "spqr-w3g16-t1": QuantConfig(method="spqr", format="int3", group_size=16, options={"outlier_threshold": 1.0}),
}
CALIBRATED = ("gptq", "smoothquant", "spqr")


@dataclass(frozen=True)
class CompareConfig:
    """What `compare` runs: which settings, how much calibration, how many evaluation windows."""

    model: str = "smollm2-135m"
    settings: tuple[str, ...] = tuple(SETTINGS)
    n_samples: int = 32  # calibration windows …
    seq_len: int = 256  # … of this many tokens
    windows: int = 8  # evaluation windows …
    context_length: int = 512  # … of this many tokens
    include: tuple[str, ...] = ("*",)  # which linear layers every setting quantizes (anchored patterns)
    device: str = "cpu"  # where the model is quantized and evaluated ("cuda" for a GPU)

    def __post_init__(self) -> None:
        object.__setattr__(self, "settings", tuple(self.settings))
        object.__setattr__(self, "include", tuple(self.include))
        unknown = [s for s in self.settings if s not in SETTINGS]
        if unknown or not self.settings:
            raise ValueError(f"unknown setting(s) {unknown or '(none given)'}; choose among {list(SETTINGS)}")
        for name in ("n_samples", "seq_len", "windows", "context_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (2 if name == "context_length" else 1):
                raise ValueError(f"{name} must be a positive int, got {value!r}")


@dataclass
class CompareRow:
    setting: str
    method: str
    format: str
    bits_per_parameter: float  # over the quantized linear weights (32 for fp32)
    model_bytes: int  # every tensor of the model, tied ones once
    perplexity: float
    delta_percent: float  # vs the fp32 row (or the first row)
    quantize_seconds: float
    extra: dict = field(default_factory=dict)


def model_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers, each storage counted once (tied embeddings)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def _config_for(name: str, include: tuple[str, ...]) -> QuantConfig | None:
    config = SETTINGS[name]
    if config is None or include == ("*",):
        return config
    return QuantConfig.from_dict({**config.to_dict(), "include": list(include)})


def run_setting(base: nn.Module, tokenizer, name: str, config: CompareConfig, calibration: str,
                text: str) -> CompareRow:  # fmt: skip
    """Quantize a copy of `base` as setting `name` says and measure it."""
    from lowbit.evaluate import perplexity
    from lowbit.quantize.api import quantize

    quant = _config_for(name, config.include)
    model = copy.deepcopy(base)
    seconds, bits, method, fmt, extra = 0.0, 32.0, "none", "fp32", {}
    if quant is not None:
        kwargs = {}
        if quant.method in CALIBRATED:
            kwargs = {"calibration": calibration, "tokenizer": tokenizer}
            options = {**quant.options, "n_samples": config.n_samples, "seq_len": config.seq_len}
            quant = QuantConfig.from_dict({**quant.to_dict(), "options": options})
        start = time.perf_counter()
        report = quantize(model, quant, progress=True, **kwargs)
        seconds = time.perf_counter() - start
        bits, method, fmt = report.bits_per_parameter, quant.method, report.layers[0].format if report.layers else "-"
        shares = [r.outlier_share for r in report.layers if r.outlier_share is not None]
        if shares:
            extra["mean_outlier_share"] = sum(shares) / len(shares)
    ppl = perplexity(model, tokenizer, text, context_length=config.context_length, stride=config.context_length,
                     max_windows=config.windows, show_progress=True)  # fmt: skip
    return CompareRow(name, method, fmt, bits, model_bytes(model), ppl, 0.0, seconds, extra)


def compare_methods(config: CompareConfig = CompareConfig(), model=None, tokenizer=None) -> list[CompareRow]:
    """Run every setting of `config` on the model (loaded by name unless `model, tokenizer` are given)."""
    from lowbit.evaluate import reference_text

    if model is None:
        from lowbit.io.loading import load_model

        model, tokenizer = load_model(config.model)
    model.eval().to(config.device)
    text = reference_text()
    calibration = text[len(text) // 2 :]  # disjoint from the evaluation windows at the start
    evaluated = tokenizer(text, verbose=False).input_ids[: config.windows * config.context_length]
    if len(tokenizer.decode(evaluated)) >= len(text) // 2:
        raise ValueError("the evaluation windows would reach the calibration half of the text; use fewer windows")
    rows = []
    with torch.no_grad():
        for name in config.settings:
            rows.append(run_setting(model, tokenizer, name, config, calibration, text))
            print(f"{name}: {rows[-1].perplexity:.3f}", flush=True)
    base = next((r for r in rows if r.setting == "fp32"), rows[0])
    for r in rows:
        r.delta_percent = 100 * (r.perplexity / base.perplexity - 1)
    return rows


def to_markdown(rows: list[CompareRow], config: CompareConfig) -> str:
    lines = [f"Perplexity: token-level, {config.windows} non-overlapping windows × {config.context_length} tokens of "
             f"lowbit's reference text; calibration {config.n_samples} × {config.seq_len} tokens (disjoint text); "
             f"device {config.device}.",
             "",
             "| setting | method | format | bits/param | model MiB | perplexity | Δ vs fp32 | quantize s |",
             "|---|---|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r.setting} | {r.method} | {r.format} | {r.bits_per_parameter:.3f} | "
                     f"{r.model_bytes / 2**20:.1f} | {r.perplexity:.3f} | {r.delta_percent:+.2f}% | "
                     f"{r.quantize_seconds:.1f} |")  # fmt: skip
    return "\n".join(lines)


def to_csv(rows: list[CompareRow]) -> str:
    buffer = io.StringIO()
    names = [f for f in asdict(rows[0]) if f != "extra"] + ["mean_outlier_share"]
    writer = csv.DictWriter(buffer, fieldnames=names)
    writer.writeheader()
    for r in rows:
        d = asdict(r)
        writer.writerow({**{k: d[k] for k in names[:-1]}, "mean_outlier_share": r.extra.get("mean_outlier_share", "")})
    return buffer.getvalue()


def plot(rows: list[CompareRow], path: Path, config: CompareConfig) -> None:
    """Perplexity against bits/parameter; fp32 as a dashed line (its 32 bits would squash the axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    quantized = [r for r in rows if r.method != "none"]
    for method in dict.fromkeys(r.method for r in quantized):  # one colour per algorithm
        mine = [r for r in quantized if r.method == method]
        ax.scatter([r.bits_per_parameter for r in mine], [r.perplexity for r in mine], s=36, label=method)
    for r in quantized:
        ax.annotate(r.setting, (r.bits_per_parameter, r.perplexity), textcoords="offset points", xytext=(4, 4),
                    fontsize=8)  # fmt: skip
    for r in rows:
        if r.method == "none":
            ax.axhline(r.perplexity, linestyle="--", color="gray", label=f"fp32 ({r.perplexity:.2f})")
    ax.legend(fontsize=8)
    ax.set_xlabel("bits / parameter (quantized linear weights, statistics included)")
    ax.set_ylabel("perplexity (lower is better)")
    if quantized and max(r.perplexity for r in quantized) > 3 * min(r.perplexity for r in rows):
        ax.set_yscale("log")
    ax.set_title(f"{config.model}: {config.windows}×{config.context_length}-token perplexity vs bits")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(rows: list[CompareRow], config: CompareConfig, out_dir: str | Path) -> dict[str, Path]:
    """compare.md, compare.csv and compare.png in `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out / "compare.md", "csv": out / "compare.csv", "plot": out / "compare.png"}
    paths["markdown"].write_text(to_markdown(rows, config) + "\n")
    paths["csv"].write_text(to_csv(rows))
    plot(rows, paths["plot"], config)
    return paths


__all__ = ["SETTINGS", "CompareConfig", "CompareRow", "compare_methods", "model_bytes", "to_markdown", "write_results"]
