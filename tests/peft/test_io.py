"""Adapter files in HF peft's layout: lowbit ↔ lowbit round trips, lowbit ↔ real peft parity (tiny Llama and
SmolLM2-135M), and loads that must fail cleanly without touching the model."""

import copy
import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import lowbit
from lowbit.peft import LoraConfig, apply_lora, load_adapter, lora_layers, save_adapter
from tests.peft.test_lora import ids, randomize_lora_b
from tests.tiny_models import tiny_bert, tiny_llama, tiny_qwen2

peft = pytest.importorskip("peft")


def peft_randomize_lora_b(peft_model, std=0.05, seed=7):
    g = torch.Generator().manual_seed(seed)
    for name, p in peft_model.named_parameters():
        if ".lora_B." in name:
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * std)


def fingerprint(model):
    """Everything a failed load must leave as it was: module tree, tensors, flags, adapter records."""
    return ([(n, type(m).__name__) for n, m in model.named_modules()],
            {n: t.detach().clone() for n, t in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()},
            dict(getattr(model, "lowbit_adapters", {})))  # fmt: skip


def assert_unchanged(model, before):
    after = fingerprint(model)
    assert after[0] == before[0] and after[2] == before[2] and after[3] == before[3]
    assert after[1].keys() == before[1].keys() and all(torch.equal(after[1][k], before[1][k]) for k in before[1])


@pytest.fixture
def lora_dir(tmp_path):
    model = tiny_llama()
    apply_lora(model, LoraConfig(r=4, alpha=8, rank_pattern={"q_proj": 2}, alpha_pattern={r"layers\.1\..*": 3.0},
                                 use_rslora=True))  # fmt: skip
    randomize_lora_b(model)
    save_adapter(model, tmp_path / "adapter")
    return tmp_path / "adapter", model


def test_files_use_peft_names_and_fields(lora_dir):
    path, model = lora_dir
    state = load_file(str(path / "adapter_model.safetensors"))
    expected = {f"base_model.model.{name}.lora_{w}.weight" for name, _ in lora_layers(model) for w in "AB"}
    assert set(state) == expected and len(expected) == 28
    assert state["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (2, 64)
    config = json.loads((path / "adapter_config.json").read_text())
    known = {f.name for f in dataclasses.fields(peft.LoraConfig)}
    assert set(config) <= known, f"fields peft does not know: {set(config) - known}"
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (4, 8, True)
    assert config["rank_pattern"] == {"q_proj": 2} and len(config["target_modules"]) == 14


def test_save_load_reproduces_logits_exactly(lora_dir):
    path, model = lora_dir
    loaded = load_adapter(tiny_llama(), path)
    assert torch.equal(loaded(ids()).logits, model(ids()).logits)
    assert not any(p.requires_grad for p in loaded.parameters())
    trainable = load_adapter(tiny_llama(), path, trainable=True)
    assert {n for n, p in trainable.named_parameters() if p.requires_grad} == {
        n for n, _ in trainable.named_parameters() if ".lora_" in n}  # fmt: skip


def test_loaded_adapter_follows_the_model_mode(tmp_path):
    """New modules are born in training mode: a LoRA loaded into an eval model must not keep its dropout on."""
    model = tiny_llama()
    apply_lora(model, LoraConfig(r=4, alpha=8, dropout=0.5))
    randomize_lora_b(model)
    save_adapter(model, tmp_path / "adapter")
    loaded = load_adapter(tiny_llama().eval(), tmp_path / "adapter")
    assert not any(m.training for m in loaded.modules())
    assert torch.equal(loaded(ids()).logits, loaded(ids()).logits)  # dropout 0.5 would make these differ
    assert all(m.training for m in load_adapter(tiny_llama().train(), tmp_path / "adapter").modules())


def test_qlora_adapter_round_trip(tmp_path):
    def quantized():
        model = tiny_llama()
        lowbit.quantize(model, lowbit.QuantConfig(format="nf4", double_quant=True))
        return model

    model = apply_lora(quantized(), LoraConfig(r=4, alpha=16, lora_dtype="bfloat16"))
    randomize_lora_b(model)
    save_adapter(model, tmp_path)
    assert load_file(str(tmp_path / "adapter_model.safetensors"))[
        "base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"].dtype == torch.bfloat16  # fmt: skip
    loaded = load_adapter(quantized(), tmp_path)
    torch.testing.assert_close(loaded(ids()).logits, model(ids()).logits, rtol=0, atol=0)


def test_peft_loads_what_lowbit_saved(lora_dir):
    path, model = lora_dir
    peft_model = peft.PeftModel.from_pretrained(tiny_llama(), path).eval()
    torch.testing.assert_close(peft_model(ids()).logits, model(ids()).logits, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("targets", [["q_proj", "v_proj", "down_proj"], r".*\.(k|o)_proj", "all-linear"])
def test_lowbit_loads_what_peft_saved(tmp_path, targets):
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=targets, use_rslora=True, task_type="CAUSAL_LM",
                             rank_pattern={r"layers\.0\..*": 3}, alpha_pattern={r"layers\.1\..*": 5})  # fmt: skip
    peft_model = peft.get_peft_model(tiny_llama(), config)
    peft_randomize_lora_b(peft_model)
    peft_model.save_pretrained(tmp_path)
    model = load_adapter(tiny_llama(), tmp_path)
    assert lora_layers(model)
    torch.testing.assert_close(model(ids()).logits, peft_model(ids()).logits, rtol=1e-6, atol=1e-6)


def randomize_head_copy(model, seed=5):
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "modules_to_save" in name:
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def test_classifier_with_modules_to_save_both_ways(tmp_path):
    # lowbit → peft: LoRA on query/value plus a trained copy of the classification head.
    model = apply_lora(tiny_bert(), LoraConfig(r=4, alpha=8, target_modules=("query", "value"),
                                               modules_to_save=("classifier",)))  # fmt: skip
    randomize_lora_b(model)
    randomize_head_copy(model)
    assert model.classifier.original_module.weight.requires_grad is False
    assert {n for n, p in model.named_parameters() if p.requires_grad} >= {"classifier.modules_to_save.default.weight"}
    save_adapter(model, tmp_path / "ours")
    assert "base_model.model.classifier.weight" in load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    peft_model = peft.PeftModel.from_pretrained(tiny_bert(), tmp_path / "ours").eval()
    torch.testing.assert_close(peft_model(ids()).logits, model(ids()).logits, rtol=1e-6, atol=1e-6)
    assert torch.equal(load_adapter(tiny_bert(), tmp_path / "ours")(ids()).logits, model(ids()).logits)

    # peft → lowbit: peft adds modules_to_save ["classifier", "score"] by itself for SEQ_CLS.
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS")
    peft_model = peft.get_peft_model(tiny_bert(), config)
    peft_randomize_lora_b(peft_model)
    randomize_head_copy(peft_model)
    peft_model.save_pretrained(tmp_path / "theirs")
    loaded = load_adapter(tiny_bert(), tmp_path / "theirs")
    torch.testing.assert_close(loaded(ids()).logits, peft_model.eval()(ids()).logits, rtol=1e-6, atol=1e-6)


# --- loads that must fail, leaving the model as it was -----------------------------------------------------


def test_shape_mismatch_names_the_first_tensor_and_changes_nothing(lora_dir):
    path, _ = lora_dir
    model = tiny_qwen2()  # same module names; intermediate size 128 instead of 160
    before = fingerprint(model)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.gate_proj\.lora_B\.weight.*\(160, 4\).*\(128, 4\)"):
        load_adapter(model, path)
    assert_unchanged(model, before)


def test_target_mismatch_changes_nothing(lora_dir, tmp_path):
    path, _ = lora_dir
    config = json.loads((path / "adapter_config.json").read_text())
    config["target_modules"] = ["attention.query"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    (tmp_path / "adapter_model.safetensors").write_bytes((path / "adapter_model.safetensors").read_bytes())
    model = tiny_llama()
    before = fingerprint(model)
    with pytest.raises(ValueError, match="attention.query"):
        load_adapter(model, tmp_path)
    assert_unchanged(model, before)


def test_missing_and_extra_tensors_are_named(lora_dir, tmp_path):
    path, _ = lora_dir
    state = load_file(str(path / "adapter_model.safetensors"))
    config = (path / "adapter_config.json").read_text()
    for name, edit in (("missing", lambda s: s.pop("base_model.model.model.layers.1.mlp.up_proj.lora_A.weight")),
                       ("extra", lambda s: s.update({"base_model.model.lm_head.lora_A.weight": torch.zeros(4, 64)}))):
        edited = dict(state)
        edit(edited)
        (tmp_path / name).mkdir()
        save_file(edited, str(tmp_path / name / "adapter_model.safetensors"))
        (tmp_path / name / "adapter_config.json").write_text(config)
    model = tiny_llama()
    model.lowbit_adapters = {}  # an existing (empty) record must survive a failed load as it was
    before = fingerprint(model)
    with pytest.raises(ValueError, match=r"no tensor 'base_model\.model\.model\.layers\.1\.mlp\.up_proj\.lora_A"):
        load_adapter(model, tmp_path / "missing")
    assert_unchanged(model, before)
    with pytest.raises(ValueError, match=r"base_model\.model\.lm_head\.lora_A\.weight.*matches no LoRA layer"):
        load_adapter(model, tmp_path / "extra")
    assert_unchanged(model, before)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_safetensors_is_a_clear_error(lora_dir, damage):
    path, _ = lora_dir
    file = path / "adapter_model.safetensors"
    data = file.read_bytes()
    file.write_bytes(b"\x00not a safetensors file" * 10 if damage == "garbage" else data[: len(data) // 2])
    model = tiny_llama()
    before = fingerprint(model)
    with pytest.raises(ValueError, match="cannot read adapter weights from .*adapter_model.safetensors"):
        load_adapter(model, path)
    assert_unchanged(model, before)


def test_bad_configs_are_clear_errors(lora_dir):
    path, model = lora_dir
    file = path / "adapter_config.json"
    config = json.loads(file.read_text())
    file.write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ValueError, match="use_dora"):
        load_adapter(tiny_llama(), path)
    file.write_text(json.dumps({**config, "peft_type": "NOT_A_METHOD"}))
    with pytest.raises(ValueError, match="unsupported peft_type 'NOT_A_METHOD'"):
        load_adapter(tiny_llama(), path)
    file.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_adapter(tiny_llama(), path)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(tiny_llama(), path / "nowhere")
    with pytest.raises(ValueError, match="carries no adapter"):
        save_adapter(tiny_llama(), path / "x")
    apply_lora(model, LoraConfig(target_modules=("q_proj",)), "second")
    with pytest.raises(ValueError, match="pass adapter_name"):
        save_adapter(model, path / "x")


# --- the real model: SmolLM2-135M ------------------------------------------------------------------------


def smollm2_inputs(tokenizer):
    return tokenizer(["The capital of France is", "Low-rank adapters train"], return_tensors="pt", padding=True)


def test_smollm2_peft_loads_lowbit_adapter(smollm2, tmp_path):
    base, tokenizer = smollm2
    model = apply_lora(copy.deepcopy(base), LoraConfig(r=8, alpha=16, target_modules="all-linear"))
    # 30 layers × 8·[(576+576)·2 (q, o) + (576+192)·2 (k, v) + (576+1536)·3 (gate, up, down)]
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 2_442_240
    randomize_lora_b(model, std=0.02)
    save_adapter(model, tmp_path)
    batch = smollm2_inputs(tokenizer)
    with torch.no_grad():
        ours = model(**batch).logits
        peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
        theirs = peft_model(**batch).logits
        plain = base(**batch).logits
    assert (ours - plain).abs().max() > 1e-2  # random B: the adapter really changes the logits
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)


def test_smollm2_lowbit_loads_peft_adapter(smollm2, tmp_path):
    base, tokenizer = smollm2
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")
    peft_model = peft.get_peft_model(copy.deepcopy(base), config)
    peft_randomize_lora_b(peft_model, std=0.02)
    peft_model.save_pretrained(tmp_path)
    batch = smollm2_inputs(tokenizer)
    with torch.no_grad():
        theirs = peft_model.eval()(**batch).logits
        del peft_model
        ours = load_adapter(copy.deepcopy(base), tmp_path)(**batch).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
