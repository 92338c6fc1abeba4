"""Several LoRA adapters on one base: switching, disabling, deleting, and mixed batches equal to per-row runs."""

import copy

import pytest
import torch

import lowbit
from lowbit.peft import (
    LoraConfig,
    active_adapters,
    adapters_disabled,
    apply_lora,
    delete_adapter,
    disable_adapters,
    enable_adapters,
    list_adapters,
    load_adapter,
    lora_layers,
    merge_lora,
    mixed_batch,
    save_adapter,
    set_active_adapters,
    unmerge_lora,
)
from tests.peft.test_lora import ids, randomize_lora_b
from tests.tiny_models import tiny_llama

CONFIGS = {
    "a": LoraConfig(r=4, alpha=8),  # every linear layer
    "b": LoraConfig(r=2, alpha=6, target_modules=("q_proj", "v_proj", "up_proj")),
}


def base_model(quantized):
    model = tiny_llama()
    if quantized:
        lowbit.quantize(model, lowbit.QuantConfig(format="nf4"))
    return model


@pytest.fixture(params=[False, True], ids=["dense", "nf4"])
def tenants(request, tmp_path):
    """(multi-adapter model, {name: single-adapter reference model}, base model) over the same base."""
    quantized = request.param
    base = base_model(quantized)
    singles = {}
    for seed, (name, config) in enumerate(CONFIGS.items()):
        singles[name] = apply_lora(copy.deepcopy(base), config)
        randomize_lora_b(singles[name], seed=seed)
        save_adapter(singles[name], tmp_path / name)
    multi = copy.deepcopy(base)
    for name in CONFIGS:
        load_adapter(multi, tmp_path / name, adapter_name=name)
    return multi, singles, base


def test_switch_disable_delete(tenants):
    multi, singles, base = tenants
    x = ids(3, 9)
    want = {name: m(x).logits for name, m in singles.items()}
    plain = base(x).logits
    assert list(list_adapters(multi)) == ["a", "b"] and active_adapters(multi) == ["b"]  # loaded last: active
    assert torch.equal(multi(x).logits, want["b"])
    set_active_adapters(multi, "a")
    assert torch.equal(multi(x).logits, want["a"])

    disable_adapters(multi)
    assert active_adapters(multi) == [] and torch.equal(multi(x).logits, plain)
    enable_adapters(multi)
    assert torch.equal(multi(x).logits, want["a"])
    with adapters_disabled(multi):
        assert torch.equal(multi(x).logits, plain)
    assert torch.equal(multi(x).logits, want["a"])

    set_active_adapters(multi, ["a", "b"])  # stacked: both updates add up
    both = multi(x).logits
    assert not torch.allclose(both, want["a"], atol=1e-4) and not torch.allclose(both, want["b"], atol=1e-4)

    delete_adapter(multi, "a")
    assert list(list_adapters(multi)) == ["b"] and active_adapters(multi) == ["b"]
    assert torch.equal(multi(x).logits, want["b"])
    assert len(lora_layers(multi)) == 6  # layers only "a" had are plain base layers again
    delete_adapter(multi, "b")
    assert not lora_layers(multi) and list_adapters(multi) == {}
    assert torch.equal(multi(x).logits, plain)


def test_mixed_batch_equals_each_row_alone(tenants):
    multi, singles, base = tenants
    rows = ["a", None, "b", "a", "b"]
    x = ids(len(rows), 10, seed=3)
    with mixed_batch(multi, rows):
        mixed = multi(x).logits
    for i, name in enumerate(rows):
        alone = (base if name is None else singles[name])(x[i : i + 1]).logits
        torch.testing.assert_close(mixed[i : i + 1], alone, rtol=1e-5, atol=1e-5)
    # Routing ends with the block; the model is back to its active adapter.
    assert all(layer.row_adapters is None for _, layer in lora_layers(multi))
    assert torch.equal(multi(x[:1]).logits, singles["b"](x[:1]).logits)


def test_mixed_batch_gradients_reach_only_the_rows_adapters(tenants):
    multi, _, _ = tenants
    for name, p in multi.named_parameters():
        p.requires_grad_(".lora_" in name)
    x = ids(2, 6)
    with mixed_batch(multi, ["b", None]):
        multi(x, labels=x).loss.backward()
    grads = {n: p.grad for n, p in multi.named_parameters() if p.requires_grad}
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.endswith(".b"))
    assert all(g is None or g.abs().sum() == 0 for n, g in grads.items() if n.endswith(".a"))


def test_routing_errors(tenants):
    multi, _, _ = tenants
    with pytest.raises(ValueError, match="no LoRA adapter named 'c'"):
        set_active_adapters(multi, "c")
    with pytest.raises(ValueError, match="no LoRA adapter named 'c'"):
        with mixed_batch(multi, ["a", "c"]):
            pass
    with pytest.raises(ValueError, match="mixed batch names 2 rows"):
        with mixed_batch(multi, ["a", "b"]):
            multi(ids(3, 4))
    with pytest.raises(ValueError, match="no LoRA adapter named 'zzz'"):
        delete_adapter(multi, "zzz")
    merge_lora(multi)
    with pytest.raises(ValueError, match="merged"):
        set_active_adapters(multi, "a")
    with pytest.raises(ValueError, match="merged"):
        with mixed_batch(multi, ["a"]):
            pass
    unmerge_lora(multi)
    set_active_adapters(multi, "a")


def test_apply_second_adapter_in_place_matches_single():
    base = tiny_llama()
    multi = apply_lora(copy.deepcopy(base), CONFIGS["a"], "a")
    apply_lora(multi, CONFIGS["b"], "b")
    randomize_lora_b(multi)
    single = apply_lora(copy.deepcopy(base), CONFIGS["b"])
    for (_, ml), (_, sl) in zip([(n, l) for n, l in lora_layers(multi) if "b" in l.lora_A], lora_layers(single)):
        with torch.no_grad():
            sl.lora_A["default"].copy_(ml.lora_A["b"])
            sl.lora_B["default"].copy_(ml.lora_B["b"])
    x = ids()
    assert torch.equal(multi(x).logits, single(x).logits)
