"""Modules that replace nn.Linear."""

from lowbit.nn.quant_linear import QuantLinear
