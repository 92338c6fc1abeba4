"""offload_embeddings: the frozen input embedding table in CPU memory (what it changes, what it refuses)."""

import pytest
import torch

import lowbit
from lowbit.train import TrainConfig, train
from lowbit.train.offload import embeddings_offloaded, offload_embeddings, restore_embeddings
from tests.tiny_models import tiny_llama
from tests.train.test_trainer import FAST, sft, tok  # noqa: F401  (fixtures)


def _lora(tie=False):
    model = tiny_llama(tie=tie)
    lowbit.quantize(model, lowbit.QuantConfig(format="nf4", block_size=64))
    return lowbit.peft.apply_lora(model, lowbit.peft.LoraConfig(r=4, alpha=8, init_lora_weights=False))


def test_offloaded_embedding_gives_the_same_logits_and_survives_to():
    model = _lora()
    ids = torch.randint(0, 300, (2, 12))
    want = model(input_ids=ids).logits
    embedding = offload_embeddings(model)
    assert embeddings_offloaded(model) and offload_embeddings(model) is embedding  # idempotent
    assert torch.equal(model(input_ids=ids).logits, want)
    model.to(torch.float64)  # every other parameter converts; the table stays as and where it is
    assert embedding.weight.dtype == torch.float32 and model.lm_head.weight.dtype == torch.float64
    model.to(torch.float32)
    key = "model.embed_tokens.weight"
    assert key in model.state_dict()  # same module, same parameter, same key
    restore_embeddings(model)
    assert not embeddings_offloaded(model) and not embedding._forward_hooks and not embedding._forward_pre_hooks
    model.to(torch.float64)  # back to a plain module: `.to` reaches the table again
    assert embedding.weight.dtype == torch.float64


def test_rows_of_cpu_ids_go_to_the_models_device():
    """Ids given on the CPU are looked up without a round trip; their rows go where `model.to` last sent the
    model (here the meta device stands in for a GPU), and a dtype-only `.to` does not move that target."""
    model = _lora()
    embedding = offload_embeddings(model)
    ids = torch.randint(0, 300, (2, 5))
    assert embedding(ids).device.type == "cpu"
    model.to("meta")
    model.to(torch.float64)
    rows = embedding(ids)
    assert rows.device.type == "meta" and rows.shape == (2, 5, model.config.hidden_size)
    assert embedding.weight.device.type == "cpu"


@pytest.mark.parametrize("hook_first", [True, False])
def test_rows_that_must_require_grad_stop_their_gradient_on_the_device(hook_first):
    """transformers' enable_input_require_grads (for checkpointing) makes the looked-up rows require grad: they
    come out as a leaf, so backward never copies their gradient back to the CPU table, and the adapters'
    gradients are those of the model on one device."""
    model, reference = _lora(), _lora()
    reference.load_state_dict(model.state_dict())
    if hook_first:
        model.enable_input_require_grads()
    embedding = offload_embeddings(model)
    if not hook_first:
        model.enable_input_require_grads()
    ids = torch.randint(0, 300, (2, 12))
    rows = embedding(ids)
    assert rows.requires_grad and rows.grad_fn is None
    if hook_first:  # a lookup outside autograd gives plain rows (a later hook may still set requires_grad)
        with torch.no_grad():
            assert not embedding(ids).requires_grad
    model(input_ids=ids).logits.square().mean().backward()
    reference(input_ids=ids).logits.square().mean().backward()
    assert embedding.weight.grad is None
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_offload_refuses_a_trained_or_tied_table():
    model = _lora()
    model.get_input_embeddings().weight.requires_grad_(True)
    with pytest.raises(ValueError, match="trains"):
        offload_embeddings(model)
    with pytest.raises(ValueError, match="tied"):
        offload_embeddings(_lora(tie=True))
    with pytest.raises(ValueError, match="no input embedding"):
        offload_embeddings(torch.nn.Linear(2, 2))


def test_training_with_offloaded_embeddings_is_unchanged(sft, tok):  # noqa: F811
    cfg = dict(max_steps=3, lr=1e-2, **FAST)
    plain = train(_lora(), sft, TrainConfig(**cfg), pad_token_id=tok.pad_token_id)
    model = _lora()
    offload = train(model, sft, TrainConfig(**cfg, offload_embeddings=True), pad_token_id=tok.pad_token_id)
    assert offload.losses == plain.losses
    assert not embeddings_offloaded(model)  # put back when training ends
