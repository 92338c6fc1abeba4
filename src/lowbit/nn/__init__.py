"""Modules that replace nn.Linear."""

from lowbit.nn.act_order_linear import ActOrderQuantLinear
from lowbit.nn.int8_linear import Int8Linear, int8_matmul
from lowbit.nn.quant_linear import QuantLinear
from lowbit.nn.spqr_linear import SpQRFormat, SpQRLinear
from lowbit.nn.w8a8_linear import W8A8Linear

__all__ = ["ActOrderQuantLinear", "Int8Linear", "QuantLinear", "SpQRFormat", "SpQRLinear", "W8A8Linear", "int8_matmul"]
