"""Memory estimator against hand arithmetic, the real quantized storage, real optimizer state and the
tensors autograd really saves."""

import pytest
import torch

import lowbit
from lowbit.evaluate.memory import MemoryConfig, estimate_memory, nf4_bytes, rule_of_thumb
from lowbit.optim import optimizer_state_nbytes
from lowbit.train.trainer import TrainConfig, build_optimizer
from tests.tiny_models import tiny_llama
from transformers import LlamaConfig, LlamaForCausalLM

# tiny_llama by hand: hidden 64, intermediate 160, 2 layers, 4 heads, 2 KV heads (k/v width 32), vocab 300, tied.
EMBED = 300 * 64
LAYER = 64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 160 + 2 * 64  # q,o + k,v + gate,up,down + two norms = 43,136
PARAMS = EMBED + 2 * LAYER + 64
LORA_16 = 2 * 16 * ((64 + 64) * 2 + (64 + 32) * 2 + (64 + 160) * 3)  # r·(in+out) per adapted layer = 35,840


def test_seed_arithmetic():
    r = rule_of_thumb(1e9)
    assert r["store_fp32"] == 4e9  # 1B fp32 parameters: 4 GB to store
    assert r["train_adam_per_param_table"] == 24e9  # 4 + (4 + 8 + 8) = 4 + 20 extra bytes per parameter
    assert r["train_20x_storage"] == 80e9  # the article's "about 20× the storage" → 80 GB


def test_full_finetuning_by_hand():
    est = estimate_memory(tiny_llama(), MemoryConfig(method="full", optimizer="adamw", seq_len=32, batch=2))
    assert est.parameters == PARAMS == 105_536
    assert (est.weights, est.gradients, est.optimizer_states) == (4 * PARAMS, 4 * PARAMS, 8 * PARAMS)
    assert est.quant_constants == 0
    tokens = 64
    per_layer = (6 * 64 + 2 * 32 + 4 * 160) * tokens * 4
    assert est.activations == 2 * per_layer + 300 * tokens * 4
    assert est.loss_transient == 3 * 300 * tokens * 4
    assert est.kv_cache == 2 * 2 * 32 * tokens * 4
    # the peak: resident weights and moments, plus the start of backward (layers' activations, the loss
    # transient with the saved log-softmax counted once, the head's gradient) or its end (all gradients)
    start = 2 * per_layer + 3 * 300 * tokens * 4 + 300 * 64 * 4
    assert est.backward_start == start
    assert est.training_total == 4 * PARAMS + 8 * PARAMS + max(start, 4 * PARAMS)
    # bf16 weights halve weights, gradients and torch AdamW's moments (kept in the parameter's dtype)
    bf16 = estimate_memory(tiny_llama(), MemoryConfig(method="full", precision="bf16"))
    assert bf16.weights == 2 * PARAMS and bf16.optimizer_states == 4 * PARAMS


def test_lora_and_qlora_by_hand_and_against_real_storage():
    lora = estimate_memory(tiny_llama(), MemoryConfig(method="lora", lora_r=16, optimizer="adamw"))
    assert lora.trainable_parameters == LORA_16
    assert lora.weights == 4 * (PARAMS + LORA_16) and lora.gradients == 4 * LORA_16
    assert lora.optimizer_states == 8 * LORA_16
    qlora = estimate_memory(tiny_llama(), MemoryConfig(method="qlora", lora_r=16))
    model = tiny_llama()
    lowbit.quantize(model, lowbit.QuantConfig(format="nf4", block_size=64, double_quant=True))
    real = sum(m.weight_nbytes() for m in model.modules() if isinstance(m, lowbit.QuantLinear))
    n_linear = 2 * (LAYER - 2 * 64)
    assert qlora.weights + qlora.quant_constants == 4 * (PARAMS - n_linear) + real + 4 * LORA_16
    assert nf4_bytes(64 * 160, 64, True) == (64 * 80, 160 + 4 + 4)
    # a bf16 base keeps its unquantized layers (embeddings, head, norms) in bf16; LoRA stays fp32
    qlora_bf16 = estimate_memory(tiny_llama(), MemoryConfig(method="qlora", lora_r=16, precision="bf16"))
    assert qlora_bf16.weights + qlora_bf16.quant_constants == 2 * (PARAMS - n_linear) + real + 4 * LORA_16
    assert qlora_bf16.optimizer_states == 8 * LORA_16


@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit"])
def test_optimizer_states_match_a_real_optimizer(optimizer):
    model = lowbit.peft.apply_lora(tiny_llama(), lowbit.peft.LoraConfig(r=16, alpha=16))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(params, TrainConfig(optimizer=optimizer, optimizer_block_size=2048))
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    est = estimate_memory(tiny_llama(), MemoryConfig(method="lora", lora_r=16, optimizer=optimizer))
    assert est.optimizer_states == optimizer_state_nbytes(opt)


def saved_activation_bytes(model, batch, loss_in_model: bool = False) -> int:
    """Bytes of the distinct tensors autograd saves in one forward + loss (measured, not estimated)."""
    seen, params = {}, {p.data_ptr() for p in model.parameters()} | {b.data_ptr() for b in model.buffers()}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if loss_in_model:  # the model's own loss (a fused model's chunked cross-entropy)
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        else:
            logits = model(input_ids=batch, use_cache=False).logits.float()[:, :-1]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
    loss.backward()
    return sum(seen.values())


def test_activation_estimate_is_near_what_autograd_saves():
    model = lowbit.peft.apply_lora(tiny_llama(), lowbit.peft.LoraConfig(r=8, alpha=8))
    model.train()
    batch = torch.randint(0, 300, (2, 64))
    measured = saved_activation_bytes(model, batch)
    est = estimate_memory(tiny_llama(), MemoryConfig(method="lora", lora_r=8, seq_len=64, batch=2))
    assert 0.7 < est.activations_no_checkpointing / measured < 1.3
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    measured_ckpt = saved_activation_bytes(model, batch)
    assert measured_ckpt < measured and est.activations_checkpointing < est.activations_no_checkpointing


@pytest.mark.parametrize("checkpointing", [False, True])
def test_fused_activation_estimate_is_near_what_autograd_saves(checkpointing):
    """QLoRA with lowbit's fused kernels (bf16, the chunked loss): the estimate against the saved tensors."""
    from lowbit.kernels import fuse_for_training
    from lowbit.train.trainer import enable_gradient_checkpointing

    config = dict(hidden_size=256, intermediate_size=896, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=1, vocab_size=512)  # Llama-3's proportions  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**config)).to(torch.bfloat16)
    lowbit.quantize(model, lowbit.QuantConfig(format="nf4"))
    model = lowbit.peft.apply_lora(model, lowbit.peft.LoraConfig(r=16, target_modules="all-linear"))
    fuse_for_training(model)
    if checkpointing:
        enable_gradient_checkpointing(model)
    model.train()
    batch = torch.randint(0, 512, (2, 128))
    measured = saved_activation_bytes(model, batch, loss_in_model=True)
    cfg = MemoryConfig(method="qlora", precision="bf16", seq_len=128, batch=2, fused_kernels=True,
                       gradient_checkpointing=checkpointing)  # fmt: skip
    est = estimate_memory(LlamaConfig(**config), cfg)
    expected = est.activations
    if checkpointing:  # the recomputation saves its tensors during backward, outside what is measured here
        loss_terms = 2 * 256 * 256 * 2  # the chunked loss: final hidden states and their gradient, bf16
        expected -= (est.activations_no_checkpointing - loss_terms) // 2  # one of the 2 blocks
    assert 0.85 < expected / measured < 1.15


def test_fused_frozen_norms_add_no_saved_tensor():
    """Each fused norm keeps its output, which the projections after it keep anyway: against the same model
    with a zero in every norm weight (which makes the norms keep their inputs), autograd saves exactly one
    (tokens × hidden) bf16 tensor less per norm before a block's projections: 3 in 2 blocks (the first block's
    first norm has a constant input, so it keeps nothing either way; the final norm's output is not kept by
    the chunked loss, which keeps the gradient it computes in forward)."""
    from lowbit.kernels import fuse_for_training

    config = dict(hidden_size=64, intermediate_size=224, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=1, vocab_size=128)  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**config)).to(torch.bfloat16)
    lowbit.quantize(model, lowbit.QuantConfig(format="nf4"))
    model = lowbit.peft.apply_lora(model, lowbit.peft.LoraConfig(r=8, target_modules="all-linear"))
    assert fuse_for_training(model)["rms_norm"] == 5
    model.train()
    batch = torch.randint(0, 128, (2, 32))
    shared = saved_activation_bytes(model, batch, loss_in_model=True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p[0] = 0
    assert saved_activation_bytes(model, batch, loss_in_model=True) - shared == 3 * 2 * 32 * 64 * 2


def test_offloaded_embeddings_leave_the_weights():
    config = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                         vocab_size=300, tie_word_embeddings=False)  # fmt: skip
    base = dict(method="qlora", precision="bf16", seq_len=64)
    kept = estimate_memory(config, MemoryConfig(**base))
    offloaded = estimate_memory(config, MemoryConfig(**base, offload_embeddings=True))
    assert kept.weights - offloaded.weights == 300 * 64 * 2
    assert kept.training_total - offloaded.training_total == 300 * 64 * 2
    with pytest.raises(ValueError, match="tied"):
        estimate_memory(tiny_llama(), MemoryConfig(**base, offload_embeddings=True))


def test_checkpointing_some_blocks_by_hand():
    """k of L blocks recomputed: k block inputs + (L − k) blocks' activations + one block recomputed in backward."""
    base = dict(method="lora", lora_r=8, seq_len=64, batch=2, gradient_checkpointing=True)
    est = {k: estimate_memory(tiny_llama(), MemoryConfig(**base, checkpoint_layers=k)).activations for k in (0, 1, 2)}
    plain = estimate_memory(tiny_llama(), MemoryConfig(**base)).activations_no_checkpointing
    every = estimate_memory(tiny_llama(), MemoryConfig(**base)).activations_checkpointing
    logits, block_input = 300 * 128 * 4, 64 * 128 * 4  # fp32, 2 × 64 tokens
    block = (plain - logits) // 2
    assert est[0] == plain and est[2] == every
    assert est[1] == block_input + 2 * block + logits


def test_bad_config():
    for kw in (dict(method="ia3"), dict(optimizer="adam"), dict(seq_len=0), dict(precision="int8"), dict(checkpoint_layers=-1)):
        with pytest.raises(ValueError):
            MemoryConfig(**kw)


def test_plan_checkpoint_layers_keeps_as_many_blocks_as_fit():
    """By hand: recomputing k ≥ 1 of L blocks keeps k block inputs + (L − k + 1) blocks' activations, so the
    estimate falls by (k − 1)·(block − input) − input from keeping them all."""
    from lowbit.evaluate.memory import plan_checkpoint_layers

    config = LlamaConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=8, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=1000)  # fmt: skip
    cfg = MemoryConfig(method="qlora", precision="bf16", seq_len=256, batch=2)
    keep_all = estimate_memory(config, cfg)
    tokens, act = 2 * 256, 2
    block = (keep_all.activations_no_checkpointing - 1000 * tokens * 4) // 8
    block_input = 128 * tokens * act
    assert plan_checkpoint_layers(config, cfg, keep_all.training_total)[0] == 0
    budget = keep_all.training_total - int(3.5 * (block - block_input))  # needs (k − 1) ≥ 3.5 + input/(block − input)
    k, est = plan_checkpoint_layers(config, cfg, budget)
    assert k == 5 and est.training_total <= budget
    assert est.activations == 5 * block_input + 4 * block + 1000 * tokens * 4
    every = estimate_memory(config, MemoryConfig(**{**cfg.__dict__, "gradient_checkpointing": True}))
    assert plan_checkpoint_layers(config, cfg, every.training_total)[0] == 8
    with pytest.raises(ValueError, match="even with all 8 blocks recomputed"):
        plan_checkpoint_layers(config, cfg, every.training_total - 1)
