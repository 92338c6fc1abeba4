"""Round-to-nearest (RTN): each weight becomes its nearest representable value, no calibration.

The baseline every other algorithm is measured against; all the work is in the format itself.
"""

from __future__ import annotations

from lowbit.nn.quant_linear import QuantLinear
from lowbit.quantize.api import register_method, swap_in
from lowbit.quantize.report import LayerReport


@register_method("rtn")
def quantize_rtn(model, config, targets, **unused) -> list[LayerReport]:
    if unused:
        raise TypeError(f"rtn takes no calibration arguments, got {sorted(unused)}")
    fmt = config.weight_format
    return [
        swap_in(model, name, linear, QuantLinear.from_linear(linear, fmt, config.torch_compute_dtype))
        for name, linear in targets
    ]
