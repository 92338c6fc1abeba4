"""Pruning against plain numpy references and against "zero the same structures in the original" models."""

import copy

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from lowbit.prune import (
    iterative_prune,
    keep_pruned,
    magnitude_prune,
    parameter_count,
    prune_attention_heads,
    prune_mlp_channels,
    semi_structured_prune,
    sparsity_schedule,
)
from tests.generate.conftest import smol_tokenizer  # noqa: F401 (fixture)
from tests.tiny_models import tiny_llama, tiny_qwen2

X = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(0))


def logits(model):
    with torch.no_grad():
        return model(X).logits


def linear_weights(model):
    return {n: m.weight.detach().numpy().copy() for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n != "lm_head"}  # fmt: skip


def test_per_layer_magnitude_pruning():
    model = tiny_llama(tie=False)
    before = linear_weights(model)
    masks, report = magnitude_prune(model, 0.3, scope="layer")
    for name, w0 in before.items():
        w = model.get_submodule(name).weight.detach().numpy()
        pruned = w == 0
        assert pruned.sum() == int(0.3 * w.size)
        assert np.abs(w0[pruned]).max() <= np.abs(w0[~pruned]).min()  # the smallest went
        np.testing.assert_array_equal(w[~pruned], w0[~pruned])
        assert np.array_equal(masks[name].numpy(), ~pruned)
    assert model.lm_head.weight.ne(0).all()  # excluded by default
    assert report.sparsity == pytest.approx(0.3, abs=1e-3) and "**all**" in report.to_markdown()


def test_global_magnitude_pruning_uses_one_threshold():
    model = tiny_qwen2()
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(4)  # a layer of larger weights should lose fewer
    before = linear_weights(model)
    magnitude_prune(model, 0.5, scope="global")
    everything = np.concatenate([w.ravel() for w in before.values()])
    after = np.concatenate([model.get_submodule(n).weight.detach().numpy().ravel() for n in before])
    pruned = after == 0
    assert pruned.sum() == int(0.5 * everything.size)
    assert np.abs(everything[pruned]).max() <= np.abs(everything[~pruned]).min()
    per_layer = {n: float((model.get_submodule(n).weight == 0).float().mean()) for n in before}
    assert per_layer.pop("model.layers.0.mlp.up_proj") < 0.2 < 0.5 < min(per_layer.values())
    with pytest.raises(ValueError, match="sparsity"):
        magnitude_prune(model, 1.0)
    with pytest.raises(ValueError, match="scope"):
        magnitude_prune(model, 0.1, scope="row")


def test_two_four_semi_structured():
    model = tiny_llama()
    before = linear_weights(model)
    want = logits(model)
    _, report = semi_structured_prune(model)
    for name, w0 in before.items():
        w = model.get_submodule(name).weight.detach().numpy()
        for row0, row in zip(w0, w):
            for g in range(0, len(row), 4):
                top2 = set(np.argsort(-np.abs(row0[g : g + 4]))[:2])
                assert {i for i in range(4) if row[g + i] != 0} == top2
    assert report.sparsity == 0.5
    assert not torch.allclose(logits(model), want)
    with pytest.raises(ValueError, match="multiple of m"):
        semi_structured_prune(tiny_llama(), n=2, m=3)


def kept_heads(old_q: torch.Tensor, new_q: torch.Tensor, head_dim: int) -> list[int]:
    """Which original heads survived: match the new q_proj's row blocks against the old ones."""
    old = old_q.view(-1, head_dim, old_q.shape[1])
    new = new_q.view(-1, head_dim, new_q.shape[1])
    return [next(h for h in range(old.shape[0]) if torch.equal(old[h], block)) for block in new]


def zero_heads(model, layer: int, heads: list[int], head_dim: int):
    """Reference: silence heads in the unpruned model by zeroing their o_proj input columns."""
    attn = model.model.layers[layer].self_attn
    with torch.no_grad():
        for h in heads:
            attn.o_proj.weight[:, h * head_dim : (h + 1) * head_dim] = 0


@pytest.mark.parametrize("kv_heads", [2, 4])  # grouped-query (groups of 2) and multi-head attention
def test_attention_heads_are_removed_and_the_model_still_runs(tmp_path, kv_heads):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=kv_heads, vocab_size=300,
                                         tie_word_embeddings=False)).eval()  # fmt: skip
    original, n_params = copy.deepcopy(model), parameter_count(model)
    prune_attention_heads(model, n_remove=2)
    assert model.config.num_attention_heads == 2 and model.config.head_dim == 16
    assert model.config.num_key_value_heads == 2  # GQA keeps its 2 KV heads; MHA loses 2 of its 4 with their heads
    reference = copy.deepcopy(original)
    for i, block in enumerate(model.model.layers):
        old = original.model.layers[i].self_attn
        keep = kept_heads(old.q_proj.weight, block.self_attn.q_proj.weight, 16)
        q, o = old.q_proj.weight.detach().double(), old.o_proj.weight.detach().double()
        norms = [float(q[h * 16 : (h + 1) * 16].norm() * o[:, h * 16 : (h + 1) * 16].norm()) for h in range(4)]
        if kv_heads == 2:  # one head from each group {0, 1}, {2, 3}: the stronger one
            assert keep == [max((0, 1), key=norms.__getitem__), max((2, 3), key=norms.__getitem__)]
        else:
            assert keep == sorted(sorted(range(4), key=lambda h: -norms[h])[:2])
        zero_heads(reference, i, [h for h in range(4) if h not in keep], 16)
    torch.testing.assert_close(logits(model), logits(reference), atol=1e-5, rtol=1e-5)
    assert parameter_count(model) < n_params
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True)
    torch.testing.assert_close(logits(loaded), logits(model), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("make", [tiny_llama, tiny_qwen2])
def test_mlp_channels_are_removed_exactly(tmp_path, make):
    model = make()
    original = copy.deepcopy(model)
    prune_mlp_channels(model, n_remove=40)
    reference = copy.deepcopy(original)
    for i, block in enumerate(model.model.layers):
        old = original.model.layers[i].mlp
        assert block.mlp.up_proj.weight.shape[0] == old.up_proj.weight.shape[0] - 40
        gate, up, down = (p.weight.detach().double() for p in (old.gate_proj, old.up_proj, old.down_proj))
        score = gate.norm(dim=1) * up.norm(dim=1) * down.norm(dim=0)
        removed = score.argsort()[:40]
        with torch.no_grad():
            reference.model.layers[i].mlp.down_proj.weight[:, removed] = 0
    torch.testing.assert_close(logits(model), logits(reference), atol=1e-5, rtol=1e-5)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True)
    assert loaded.config.intermediate_size == original.config.intermediate_size - 40
    torch.testing.assert_close(logits(loaded), logits(model), atol=1e-6, rtol=1e-6)


def test_structured_pruning_refuses_bad_requests():
    with pytest.raises(ValueError, match="multiple of 2"):
        prune_attention_heads(tiny_llama(), n_remove=1)  # 2 KV groups: remove the same number from each
    with pytest.raises(ValueError, match="n_remove"):
        prune_mlp_channels(tiny_llama(), n_remove=160)
    from tests.tiny_models import tiny_bert

    with pytest.raises(ValueError, match="Llama-style"):
        prune_mlp_channels(tiny_bert(), n_remove=4)


def test_cubic_schedule():
    s = sparsity_schedule(0.8, 4)
    assert s == pytest.approx([0.8 - 0.8 * (1 - t / 4) ** 3 for t in range(1, 5)]) and s[-1] == pytest.approx(0.8)
    assert sparsity_schedule(0.6, 3, kind="linear") == pytest.approx([0.2, 0.4, 0.6])


def test_iterative_prune_with_finetuning_keeps_pruned_weights_at_zero():
    model = tiny_llama(tie=False)
    batch = torch.randint(0, 300, (4, 16), generator=torch.Generator().manual_seed(1))
    loss = lambda m: float(m(batch, labels=batch).loss.detach())  # noqa: E731
    calls = []

    def finetune(m, step, masks):
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.1)
        for _ in range(2):
            m(batch, labels=batch).loss.backward()
            opt.step()
            opt.zero_grad()
        calls.append(step)

    masks, history = iterative_prune(model, 0.6, steps=3, finetune=finetune, evaluate=loss)
    assert calls == [1, 2, 3] and [h.step for h in history] == [0, 1, 2, 3]
    assert [round(h.sparsity, 2) for h in history[1:]] == [round(t, 2) for t in sparsity_schedule(0.6, 3)]
    for name, mask in masks.items():
        assert model.get_submodule(name).weight[~mask].eq(0).all()


def test_rewinding_resets_survivors_and_keep_pruned_masks_gradients():
    model = tiny_llama(tie=False)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)  # "training" moved the weights
    masks, _ = iterative_prune(model, 0.5, steps=2, rewind=True, rewind_state=start)
    w = model.model.layers[0].mlp.up_proj.weight
    mask = masks["model.layers.0.mlp.up_proj"]
    assert torch.equal(w[mask], start["model.layers.0.mlp.up_proj.weight"][mask]) and w[~mask].eq(0).all()
    masks, _ = magnitude_prune(model, 0.7)
    with keep_pruned(model, masks):
        model(X, labels=X).loss.backward()
        assert model.model.layers[0].mlp.up_proj.weight.grad[~masks["model.layers.0.mlp.up_proj"]].eq(0).all()


def test_activation_importance_against_a_recomputation(smol_tokenizer):
    """Channel scores: E|silu(gate x)·up x| · ‖W_down[:, j]‖, recomputed in float64 from the MLP's inputs;
    head scores: E‖o_h‖ · ‖W_o[:, h]‖ from o_proj's inputs captured by forward hooks."""
    from lowbit.prune import activation_importance
    from tests.generate.conftest import tiny_llama_for

    model = tiny_llama_for(smol_tokenizer, seed=4)
    text = "The quick brown fox jumps over the lazy dog. " * 40
    heads, channels = activation_importance(model, smol_tokenizer, text, seq_len=64, max_sequences=2)
    mlp_in, o_in = {}, {}
    hooks = [b.mlp.register_forward_hook(lambda m, a, out, i=i: mlp_in.setdefault(i, []).append(a[0]))
             for i, b in enumerate(model.model.layers)]  # fmt: skip
    hooks += [b.self_attn.o_proj.register_forward_hook(lambda m, a, out, i=i: o_in.setdefault(i, []).append(a[0]))
              for i, b in enumerate(model.model.layers)]  # fmt: skip
    ids = smol_tokenizer(text, return_tensors="pt").input_ids[0, :128].view(2, 64)
    with torch.no_grad():
        for row in ids:
            model(row[None])
    for h in hooks:
        h.remove()
    for i, block in enumerate(model.model.layers):
        x = torch.cat(mlp_in[i]).double()  # (2, 64, hidden)
        mlp = block.mlp
        gate, up, down = (p.weight.detach().double() for p in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
        a = torch.nn.functional.silu(x @ gate.T) * (x @ up.T)
        want = a.abs().mean(dim=(0, 1)) * down.norm(dim=0)
        torch.testing.assert_close(channels[i].double(), want, rtol=1e-4, atol=1e-9)
        o = torch.cat(o_in[i]).double().view(2, 64, 4, 8)  # 4 heads of 8 dims
        w_o = block.self_attn.o_proj.weight.detach().double().view(-1, 4, 8)
        torch.testing.assert_close(heads[i].double(), o.norm(dim=-1).mean(dim=(0, 1)) * w_o.norm(dim=(0, 2)),
                                   rtol=1e-4, atol=1e-9)  # fmt: skip
    with pytest.raises(ValueError, match="seq_len"):
        activation_importance(model, smol_tokenizer, "short", seq_len=64)
