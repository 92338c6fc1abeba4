"""Quantization algorithms and the `quantize(model, config)` entry point."""

# Each algorithm module registers its method name with `register_method` on import.
from lowbit.quantize import gptq, llm_int8, rtn, smoothquant, spqr  # noqa: F401
from lowbit.quantize.api import available_methods, quantize, register_method, target_linears
from lowbit.quantize.calibration import CalibrationConfig, activation_absmax
from lowbit.quantize.config import QuantConfig
from lowbit.quantize.gptq import GPTQOptions
from lowbit.quantize.llm_int8 import LLMInt8Options
from lowbit.quantize.report import LayerReport, QuantReport
from lowbit.quantize.smoothquant import SmoothQuantOptions, smooth_model
from lowbit.quantize.spqr import SpQROptions
