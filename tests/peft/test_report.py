"""Trainable-parameter report: analytic counts, quantized layers, HF peft's numbers and print format, and the
counts per method on the real SmolLM2-135M."""

import copy
import warnings

import peft
import pytest

import lowbit
from lowbit.peft.adapter import BottleneckConfig, apply_bottleneck, remove_bottleneck
from lowbit.peft.ia3 import IA3Config, apply_ia3, remove_ia3
from lowbit.peft.lora import LoraConfig, apply_lora, remove_lora
from lowbit.peft.p_tuning import (
    PTuningConfig,
    apply_p_tuning,
    drop_prompt_encoder,
    p_tuning_state_dict,
    remove_p_tuning,
)
from lowbit.peft.partial import PartialConfig, apply_full_finetuning, apply_partial, remove_partial
from lowbit.peft.prefix_tuning import (
    PrefixTuningConfig,
    apply_prefix_tuning,
    drop_prefix_encoder,
    prefix_tuning_state_dict,
    remove_prefix_tuning,
)
from lowbit.peft.prompt_tuning import PromptTuningConfig, apply_prompt_tuning, remove_prompt_tuning
from lowbit.peft.report import parameter_report, print_trainable_parameters
from tests.tiny_models import tiny_llama

# tiny Llama: tied 300×64 embedding; per layer q,o 64×64, k,v 64×32, gate,up,down 64×160, two norms; final norm
TINY_TOTAL = 300 * 64 + 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 160 + 2 * 64) + 64


def test_counts_tied_weights_once():
    report = parameter_report(tiny_llama())
    assert (report.trainable, report.total) == (TINY_TOTAL, TINY_TOTAL)


def test_quantized_layers_count_the_weights_they_stand_for():
    model = tiny_llama()
    lowbit.quantize(model, lowbit.QuantConfig(format="nf4"))
    report = parameter_report(model)
    assert report.total == TINY_TOTAL
    assert report.trainable == 300 * 64 + 5 * 64  # the embedding and norms are still Parameters


PEFT_CASES = {
    "ia3": (apply_ia3, IA3Config(), lambda: peft.IA3Config(task_type="CAUSAL_LM")),
    "prompt": (apply_prompt_tuning, PromptTuningConfig(num_virtual_tokens=20),
               lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=20)),
    "p_tuning": (apply_p_tuning, PTuningConfig(num_virtual_tokens=20),
                 lambda: peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=20)),
    "prefix": (apply_prefix_tuning, PrefixTuningConfig(num_virtual_tokens=20),
               lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=20, prefix_projection=True)),
}  # fmt: skip


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_counts_and_line_equal_peft(case, capsys):
    apply, config, peft_config = PEFT_CASES[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = peft.get_peft_model(tiny_llama(), peft_config())
    reference.print_trainable_parameters()
    theirs = capsys.readouterr().out.strip()
    report = print_trainable_parameters(apply(tiny_llama(), config))
    assert (report.trainable, report.total) == reference.get_nb_trainable_parameters()
    assert capsys.readouterr().out.strip() == theirs


def smollm2_counts(model):
    """Trainable parameters per method, each applied to the same model and removed again; for P- and prefix
    tuning also the size of what is kept after training (the saved adapter)."""
    counts = {"full fine-tuning": parameter_report(model).total}
    steps = [
        ("LoRA r=8 all-linear", apply_lora, LoraConfig(r=8, alpha=16), remove_lora),
        ("IA3 (k, v, down_proj)", apply_ia3, IA3Config(), remove_ia3),
        ("bottleneck m=64", apply_bottleneck, BottleneckConfig(bottleneck_size=64), remove_bottleneck),
        ("prompt tuning 20", apply_prompt_tuning, PromptTuningConfig(num_virtual_tokens=20), remove_prompt_tuning),
        ("P-tuning 20, MLP", apply_p_tuning, PTuningConfig(num_virtual_tokens=20), remove_p_tuning),
        ("prefix 20, MLP", apply_prefix_tuning, PrefixTuningConfig(num_virtual_tokens=20), remove_prefix_tuning),
        ("partial: last block + norm", apply_partial, PartialConfig(("model.layers.29", "model.norm")), remove_partial),
    ]  # fmt: skip
    kept = {"P-tuning 20, MLP": ("P-tuning 20, saved", drop_prompt_encoder, p_tuning_state_dict),
            "prefix 20, MLP": ("prefix 20, saved", drop_prefix_encoder, prefix_tuning_state_dict)}  # fmt: skip
    for name, apply, config, remove in steps:
        apply(model, config)
        counts[name] = parameter_report(model).trainable
        if name in kept:
            saved_name, drop, state_dict = kept[name]
            drop(model)
            counts[saved_name] = sum(t.numel() for t in state_dict(model, "default").values())
        remove(model)
        assert model.lowbit_adapters == {}
    return counts


@pytest.mark.slow
def test_smollm2_trainable_parameters_per_method(smollm2):
    """Against counts derived from the architecture by hand (d=576, 30 layers, 3 KV heads of 64, FF 1536)."""
    model = copy.deepcopy(smollm2[0])
    d, layers, kv, ff, vocab = 576, 30, 3 * 64, 1536, 49152
    counts = smollm2_counts(model)
    block = 2 * d * d + 2 * d * kv + 3 * d * ff + 2 * d
    expected = {
        "full fine-tuning": vocab * d + layers * block + d,  # tied embeddings
        "LoRA r=8 all-linear": layers * 8 * (2 * (d + d) + 2 * (d + kv) + 3 * (d + ff)),
        "IA3 (k, v, down_proj)": layers * (kv + kv + ff),
        "bottleneck m=64": 2 * layers * (2 * d * 64 + d + 64),
        "prompt tuning 20": 20 * d,
        "P-tuning 20, MLP": 20 * d + 3 * (d * d + d),  # encoder hidden = d (PEFT's default)
        "P-tuning 20, saved": 20 * d,
        "prefix 20, MLP": 20 * kv + (kv * kv + kv) + (kv * layers * 2 * kv + layers * 2 * kv),
        "prefix 20, saved": 20 * layers * 2 * kv,
        "partial: last block + norm": block + d,
    }
    assert counts == expected
    for name, n in counts.items():  # the table for the closing note (pytest -s shows it)
        print(f"{name:28s} {n:>12,d}  {100 * n / counts['full fine-tuning']:8.4f}%")
    apply_full_finetuning(model)
    assert parameter_report(model).trainable == expected["full fine-tuning"]
