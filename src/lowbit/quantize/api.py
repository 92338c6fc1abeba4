"""`lowbit.quantize(model, config)`: look up the config's method and let it swap the model's layers.

Each algorithm lives in its own module and registers a handler with `register_method`; this file only
finds the targeted layers and dispatches, so adding GPTQ or SmoothQuant never touches an if/elif chain.
"""

from __future__ import annotations

import time
from typing import Callable, Iterator

import torch
from torch import nn

from lowbit.nn.matching import matches_any
from lowbit.nn.quant_linear import QuantLinear
from lowbit.quantize.config import QuantConfig
from lowbit.quantize.report import LayerReport, QuantReport

Handler = Callable[..., list[LayerReport]]
_METHODS: dict[str, Handler] = {}


def register_method(name: str) -> Callable[[Handler], Handler]:
    """Register `handler(model, config, targets, **kwargs) -> list[LayerReport]` for `method=name`."""

    def wrap(handler: Handler) -> Handler:
        _METHODS[name] = handler
        return handler

    return wrap


def available_methods() -> list[str]:
    return sorted(_METHODS)


def target_linears(model: nn.Module, config: QuantConfig) -> list[str]:
    """Names of the `nn.Linear` layers the config selects (already quantized layers are skipped)."""
    return [
        name
        for name, module in model.named_modules()
        if type(module) is nn.Linear and matches_any(name, config.include) and not matches_any(name, config.exclude)
    ]


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def swap_in(model: nn.Module, name: str, linear: nn.Linear, quantized: QuantLinear) -> LayerReport:
    """Put `quantized` in place of `linear` and account for the swap."""
    with torch.no_grad():
        w = linear.weight.detach()
        err = (quantized.dequantize(torch.float32) - w.float()).norm() / w.float().norm().clamp(min=1e-30)
    set_submodule(model, name, quantized)
    return LayerReport(
        name=name,
        shape=(linear.out_features, linear.in_features),
        format=quantized.fmt.name,
        bits_per_parameter=quantized.bits_per_parameter(),
        bytes_before=w.numel() * w.element_size(),
        bytes_after=quantized.weight_nbytes(),
        relative_error=float(err),
    )


def iter_targets(model: nn.Module, config: QuantConfig, progress: bool) -> Iterator[tuple[str, nn.Linear]]:
    names = target_linears(model, config)
    if progress:
        from tqdm.auto import tqdm

        names = tqdm(names, desc=f"quantize ({config.method}, {config.format})", unit="layer")
    for name in names:
        yield name, model.get_submodule(name)


def quantize(model: nn.Module, config: QuantConfig | None = None, progress: bool = False, **kwargs) -> QuantReport:
    """Quantize `model` in place as `config` says and return a per-layer report.

    Layers are converted one at a time and each full-precision weight is released as soon as its
    quantized replacement is in place, so the model is never held twice. Calibrated methods take
    their data as keyword arguments (`calibration=texts, tokenizer=tok`).
    """
    config = config or QuantConfig()
    if config.method not in _METHODS:
        raise ValueError(f"unknown quantization method {config.method!r}; available: {available_methods()}")
    start = time.perf_counter()
    layers = _METHODS[config.method](model, config, iter_targets(model, config, progress), **kwargs)
    report = QuantReport(config.method, layers, time.perf_counter() - start)
    model.lowbit_quant_config = config  # what save_quantized records
    return report
