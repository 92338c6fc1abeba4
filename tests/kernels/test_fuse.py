"""fuse_for_training on tiny random Llama / Qwen2 models: what it replaces, and that 10 QLoRA steps give the
same loss curve as the unfused model (CPU: the torch references of every fused op)."""

import copy
import importlib.util

import pytest
import torch

import lowbit
from lowbit.kernels import fuse_for_training
from lowbit.kernels.fuse import has_fused_loss, unfuse_loss
from tests.tiny_models import tiny_llama, tiny_qwen2


def _qlora_base(model):
    lowbit.quantize(model, lowbit.QuantConfig(format="nf4", block_size=64, double_quant=True))
    return model


def _qlora(model):
    return lowbit.peft.apply_lora(_qlora_base(model), lowbit.peft.LoraConfig(r=4, alpha=8, init_lora_weights=False))


def _train(model, steps=10, seed=0):
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(seed))
    labels = ids.clone()
    labels[:, :3] = -100  # a prompt that is not trained on
    losses = []
    for _ in range(steps):  # one batch, memorised: the loss must fall
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def test_fuse_replaces_norms_mlps_lora_and_loss():
    model = _qlora(tiny_llama())
    keys = model.state_dict().keys()
    counts = fuse_for_training(model)
    # 2 layers × (input + post-attention norm) + the final norm; 2 MLPs; 2 × 7 LoRA-wrapped QuantLinears
    assert counts == {"rms_norm": 5, "swiglu_mlp": 2, "geglu_mlp": 0, "qlora_linear": 14, "rope": 2, "loss": 1}
    assert model.state_dict().keys() == keys  # the same parameters under the same names
    qwen = _qlora(tiny_qwen2())
    assert fuse_for_training(qwen) == {"rms_norm": 5, "swiglu_mlp": 2, "geglu_mlp": 0, "qlora_linear": 14, "rope": 2,
                                       "loss": 1}  # fmt: skip
    assert fuse_for_training(qwen)["rope"] == 0  # already routed


def test_rope_runs_the_fused_op_without_patching_transformers(monkeypatch):
    """Training calls go through rope.apply_rope (same logits and gradients as transformers' RoPE); the
    modeling module keeps its own function; a call with a KV cache (generation) runs the class's forward."""
    from transformers.models.llama import modeling_llama

    from lowbit.kernels import rope

    original = modeling_llama.apply_rotary_pos_emb
    unfused = tiny_llama()
    fused = copy.deepcopy(unfused)
    fuse_for_training(fused, norms=False, mlp=False, lora=False, loss=False)
    assert modeling_llama.apply_rotary_pos_emb is original
    calls = []
    rotate = rope._rotate
    monkeypatch.setattr(rope, "_rotate", lambda *a: calls.append(a[-1]) or rotate(*a))
    ids = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(0))
    outs = []
    for model in (unfused, fused):
        logits = model(input_ids=ids, use_cache=False).logits
        logits.square().mean().backward()
        outs.append((logits, torch.cat([p.grad.flatten() for p in model.parameters()])))
    assert calls.count(False) == 2 and calls.count(True) == 2  # q and k in one pass, forward and backward, 2 layers
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outs[1][1], outs[0][1], rtol=1e-4, atol=1e-7)
    calls.clear()
    with torch.no_grad():
        generated = [m.generate(ids[:1, :4], max_new_tokens=5, do_sample=False) for m in (unfused, fused)]
    assert calls == [] and torch.equal(generated[0], generated[1])


def test_ten_qlora_steps_match_unfused():
    unfused = _qlora(tiny_llama())
    fused = copy.deepcopy(unfused)
    fuse_for_training(fused)
    want, got = _train(unfused), _train(fused)
    # Same float32 math, reassociated (chunked head matmul, one addmm for base + LoRA, the analytic norm
    # and SwiGLU backward): ~1e-7 relative in each gradient. Adam divides by √v, so on near-zero gradient
    # entries such differences become parameter differences of order lr (1e-2 here) · their relative size,
    # and they compound over steps: measured max |Δloss| 2.6e-5 (4.8e-6 relative) over the 10 steps, while
    # the loss falls by 0.27. The bound leaves 4× headroom; a real bug (a missing scale, a dropped term)
    # moves the loss by > 1e-2 within a step or two.
    assert max(abs(a - b) for a, b in zip(got, want)) < 1e-4
    assert got[-1] < got[0]


def test_without_labels_logits_are_unchanged():
    model = _qlora(tiny_llama())
    ids = torch.randint(0, 300, (1, 8))
    want = model(input_ids=ids).logits
    fuse_for_training(model)
    assert torch.allclose(model(input_ids=ids).logits, want, atol=1e-5)
    assert model(input_ids=ids, labels=ids).logits is None  # the training call builds no logits
    unfuse_loss(model)
    assert model(input_ids=ids, labels=ids).logits is not None


def test_trainer_fused_kernels_flag():
    from pathlib import Path

    from lowbit.train import DataConfig, TrainConfig, build_examples, read_records, train
    from tests.train.tiny_tokenizer import tiny_tokenizer

    tok = tiny_tokenizer()
    records = read_records(Path(__file__).resolve().parents[2] / "data" / "instruct" / "train.jsonl")[:40]
    examples, _ = build_examples(records, tok, DataConfig(max_length=160))
    cfg = dict(max_steps=3, batch_size=4, lr=1e-2, progress=False, plot=False)
    want = train(_qlora(tiny_llama()), examples, TrainConfig(**cfg), pad_token_id=tok.pad_token_id).losses
    model = _qlora(tiny_llama())
    head_calls = []
    model.lm_head.register_forward_hook(lambda *_: head_calls.append(1))
    got = train(model, examples, TrainConfig(fused_kernels=True, **cfg), pad_token_id=tok.pad_token_id).losses
    assert type(model.model.layers[0].mlp).__name__ == "SwiGLUMLP"
    assert head_calls == []  # the trainer's loss came from the chunked cross-entropy: no logits were built
    assert not has_fused_loss(model)  # and after training the model gives logits again
    assert model(input_ids=torch.tensor([[5, 6, 7]]), labels=torch.tensor([[5, 6, 7]])).logits is not None
    assert max(abs(a - b) for a, b in zip(got, want)) < 1e-4  # the tolerance of test_ten_qlora_steps_match_unfused
    bf16 = TrainConfig(fused_kernels=True, precision="bf16", **cfg)
    losses = train(_qlora(tiny_llama()), examples, bf16, pad_token_id=tok.pad_token_id).losses
    assert losses == [pytest.approx(x, rel=0.02) for x in want]  # bf16 autocast ≈ fp32


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_triton_backend_in_the_model():
    """The Triton kernels (interpreted on the CPU) inside the model: the same loss and LoRA gradients."""
    unfused = _qlora(tiny_llama())
    fused = copy.deepcopy(unfused)
    fuse_for_training(fused, backend="triton", loss_chunk_size=8)
    ids = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(0))
    losses, grads = [], []
    for model in (unfused, fused):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]))
    assert abs(losses[0] - losses[1]) < 1e-5  # float32 in both
    assert ((grads[1] - grads[0]).norm() / grads[0].norm()).item() < 1e-5


def test_lora_dropout_keeps_the_fused_path(monkeypatch):
    """LoRA dropout (the CLI's default 0.05) no longer sends the layers back to the unfused LoraLinear.forward."""
    from lowbit.peft.lora import LoraLinear

    model = lowbit.peft.apply_lora(_qlora_base(tiny_llama()), lowbit.peft.LoraConfig(r=4, alpha=8, dropout=0.1))
    fuse_for_training(model)

    def unfused(*_):
        raise AssertionError("a LoRA layer fell back to LoraLinear.forward")

    monkeypatch.setattr(LoraLinear, "forward", unfused)
    losses = _train(model, steps=3)
    assert all(torch.isfinite(torch.tensor(losses)))


def test_models_that_transform_their_logits_keep_their_own_loss():
    """Gemma 2 soft-caps its logits (tanh(z / 30)·30): the chunked loss over lm_head(h) would drop that, so
    fuse_for_training leaves its loss alone, and the loss is the model's own."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    model = Gemma2ForCausalLM(Gemma2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                           vocab_size=300, final_logit_softcapping=2.0)).eval()  # fmt: skip
    ids = torch.randint(0, 300, (1, 12))
    want = model(input_ids=ids, labels=ids).loss
    assert fuse_for_training(model)["loss"] == 0 and not has_fused_loss(model)
    torch.testing.assert_close(model(input_ids=ids, labels=ids).loss, want)


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_trainer_loss_with_prompt_methods_on_a_fused_model(method):
    """Prompt tuning lengthens the input (virtual tokens): the trainer keeps its logits loss for it. Prefix
    tuning does not: the chunked loss runs, with the prefix keys and values the hook passes in. Both equal the
    unfused model's summed loss."""
    from lowbit.peft import PrefixTuningConfig, PromptTuningConfig, apply_prefix_tuning, apply_prompt_tuning
    from lowbit.train.trainer import batch_loss

    ids = torch.randint(3, 300, (2, 10), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    losses = []
    for fused in (False, True):
        model = tiny_llama()
        torch.manual_seed(2)
        if method == "prompt":
            apply_prompt_tuning(model, PromptTuningConfig(num_virtual_tokens=4))
        else:
            apply_prefix_tuning(model, PrefixTuningConfig(num_virtual_tokens=4))
        if fused:
            assert fuse_for_training(model)["loss"] == 1
        calls = []
        model.lm_head.register_forward_hook(lambda *_: calls.append(1))  # the logits path calls the head
        losses.append(batch_loss(model, batch))
        if fused:
            assert bool(calls) == (method == "prompt")
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)


def test_full_fine_tuning_gradients_match_unfused():
    """Every parameter trains (norm weights, projections, the head through the chunked loss): the fused model's
    loss and gradients equal the unfused model's."""
    unfused = tiny_llama(tie=False).train()
    fused = copy.deepcopy(unfused)
    counts = fuse_for_training(fused, loss_chunk_size=5)
    assert counts["rms_norm"] == 5 and counts["swiglu_mlp"] == 2 and counts["loss"] == 1
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(3))
    for model in (unfused, fused):
        model(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in unfused.named_parameters()}
    for name, p in fused.named_parameters():
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_lora_dropout_masks_survive_recomputation():
    """Checkpointed blocks run their forward again in backward; torch's checkpoint restores the CPU generator,
    so the fused layers draw the same dropout seeds and the gradients equal those of a run without it."""
    from lowbit.train.trainer import enable_gradient_checkpointing

    grads = []
    for checkpointing in (False, True):
        model = lowbit.peft.apply_lora(_qlora_base(tiny_llama()),
                                       lowbit.peft.LoraConfig(r=4, alpha=8, dropout=0.2, init_lora_weights=False))  # fmt: skip
        fuse_for_training(model)
        if checkpointing:
            enable_gradient_checkpointing(model)
        model.train()
        ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
        torch.manual_seed(5)
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)



def test_trainer_says_what_it_fused(capsys):
    """The trainer prints what fuse_for_training replaced, and warns when fused_kernels=True found nothing."""
    from pathlib import Path

    from transformers import GPT2Config, GPT2LMHeadModel

    from lowbit.train import DataConfig, TrainConfig, build_examples, read_records, train
    from tests.train.tiny_tokenizer import tiny_tokenizer

    tok = tiny_tokenizer()
    records = read_records(Path(__file__).resolve().parents[2] / "data" / "instruct" / "train.jsonl")[:8]
    examples, _ = build_examples(records, tok, DataConfig(max_length=160))
    cfg = TrainConfig(max_steps=1, batch_size=2, fused_kernels=True, plot=False)
    train(_qlora(tiny_llama()), examples, cfg, pad_token_id=tok.pad_token_id)
    assert "fused kernels: 5 rms_norm, 2 swiglu_mlp, 14 qlora_linear, 2 rope, 1 loss" in capsys.readouterr().out
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=300, n_positions=256))
    with pytest.warns(UserWarning, match="no module the fused kernels replace"):
        train(gpt2, examples, cfg, pad_token_id=tok.pad_token_id)


def test_gemma_mlps_run_the_fused_geglu():
    """Gemma's MLP (gelu_pytorch_tanh, GeGLU) is fused; its own norms ((1 + w) scaling), attention and head stay.
    Ten QLoRA steps follow the unfused model's losses."""
    from transformers import GemmaConfig, GemmaForCausalLM

    torch.manual_seed(0)
    config = GemmaConfig(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         hidden_activation="gelu_pytorch_tanh")  # fmt: skip
    unfused = _qlora(GemmaForCausalLM(config))
    fused = copy.deepcopy(unfused)
    counts = fuse_for_training(fused)
    assert counts == {"rms_norm": 0, "swiglu_mlp": 0, "geglu_mlp": 2, "qlora_linear": 14, "rope": 0, "loss": 0}
    assert fused.state_dict().keys() == unfused.state_dict().keys()
    want, got = _train(unfused), _train(fused)
    assert max(abs(a - b) for a, b in zip(got, want)) < 1e-4 and got[-1] < got[0]
