"""The contract every PEFT method keeps, checked the same way for each (one row of the matrix per method).

For each method on a tiny Llama: only the method's own parameters require grad; one optimizer step lowers
the loss; the base weights are bit-identical afterwards; the method's state dict loaded into a fresh model
(through its config's PEFT-dict round trip) reproduces the logits exactly; and a state dict that does not
fit raises a ValueError naming the first key that does not fit, leaving the model unchanged.
"""

import re
import warnings

import peft
import pytest
import torch

from lowbit.peft import get_peft_method, load_adapter, save_adapter
from lowbit.peft.adapter import BottleneckConfig, apply_bottleneck
from lowbit.peft.ia3 import IA3Config, apply_ia3
from lowbit.peft.lora import LoraConfig, apply_lora
from lowbit.peft.p_tuning import PTuningConfig, apply_p_tuning
from lowbit.peft.partial import PartialConfig, apply_partial
from lowbit.peft.prefix_tuning import PrefixTuningConfig, apply_prefix_tuning
from lowbit.peft.prompt_tuning import PromptTuningConfig, apply_prompt_tuning
from tests.tiny_models import tiny_llama

# name → (peft_type, apply function, config)
CASES = {
    "lora": ("LORA", apply_lora, LoraConfig(r=4, alpha=8)),
    "bottleneck": ("BOTTLENECK", apply_bottleneck, BottleneckConfig(bottleneck_size=8)),
    "ia3": ("IA3", apply_ia3, IA3Config()),
    "prompt_tuning": ("PROMPT_TUNING", apply_prompt_tuning, PromptTuningConfig(num_virtual_tokens=4)),
    "p_tuning_mlp": ("P_TUNING", apply_p_tuning, PTuningConfig(num_virtual_tokens=4, encoder_hidden_size=16)),
    "p_tuning_lstm": ("P_TUNING", apply_p_tuning, PTuningConfig(num_virtual_tokens=4, encoder="lstm",
                                                                encoder_hidden_size=8, encoder_num_layers=1)),
    "prefix_mlp": ("PREFIX_TUNING", apply_prefix_tuning, PrefixTuningConfig(num_virtual_tokens=4,
                                                                            encoder_hidden_size=16)),
    "prefix_direct": ("PREFIX_TUNING", apply_prefix_tuning, PrefixTuningConfig(num_virtual_tokens=4,
                                                                               prefix_projection=False)),
    "partial": ("PARTIAL", apply_partial, PartialConfig(modules_to_save=("model.layers.1", "lm_head"))),
}  # fmt: skip


def batch(seed=0):
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # a left-padded row
    return ids, mask


def loss_of(model, ids, mask):
    return model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss


@pytest.fixture(scope="module", params=list(CASES))
def trained(request):
    """(case name, model before apply's parameters, trained model, losses) — one optimizer step."""
    peft_type, apply, config = CASES[request.param]
    model = tiny_llama(seed=1)
    base = {name: p for name, p in model.named_parameters()}
    snapshot = {name: p.detach().clone() for name, p in base.items()}
    torch.manual_seed(0)
    apply(model, config)
    model.train()
    ids, mask = batch()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=1e-3)
    before = loss_of(model, ids, mask)
    before.backward()
    optimizer.step()
    with torch.no_grad():
        after = loss_of(model, ids, mask)
    model.eval()
    return request.param, base, snapshot, model, (before.item(), after.item())


def test_only_the_methods_parameters_train(trained):
    name, base, _, model, _ = trained
    base_ids = {id(p) for p in base.values()}
    new = {n: p for n, p in model.named_parameters() if id(p) not in base_ids}
    assert new, f"{name} added no parameters"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(new), (
        f"{name}: trainable old {sorted(trainable - set(new))}, frozen new {sorted(set(new) - trainable)}"
    )


def test_one_step_lowers_the_loss(trained):
    name, _, _, _, (before, after) = trained
    assert after < before, f"{name}: loss {before} → {after}"


def test_base_weights_bit_identical(trained):
    name, base, snapshot, _, _ = trained
    changed = [n for n, p in base.items() if not torch.equal(p, snapshot[n])]
    assert not changed, f"{name} changed base weights {changed[:3]}"


def _fresh(case: str, model_with_adapter):
    """A new model with the method applied from the recorded config, after its PEFT-dict round trip."""
    peft_type = CASES[case][0]
    method = get_peft_method(peft_type)
    config = method.from_peft_dict(method.to_peft_dict(model_with_adapter.lowbit_adapters["default"]))
    fresh = tiny_llama(seed=1)
    torch.manual_seed(123)  # a different random init than the trained model's
    method.apply(fresh, config, "default")
    return method, fresh.eval()


def test_state_dict_round_trip_reproduces_logits(trained):
    name, _, _, model, _ = trained
    method, fresh = _fresh(name, model)
    state = method.state_dict(model, "default")
    ids, mask = batch(seed=1)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        assert not torch.equal(fresh(input_ids=ids, attention_mask=mask).logits, expected)  # the load does matter
        method.load_state_dict(fresh, state, "default")
        assert torch.equal(fresh(input_ids=ids, attention_mask=mask).logits, expected)


def _bad_shape(t):
    return torch.zeros(t.shape[0] + 1, *t.shape[1:], dtype=t.dtype)


@pytest.mark.parametrize("fault", ["shape_last", "shape_first_of_two", "missing", "unexpected"])
def test_mismatched_state_dict_raises_and_changes_nothing(trained, fault):
    name, _, _, model, _ = trained
    method, fresh = _fresh(name, model)
    state = dict(method.state_dict(model, "default"))
    keys = list(state)
    if fault == "shape_last":
        state[keys[-1]], named = _bad_shape(state[keys[-1]]), keys[-1]
    elif fault == "shape_first_of_two":
        for key in (keys[0], keys[-1]):
            state[key] = _bad_shape(state[key])
        named = keys[0]
    elif fault == "missing":
        named = keys[-1]
        del state[named]
    else:
        named = "base_model.model.model.layers.0.not_a_module.weight"
        state[named] = torch.zeros(3)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(ValueError, match=re.escape(named)):
        method.load_state_dict(fresh, state, "default")
    after = fresh.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before), f"{name}: a failed load changed the model"


# --- through files: lowbit.peft.save_adapter / load_adapter, and HF peft on the same directories ------------


def test_save_adapter_load_adapter_round_trip(trained, tmp_path):
    name, _, _, model, _ = trained
    save_adapter(model, tmp_path)
    fresh = load_adapter(tiny_llama(seed=1), tmp_path).eval()
    assert fresh.lowbit_adapters["default"] == model.lowbit_adapters["default"]  # the config survives the file
    ids, mask = batch(seed=1)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        assert torch.equal(fresh(input_ids=ids, attention_mask=mask).logits, expected)


PEFT_TYPES = ("LORA", "IA3", "PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING")


def test_peft_loads_lowbits_file_and_reproduces_logits(trained, tmp_path):
    name, _, _, model, _ = trained
    if CASES[name][0] not in PEFT_TYPES:
        pytest.skip(f"{CASES[name][0]} is lowbit's own peft_type; HF peft has no equivalent")
    save_adapter(model, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = peft.PeftModel.from_pretrained(tiny_llama(seed=1), str(tmp_path)).eval()
    ids, mask = batch(seed=1)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(reference(input_ids=ids, attention_mask=mask).logits, expected, atol=1e-6, rtol=1e-6)


def _peft_trained(peft_type):
    """A peft model of `peft_type` on the tiny Llama with non-trivial weights, in training mode."""
    config = {
        "IA3": lambda: peft.IA3Config(task_type="CAUSAL_LM"),
        "PROMPT_TUNING": lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
        "P_TUNING": lambda: peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4,
                                                     encoder_hidden_size=16),
        "PREFIX_TUNING": lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4,
                                                         prefix_projection=True, encoder_hidden_size=16),
    }[peft_type]()  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(tiny_llama(seed=1), config)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


@pytest.mark.parametrize("peft_type", ["IA3", "PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING"])
def test_lowbit_loads_a_peft_saved_adapter(peft_type, tmp_path):
    reference = _peft_trained(peft_type)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference.save_pretrained(str(tmp_path))
    model = load_adapter(tiny_llama(seed=1), tmp_path).eval()
    ids, mask = batch(seed=2)
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask).logits
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, expected)
