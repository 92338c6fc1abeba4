"""Quantization algorithms and the `quantize(model, config)` entry point."""

from lowbit.quantize import rtn  # noqa: F401  (registers "rtn")
from lowbit.quantize.api import available_methods, quantize, register_method, target_linears
from lowbit.quantize.config import QuantConfig
from lowbit.quantize.report import LayerReport, QuantReport
