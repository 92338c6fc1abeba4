"""Partial fine-tuning (modules_to_save) and the full fine-tuning baseline."""

import pytest
import torch
from torch import nn

import lowbit
from lowbit.peft.ia3 import apply_ia3
from lowbit.peft.partial import (
    ModulesToSave,
    PartialConfig,
    apply_full_finetuning,
    apply_partial,
    find_modules_to_save,
    partial_from_peft_dict,
    partial_state_dict,
    partial_to_peft_dict,
    remove_partial,
)
from lowbit.peft.report import parameter_report
from tests.tiny_models import tiny_bert, tiny_llama


def ids(seed=0):
    return torch.randint(0, 300, (2, 7), generator=torch.Generator().manual_seed(seed))


def train(model, steps=3, **batch):
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return losses


@pytest.mark.parametrize("kwargs", [dict(modules_to_save=()), dict(modules_to_save=("",)),
                                    dict(modules_to_save=("lm_head",), version=9)])  # fmt: skip
def test_config_rejects_bad_values(kwargs):
    with pytest.raises(ValueError):
        PartialConfig(**kwargs)


def test_selects_the_outermost_modules_in_model_order():
    config = PartialConfig(modules_to_save=("lm_head", "model.layers.1", "model.layers.1.mlp"))
    assert [n for n, _ in find_modules_to_save(tiny_llama(), config)] == ["model.layers.1", "lm_head"]
    with pytest.raises(ValueError, match="match no module"):
        apply_partial(tiny_llama(), PartialConfig(modules_to_save=("head",)))  # anchored: "lm_head" ≠ "head"
    with pytest.raises(ValueError, match="no parameters"):
        apply_partial(tiny_llama(), PartialConfig(modules_to_save=("rotary_emb",)))
    model = apply_partial(tiny_llama(), PartialConfig(modules_to_save=("lm_head",)))
    with pytest.raises(ValueError, match="already trained"):
        apply_partial(model, PartialConfig(modules_to_save=("lm_head",)), adapter_name="again")


def test_tied_head_copy_trains_without_touching_the_embeddings():
    model = apply_partial(tiny_llama(), PartialConfig(modules_to_save=("lm_head",)))
    embeddings = model.get_input_embeddings().weight.detach().clone()
    losses = train(model, input_ids=ids(), labels=ids())
    assert losses[-1] < losses[0]
    assert torch.equal(model.get_input_embeddings().weight, embeddings)
    wrapper = model.get_submodule("lm_head")
    assert isinstance(wrapper, ModulesToSave)
    assert torch.equal(wrapper.original_module.weight, embeddings)  # the tied original is untouched
    assert list(partial_state_dict(model, "default")) == ["base_model.model.lm_head.weight"]


def test_new_classification_head():
    """Transfer learning: a new 5-way head on BERT, trained alone."""
    model = tiny_bert()
    model.classifier = nn.Linear(64, 5)
    model.num_labels = model.config.num_labels = 5
    apply_partial(model, PartialConfig(modules_to_save=("classifier",)))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"classifier.modules_to_save.default.weight", "classifier.modules_to_save.default.bias"}
    losses = train(model, steps=5, input_ids=ids(), labels=torch.tensor([1, 4]))
    assert losses[-1] < losses[0]
    assert list(partial_state_dict(model, "default")) == ["base_model.model.classifier.weight",
                                                          "base_model.model.classifier.bias"]  # fmt: skip


def test_remove_keeps_or_discards_the_trained_copies():
    model = apply_partial(tiny_llama(), PartialConfig(modules_to_save=("model.layers.1", "lm_head")))
    train(model, input_ids=ids(), labels=ids())
    model.eval()
    with torch.no_grad():
        trained = model(input_ids=ids()).logits
    kept = remove_partial(model, keep_trained=True)
    assert not any(isinstance(m, ModulesToSave) for m in kept.modules()) and kept.lowbit_adapters == {}
    with torch.no_grad():
        assert torch.equal(kept(input_ids=ids()).logits, trained)
    model = apply_partial(tiny_llama(), PartialConfig(modules_to_save=("model.layers.1", "lm_head")))
    train(model, input_ids=ids(), labels=ids())
    remove_partial(model)
    with torch.no_grad():
        assert torch.equal(model.eval()(input_ids=ids()).logits, tiny_llama()(input_ids=ids()).logits)


def test_peft_dict_round_trip():
    config = PartialConfig(modules_to_save=("model.layers.1", "lm_head"))
    d = partial_to_peft_dict(config)
    assert d == {"peft_type": "PARTIAL", "modules_to_save": ["model.layers.1", "lm_head"], "version": 1}
    assert partial_from_peft_dict({**d, "task_type": "CAUSAL_LM", "peft_version": "0.21.2"}) == config


def test_full_finetuning_trains_every_float_parameter():
    model = apply_full_finetuning(apply_ia3(tiny_llama()))
    report = parameter_report(model)
    assert report.trainable == report.total
    model = tiny_llama()
    lowbit.quantize(model, lowbit.QuantConfig(format="nf4"))
    report = parameter_report(apply_full_finetuning(model))
    # the quantized weights are storage, not parameters: only embeddings and norms remain trainable
    assert report.trainable == 300 * 64 + 5 * 64
    losses = train(model, input_ids=ids(), labels=ids())
    assert losses[-1] < losses[0]
