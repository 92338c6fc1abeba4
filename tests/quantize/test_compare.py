"""`lowbit compare` / compare_methods: a tiny run on the real model writes a consistent table, CSV and plot."""

import csv

import pytest

from lowbit.cli import build_parser, main
from lowbit.quantize.compare import SETTINGS, CompareConfig, compare_methods, model_bytes, to_markdown, write_results


@pytest.mark.slow
def test_small_comparison_on_smollm2(smollm2, tmp_path):
    model, tokenizer = smollm2
    config = CompareConfig(settings=("fp32", "rtn-int4-g128", "gptq-int4-g128"), n_samples=2, seq_len=32,
                           windows=1, context_length=64, include=("model.layers.0.mlp.*",))  # fmt: skip
    rows = compare_methods(config, model, tokenizer)
    assert [r.setting for r in rows] == list(config.settings)
    fp32, rtn, gptq = rows
    assert fp32.bits_per_parameter == 32 and fp32.delta_percent == 0 and fp32.model_bytes == model_bytes(model)
    assert rtn.bits_per_parameter == gptq.bits_per_parameter < 4.5
    assert rtn.model_bytes < fp32.model_bytes and gptq.quantize_seconds > 0
    assert rtn.delta_percent == pytest.approx(100 * (rtn.perplexity / fp32.perplexity - 1))
    assert all(type(m).__name__ == "Linear" for n, m in model.named_modules() if n.endswith("mlp.up_proj"))  # untouched
    paths = write_results(rows, config, tmp_path)
    table = paths["markdown"].read_text()
    assert table == to_markdown(rows, config) + "\n" and "| gptq-int4-g128 | gptq | int4 |" in table
    with open(paths["csv"]) as f:
        parsed = list(csv.DictReader(f))
    assert [r["setting"] for r in parsed] == list(config.settings)
    assert float(parsed[1]["perplexity"]) == pytest.approx(rtn.perplexity)
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_config_validation_and_cli_help(capsys):
    with pytest.raises(ValueError, match="unknown setting"):
        CompareConfig(settings=("gptq-int5",))
    with pytest.raises(ValueError, match="windows"):
        CompareConfig(windows=0)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["compare", "--help"])
    out = capsys.readouterr().out
    flat = out.replace("\n", " ").replace("- ", "-")  # argparse wraps the list of settings
    assert "perplexity" in out and "spqr-w3g16" in flat and "llm.int8" in flat
    assert main(["compare", "--settings", "nope", "--windows", "1"]) == 1
    assert set(SETTINGS) >= {"fp32", "rtn-int4-g128", "gptq-int4-g128", "spqr-w3g16", "llm.int8", "smoothquant-w8a8"}
