"""LoRA and QLoRA: selection, initialisation, forward and gradients against float64 references, training,
merge / unmerge."""

import copy
import math

import pytest
import torch
from torch import nn

import lowbit
from lowbit.formats import WeightFormat
from lowbit.nn import QuantLinear
from lowbit.peft import LoraConfig, LoraLinear, apply_lora, find_lora_targets, lora_layers, merge_lora, remove_lora
from lowbit.peft import unmerge_lora
from tests.tiny_models import tiny_llama

# bitsandbytes' NF4 values (DESIGN.md's table at full float32 precision).
NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
       -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
       0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
       0.7229568362236023, 1.0]  # fmt: skip
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def randomize_lora_b(model, std=0.05, seed=123):
    g = torch.Generator().manual_seed(seed)
    for _, layer in lora_layers(model):
        for b in layer.lora_B.values():
            with torch.no_grad():
                b.copy_(torch.randn(b.shape, generator=g) * std)


def ids(batch=2, length=7, seed=0):
    return torch.randint(0, 300, (batch, length), generator=torch.Generator().manual_seed(seed))


# --- configuration and selection ----------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    ({"r": 0}, "r must be"), ({"alpha": -1}, "alpha must be"), ({"dropout": 1.0}, "dropout"),
    ({"target_modules": ()}, "target_modules"), ({"target_modules": "(q_proj"}, "regular expression"),
    ({"rank_pattern": {"q_proj": 0}}, "rank_pattern"), ({"init_lora_weights": "pissa"}, "init_lora_weights"),
    ({"lora_dtype": "int8"}, "lora_dtype"), ({"version": 99}, "version"),
])  # fmt: skip
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoraConfig(**kwargs)


def test_target_selection():
    model = tiny_llama(tie=False)
    every = [f"model.layers.{i}.{part}.{p}" for i in range(2) for part, p in
             [("self_attn", p) for p in PROJ[:4]] + [("mlp", p) for p in PROJ[4:]]]  # fmt: skip
    assert find_lora_targets(model, LoraConfig()) == every  # all-linear: lm_head (untied here) left out
    assert find_lora_targets(model, LoraConfig(target_modules=("q_proj", "v_proj"))) == [
        n for n in every if n.endswith(("q_proj", "v_proj"))]  # fmt: skip
    assert find_lora_targets(model, LoraConfig(target_modules=("model.layers.0.mlp.*",))) == every[4:7]
    assert find_lora_targets(model, LoraConfig(target_modules=r".*\.(k|o)_proj")) == [
        n for n in every if n.endswith(("k_proj", "o_proj"))]  # fmt: skip
    assert find_lora_targets(model, LoraConfig(exclude_modules=("down_proj",))) == [
        n for n in every if not n.endswith("down_proj")]  # fmt: skip
    assert find_lora_targets(model, LoraConfig(target_modules=("proj",))) == []  # anchored: no substrings
    with pytest.raises(ValueError, match="regular expression over the whole name"):
        apply_lora(model, LoraConfig(target_modules="q_proj"))
    assert not lora_layers(model) and not hasattr(model, "lowbit_adapters")


def test_init_and_per_module_rank_alpha():
    model = tiny_llama()
    before = model(ids()).logits
    config = LoraConfig(r=4, alpha=8, rank_pattern={"q_proj": 2, r"layers\.1\.mlp\..*": 6},
                        alpha_pattern={"v_proj": 3}, use_rslora=True)  # fmt: skip
    apply_lora(model, config)
    torch.testing.assert_close(model(ids()).logits, before, rtol=0, atol=0)  # B = 0: output unchanged
    layers = dict(lora_layers(model))
    expect = {"model.layers.0.self_attn.q_proj": (2, 8 / math.sqrt(2)),
              "model.layers.0.self_attn.v_proj": (4, 3 / math.sqrt(4)),
              "model.layers.1.mlp.up_proj": (6, 8 / math.sqrt(6)),
              "model.layers.0.mlp.up_proj": (4, 8 / math.sqrt(4))}  # fmt: skip
    for name, (r, scale) in expect.items():
        layer = layers[name]
        a, b = layer.lora_A["default"], layer.lora_B["default"]
        assert a.shape == (r, layer.in_features) and b.shape == (layer.out_features, r)
        assert layer.scaling["default"] == pytest.approx(scale)
        assert torch.all(b == 0)
        # Kaiming-uniform with a = √5: U(-1/√fan_in, 1/√fan_in), whose std is bound/√3.
        bound = 1 / math.sqrt(layer.in_features)
        assert a.abs().max() <= bound and a.abs().max() > 0.8 * bound
    all_a = torch.cat([l.lora_A["default"].flatten() * math.sqrt(l.in_features) for l in layers.values()])
    assert all_a.std().item() == pytest.approx(1 / math.sqrt(3), rel=0.05)


def test_only_lora_parameters_require_grad():
    model = tiny_llama()
    apply_lora(model, LoraConfig(r=4))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # r·(in + out) per layer: q,o 64→64; k,v 64→32; gate,up 64→160; down 160→64 — two layers.
    per_layer = 4 * (2 * 128 + 2 * 96 + 3 * 224)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 2 * per_layer


def test_forward_matches_float64_reference():
    torch.manual_seed(0)
    linear = nn.Linear(32, 24)
    model = apply_lora(nn.Sequential(linear), LoraConfig(r=3, alpha=5, init_lora_weights=False))
    layer = model[0]
    x = torch.randn(2, 5, 32)
    a, b = layer.lora_A["default"].detach().double(), layer.lora_B["default"].detach().double()
    x64 = x.double()
    ref = x64 @ linear.weight.detach().double().t() + linear.bias.detach().double() + (5 / 3) * (x64 @ a.t()) @ b.t()
    torch.testing.assert_close(model(x).double(), ref, rtol=1e-5, atol=1e-5)


def test_dropout_only_touches_the_lora_path():
    torch.manual_seed(0)
    model = apply_lora(nn.Sequential(nn.Linear(16, 16)), LoraConfig(r=2, dropout=0.5, init_lora_weights=False)).train()
    x = torch.randn(64, 16)
    base = model[0].base_layer(x)
    torch.manual_seed(1)
    y = model(x)
    torch.manual_seed(1)
    mask_scale = nn.functional.dropout(torch.ones_like(x), 0.5, training=True)
    a, b = model[0].lora_A["default"], model[0].lora_B["default"]
    torch.testing.assert_close(y, base + model[0].scaling["default"] * ((x * mask_scale) @ a.t()) @ b.t())


# --- training --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("quantized", [False, True])
def test_one_step_trains_lora_and_leaves_the_base_bit_identical(quantized):
    model = tiny_llama()
    if quantized:
        lowbit.quantize(model, lowbit.QuantConfig(format="nf4", block_size=64, double_quant=True))
    frozen = {id(t): (t, t.detach().clone()) for t in list(model.parameters()) + list(model.buffers())}
    apply_lora(model, LoraConfig(r=4, alpha=8))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = ids(4, 12)
    loss0 = model(batch, labels=batch).loss
    loss0.backward()
    opt.step()
    opt.zero_grad()
    loss1 = model(batch, labels=batch).loss
    assert loss1.item() < loss0.item()
    for t, copy_ in frozen.values():
        assert torch.equal(t, copy_) and not t.requires_grad


# --- QLoRA gradients --------------------------------------------------------------------------------------


def nf4_double_quant_dequantize_by_hand(q: QuantLinear) -> torch.Tensor:
    """Float64 dense weight of an NF4 + double-quant QuantLinear, from its raw storage bytes.

    Codes: two per byte, first value in the high nibble. Block scales: uint8 indices into bitsandbytes'
    signed 8-bit dynamic map, times the fp32 scale of their block of 256, plus the stored mean (offset).
    """
    from bitsandbytes.functional import create_dynamic_map

    n = q.out_features * q.in_features
    packed = q.weight.reshape(-1).long()
    codes = torch.stack([packed >> 4, packed & 15], dim=1).reshape(-1)[:n]
    dyn = create_dynamic_map(signed=True).double()
    nested = q.weight_nested_absmax.double().repeat_interleave(256)[: q.weight_absmax.numel()]
    absmax = dyn[q.weight_absmax.long()] * nested + q.weight_offset.double()
    values = torch.tensor(NF4, dtype=torch.float64)[codes] * absmax.repeat_interleave(64)[:n]
    return values.reshape(q.out_features, q.in_features)


@pytest.mark.parametrize("compute, lora_dtype, tol", [
    (torch.float32, "float32", 1e-5), (torch.bfloat16, "float32", 2e-2), (torch.bfloat16, "bfloat16", 3e-2),
])  # fmt: skip
def test_qlora_gradients_match_float64_reference(compute, lora_dtype, tol):
    torch.manual_seed(0)
    linear = nn.Linear(128, 48)
    q = QuantLinear.from_linear(linear, WeightFormat("nf4", block_size=64, double_quant=True), compute)
    model = apply_lora(nn.Sequential(q), LoraConfig(r=4, alpha=8, init_lora_weights=False, lora_dtype=lora_dtype))
    layer = model[0]
    assert layer.base_layer is q and layer.lora_A["default"].dtype == getattr(torch, lora_dtype)
    x = torch.randn(3, 5, 128)
    g = torch.randn(3, 5, 48)
    (model(x) * g).sum().backward()

    w64 = nf4_double_quant_dequantize_by_hand(q)
    a64 = layer.lora_A["default"].detach().double().requires_grad_(True)
    b64 = layer.lora_B["default"].detach().double().requires_grad_(True)
    x64 = x.double()
    y64 = x64 @ w64.t() + q.bias.double() + 2.0 * (x64 @ a64.t()) @ b64.t()  # alpha / r = 2
    (y64 * g.double()).sum().backward()

    for got, want in ((layer.lora_A["default"].grad, a64.grad), (layer.lora_B["default"].grad, b64.grad)):
        assert got.dtype == getattr(torch, lora_dtype)
        rel = (got.double() - want).norm() / want.norm()
        assert rel < tol, f"relative gradient error {rel:.2e} ≥ {tol}"
    if compute == torch.float32:
        torch.testing.assert_close(layer.lora_A["default"].grad.double(), a64.grad, rtol=1e-4, atol=1e-5)


# --- merge / unmerge --------------------------------------------------------------------------------------


def test_merge_unmerge_dense_base():
    model = tiny_llama()
    base_logits = model(ids()).logits
    apply_lora(model, LoraConfig(r=4, alpha=8))
    randomize_lora_b(model)
    originals = {name: layer.base_layer.weight.detach().clone() for name, layer in lora_layers(model)}
    unmerged = model(ids()).logits
    assert not torch.allclose(unmerged, base_logits, atol=1e-3)  # the adapter does something
    merge_lora(model)
    for name, layer in lora_layers(model):
        delta = layer.delta_weight("default")
        torch.testing.assert_close(layer.base_layer.weight, originals[name] + delta)
    torch.testing.assert_close(model(ids()).logits, unmerged, rtol=1e-5, atol=1e-5)
    unmerge_lora(model)
    for name, layer in lora_layers(model):
        assert torch.equal(layer.base_layer.weight, originals[name])  # bit-exact restore
    assert torch.equal(model(ids()).logits, unmerged)

    merged_away = remove_lora(copy.deepcopy(model), merge=True)
    assert not lora_layers(merged_away) and type(merged_away.model.layers[0].self_attn.q_proj) is nn.Linear
    torch.testing.assert_close(merged_away(ids()).logits, unmerged, rtol=1e-5, atol=1e-5)
    remove_lora(model)
    assert not lora_layers(model) and not model.lowbit_adapters
    assert torch.equal(model(ids()).logits, base_logits)


@pytest.mark.parametrize("compute", [torch.float32, torch.bfloat16])
def test_merge_quantized_base_dense_or_requantized(compute):
    model = tiny_llama()
    lowbit.quantize(model, lowbit.QuantConfig(format="nf4", compute_dtype=compute))
    apply_lora(model, LoraConfig(r=4, alpha=8))
    randomize_lora_b(model, std=0.5)
    unmerged = model(ids()).logits
    bases = {name: layer.base_layer for name, layer in lora_layers(model)}

    merge_lora(model, mode="dense")
    for _, layer in lora_layers(model):
        assert type(layer.base_layer) is nn.Linear and layer.base_layer.weight.dtype == compute
    tol = 1e-5 if compute == torch.float32 else 5e-2
    torch.testing.assert_close(model(ids()).logits, unmerged, rtol=tol, atol=tol)
    unmerge_lora(model)
    assert all(layer.base_layer is bases[name] for name, layer in lora_layers(model))
    assert torch.equal(model(ids()).logits, unmerged)

    merge_lora(model, mode="requantize")
    for name, layer in lora_layers(model):
        new = layer.base_layer
        assert isinstance(new, QuantLinear) and new.fmt == bases[name].fmt and new.compute_dtype == compute
        target = bases[name].dequantize(torch.float32) + layer.delta_weight("default")
        err = (new.dequantize(torch.float32) - target).norm()
        # Rounding the merged weight again costs about what NF4 costs anywhere (~10 % relative), and it
        # lands much nearer to W0 + ΔW than the unmerged W0 is.
        assert err < 0.2 * target.norm() and err < 0.5 * layer.delta_weight("default").norm()
    unmerge_lora(model)
    assert torch.equal(model(ids()).logits, unmerged)


def test_merge_refuses_a_tied_weight():
    model = tiny_llama(tie=True)
    apply_lora(model, LoraConfig(target_modules=("lm_head",)))
    with pytest.raises(ValueError, match="tied"):
        merge_lora(model)


def test_second_adapter_on_the_same_layers_becomes_active_and_only_trainable():
    model = tiny_llama()
    apply_lora(model, LoraConfig(r=2), "a")
    apply_lora(model, LoraConfig(r=3, target_modules=("q_proj",)), "b")
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, LoraLinear) and set(q.lora_A) == {"a", "b"} and q.active_adapters == ["b"]
    assert model.model.layers[0].self_attn.k_proj.active_adapters == []
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(".b") for n in trainable)
    with pytest.raises(ValueError, match="already on this model"):
        apply_lora(model, LoraConfig(), "a")


def test_modules_to_save_trains_a_copy_and_remove_chooses_which_stays():
    from tests.tiny_models import tiny_bert

    model = tiny_bert()
    x = ids()
    plain = model(x).logits
    original_head = model.classifier
    config = LoraConfig(r=2, target_modules="all-linear", modules_to_save=("classifier",))
    assert not any(n.startswith("classifier") for n in find_lora_targets(model, config))
    apply_lora(model, config)
    head_copy = model.classifier.modules_to_save["default"]
    with torch.no_grad():
        head_copy.weight.add_(1.0)
    trained = model(x).logits
    assert not torch.allclose(trained, plain)
    assert model.lowbit_adapters["default"].modules_to_save == ("classifier",)
    kept = remove_lora(copy.deepcopy(model), merge=True)
    assert torch.equal(kept(x).logits, trained) and not lora_layers(kept)
    remove_lora(model)
    assert model.classifier is original_head and torch.equal(model(x).logits, plain)
