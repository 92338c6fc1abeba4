"""How many parameters train: the `print_trainable_parameters` line, for any model and any adapter mix.

    trainable params: 57,600 || all params: 134,572,608 || trainable%: 0.0428

Every parameter is counted once (tied weights are one tensor). A quantized layer (QuantLinear) keeps its
weight in integer buffers rather than a Parameter; it counts as in_features × out_features frozen
parameters, the number of weights it stands for, so that a QLoRA model reports the same total as its
unquantized original.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lowbit.nn.quant_linear import QuantLinear


@dataclass(frozen=True)
class ParameterReport:
    trainable: int
    total: int

    @property
    def frozen(self) -> int:
        return self.total - self.trainable

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: {self.percent:.4f}"


def parameter_report(model: nn.Module) -> ParameterReport:
    """Trainable (requires_grad) and total parameters of `model`, quantized weights included in the total."""
    trainable = total = 0
    for p in model.parameters():  # yields each shared tensor once
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    for module in model.modules():
        if isinstance(module, QuantLinear):
            total += module.in_features * module.out_features
    return ParameterReport(trainable=trainable, total=total)


def print_trainable_parameters(model: nn.Module) -> ParameterReport:
    """Print the report line (PEFT's format) and return the numbers."""
    report = parameter_report(model)
    print(report)
    return report
