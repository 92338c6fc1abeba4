"""Calibration: token windows, block-by-block capture against a plain hooked forward pass, errors."""

import pytest
import torch
from torch import nn

from lowbit.quantize.calibration import (
    CalibrationConfig,
    activation_absmax,
    calibration_ids,
    calibration_steps,
    find_blocks,
    split_options,
)
from lowbit.quantize.gptq import GPTQOptions
from tests.tiny_models import tiny_bert, tiny_llama


class CharTokenizer:
    """A tokenizer stand-in: one token per character."""

    def __call__(self, text, return_tensors=None, verbose=False):
        class Out:
            input_ids = torch.tensor([[ord(c) % 300 for c in text]])

        return Out()


def test_calibration_windows():
    tok = CharTokenizer()
    letters = torch.randint(0, 26, (500,), generator=torch.Generator().manual_seed(0)).tolist()
    text = "".join(chr(97 + i) for i in letters)  # 500 tokens, no repeated windows
    ids = calibration_ids(text, tok, CalibrationConfig(n_samples=4, seq_len=64, seed=1))
    assert ids.shape == (4, 64)
    # windows are non-overlapping slices of the token stream, in order, chosen by the seed
    stream = tok(text).input_ids[0]
    offsets = [next(s for s in range(0, 500 - 63, 64) if torch.equal(stream[s : s + 64], ids[i])) for i in range(4)]
    assert offsets == sorted(offsets) and len(set(offsets)) == 4
    assert torch.equal(ids, calibration_ids(text, tok, CalibrationConfig(n_samples=4, seq_len=64, seed=1)))
    assert not torch.equal(ids, calibration_ids(text, tok, CalibrationConfig(n_samples=4, seq_len=64, seed=2)))
    # fewer windows than asked: all of them; shorter than one window: one short sample; lists are joined
    assert calibration_ids(text, tok, CalibrationConfig(n_samples=100, seq_len=64)).shape == (7, 64)
    assert calibration_ids("short", tok, CalibrationConfig()).shape == (1, 5)
    assert calibration_ids(["ab", "cd"], tok, CalibrationConfig()).shape == (1, 6)
    assert calibration_ids(torch.arange(10), None, CalibrationConfig(seq_len=4)).tolist() == [[0, 1, 2, 3]]


def test_calibration_errors():
    with pytest.raises(ValueError, match="needs calibration data"):
        calibration_ids(None, None, CalibrationConfig(), "gptq")
    with pytest.raises(ValueError, match="tokenizer"):
        calibration_ids("text", None, CalibrationConfig())
    with pytest.raises(ValueError, match="integer"):
        calibration_ids(torch.randn(2, 4), None, CalibrationConfig())
    with pytest.raises(ValueError, match="no tokens"):
        calibration_ids("", CharTokenizer(), CalibrationConfig())
    for bad in ({"n_samples": 0}, {"seq_len": 1.5}, {"seed": -1}, {"n_samples": True}):
        with pytest.raises(ValueError):
            CalibrationConfig(**bad)
    options, calib = split_options({"damp": 0.05, "n_samples": 4}, GPTQOptions, "gptq")
    assert options.damp == 0.05 and calib.n_samples == 4 and calib.seq_len == CalibrationConfig().seq_len
    with pytest.raises(ValueError, match="unknown gptq option"):
        split_options({"nsamples": 4}, GPTQOptions, "gptq")


def hooked_absmax(model: nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Reference: one ordinary forward per sample with hooks on every linear layer."""
    stats = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            def hook(mod, args, name=name):
                a = args[0].detach().reshape(-1, args[0].shape[-1]).abs().amax(dim=0)
                stats[name] = torch.maximum(stats[name], a) if name in stats else a
            hooks.append(m.register_forward_pre_hook(hook))
    with torch.no_grad():
        for row in ids:
            model(input_ids=row[None])
    for h in hooks:
        h.remove()
    return stats


@pytest.mark.parametrize("build", [tiny_llama, tiny_bert])
def test_blockwise_capture_equals_a_plain_forward(build):
    model = build()
    ids = torch.randint(0, 300, (3, 12), generator=torch.Generator().manual_seed(0))
    expected = hooked_absmax(model, ids)
    got = activation_absmax(model, ids)
    assert set(got) == set(expected)  # BERT's pooler and classifier are calibrated by the whole-model step
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6)


def test_blocks_after_the_last_target_never_run():
    model = tiny_llama()
    prefix, blocks = find_blocks(model)
    assert prefix == "model.layers" and len(blocks) == 2
    calls = []
    blocks[1].register_forward_pre_hook(lambda *a: calls.append(1))
    ids = torch.randint(0, 300, (2, 8))
    steps = list(calibration_steps(model, ids, ["model.layers.0.mlp.up_proj"]))
    assert [s.names for s in steps] == [["model.layers.0.mlp.up_proj"]] and calls == []


def test_nan_activations_are_a_clear_error():
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("inf")  # block 0's output turns non-finite
    ids = torch.randint(0, 300, (2, 8))
    with pytest.raises(ValueError, match="NaN or inf"):
        activation_absmax(model, ids)
