"""Quantization-error report against float64 formulas, with its Markdown table and PNG plot."""

import copy

import numpy as np
import pytest
import torch

import lowbit
from lowbit.evaluate import error_report_for, quantization_error_report
from tests.tiny_models import tiny_llama


def test_report_numbers_match_a_float64_reference(tmp_path):
    model = tiny_llama()
    with torch.no_grad():  # plant outliers in one layer: every 25th weight ten times larger (4% of them)
        model.model.layers[1].mlp.down_proj.weight.view(-1)[::25] *= 10
    quantized = copy.deepcopy(model)
    lowbit.quantize(quantized, lowbit.QuantConfig(format="nf4", block_size=64))
    report = quantization_error_report(model, quantized, outlier_sigma=3.0)
    assert len(report.layers) == 14  # 7 linear layers × 2 blocks (lm_head excluded)
    for row in report.layers:
        w = model.get_submodule(row.name).weight.detach().double()
        w_hat = quantized.get_submodule(row.name).dequantize(torch.float32).double()
        err = w - w_hat
        assert row.relative_error == pytest.approx((err.norm() / w.norm()).item(), rel=1e-12)
        a, e = w.numpy(), err.numpy()  # the definitions once more, in numpy
        out = np.abs(a - a.mean()) > 3 * a.std(ddof=1)
        assert row.outlier_share == pytest.approx(out.mean(), rel=1e-12)
        assert row.outlier_error_share == pytest.approx((e[out] ** 2).sum() / (e**2).sum(), rel=1e-9, abs=1e-15)
        assert row.bits == pytest.approx(quantized.get_submodule(row.name).bits_per_parameter())
    worst_outliers = max(report.layers, key=lambda r: r.outlier_share)
    assert worst_outliers.name == "model.layers.1.mlp.down_proj"
    md = report.to_markdown()
    assert md.count("\n") == 15 and "model.layers.1.mlp.down_proj" in md
    png = report.plot(tmp_path / "errors.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_error_report_for_leaves_the_model_alone():
    model = tiny_llama()
    report = error_report_for(model, lowbit.QuantConfig(format="int8"))
    assert not any(isinstance(m, lowbit.QuantLinear) for m in model.modules())
    assert all(r.format == "int8" and r.relative_error < 0.02 for r in report.layers)
    int4 = error_report_for(model, lowbit.QuantConfig(format="int4"))
    assert all(a.relative_error < b.relative_error for a, b in zip(report.layers, int4.layers))


def test_mismatched_models_are_refused():
    quantized = tiny_llama()
    lowbit.quantize(quantized, lowbit.QuantConfig(format="nf4"))
    with pytest.raises(ValueError, match="no nn.Linear"):
        quantization_error_report(torch.nn.Linear(2, 2), quantized)
    with pytest.raises(ValueError, match="no QuantLinear"):
        quantization_error_report(tiny_llama(), tiny_llama())
