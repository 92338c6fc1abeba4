"""LLM.int8(): swap every targeted linear for an `Int8Linear` (Dettmers et al. 2022).

The weight becomes int8 per output row (vector-wise, eq. 5); at run time every input's columns holding a
value with |x| ≥ threshold (default 6.0, §3.2) are multiplied in floating point and the rest in int8
(eq. 7; the arithmetic is in `lowbit.nn.int8_linear`). No calibration is needed. When calibration data
is given, the report also says, per layer, the share of input columns that held an outlier on it
(`LayerReport.outlier_share`) — the paper's measure of how much of the matmul stays in 16-bit.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from lowbit.nn.int8_linear import Int8Linear, check_threshold
from lowbit.quantize.api import register_method, swap_in, target_linears
from lowbit.quantize.calibration import AbsMaxObserver, LayerTicker, calibration_ids, calibration_steps, split_options
from lowbit.quantize.report import LayerReport


@dataclass(frozen=True)
class LLMInt8Options:
    threshold: float = 6.0  # |x| at which an input column is an outlier feature; math.inf: pure int8

    def __post_init__(self) -> None:
        check_threshold(self.threshold)


@register_method("llm_int8")
def quantize_llm_int8(model, config, targets, calibration=None, tokenizer=None) -> list[LayerReport]:
    """`lowbit.quantize(model, QuantConfig(method="llm_int8", format="int8", options={"threshold": 6.0}))`."""
    options, calib = split_options(config.options, LLMInt8Options, "llm_int8")
    if config.format != "int8":
        raise ValueError(f"llm_int8 stores int8 weights: use format='int8', got {config.format!r}")
    if calibration is None:
        if tokenizer is not None:
            raise ValueError("a tokenizer was given without calibration data")
        return [_swap(model, name, linear, options, config, None) for name, linear in targets]
    ticker = LayerTicker(targets)
    names = target_linears(model, config)
    if not names:
        return []
    ids = calibration_ids(calibration, tokenizer, calib, "llm_int8")
    reports = []
    for step in calibration_steps(model, ids, names):
        layers = {n: model.get_submodule(n) for n in step.names}
        observers = step.observe(layers, lambda n, m: AbsMaxObserver(n, m.in_features, m.weight.device))
        for name, linear in layers.items():
            share = float((observers[name].absmax >= options.threshold).float().mean())
            reports.append(_swap(model, name, linear, options, config, share))
            ticker.done()
    return reports


def _swap(model, name, linear, options: LLMInt8Options, config, share: float | None) -> LayerReport:
    module = Int8Linear.from_linear(linear, compute_dtype=config.torch_compute_dtype, threshold=options.threshold)
    report = swap_in(model, name, linear, module)
    return replace(report, format="llm_int8", outlier_share=share)
