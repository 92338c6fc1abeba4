"""GraphedStep's bookkeeping on the CPU (where it runs eagerly): the warm-up it needs is undone exactly."""

import copy

import pytest
import torch

import lowbit
from lowbit.train.graphed import GraphedStep
from lowbit.train.offload import offload_embeddings
from tests.tiny_models import tiny_llama


def qlora_model():
    model = tiny_llama(tie=False)
    lowbit.quantize(model, lowbit.QuantConfig(format="nf4", block_size=32))
    return lowbit.peft.apply_lora(model, lowbit.peft.LoraConfig(r=4, target_modules="all-linear")).train()


def batches(n: int):
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": (ids := torch.randint(0, 300, (2, 16), generator=g)), "labels": ids} for _ in range(n)]


def trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("offload, optimizer", [(False, "adamw"), (True, "adamw"), (False, "adamw8bit")])
def test_steps_equal_a_plain_loop_after_the_undone_warm_up(offload, optimizer):
    """With the embedding table offloaded, the step holds the looked-up rows instead of the ids; the 8-bit
    AdamW's state (host step counters off the GPU) is undone too."""
    model = qlora_model()
    reference = copy.deepcopy(model)
    model.enable_input_require_grads()  # as gradient checkpointing does: the rows would require grad
    if offload:
        offload_embeddings(model)
    make = (lambda ps: torch.optim.AdamW(ps, lr=1e-2)) if optimizer == "adamw" else (
        lambda ps: lowbit.optim.AdamW8bit(ps, lr=1e-2, min_8bit_size=0, block_size=64))  # fmt: skip
    opt = make([p for p in model.parameters() if p.requires_grad])
    ref_opt = make([p for p in reference.parameters() if p.requires_grad])
    data = batches(4)
    step = GraphedStep(model, opt, data[0], warmup=3)
    assert ("inputs_embeds" in step.static) == offload and ("input_ids" in step.static) != offload
    # no static input requires grad: its gradient would leave the graph for a tensor made outside it
    assert not any(v.requires_grad for v in step.static.values())
    assert all(torch.equal(a, b) for a, b in zip(trainable(model).values(), trainable(reference).values()))
    for batch in data:
        loss = step(batch).item()
        ref_opt.zero_grad()
        ref_loss = reference(**batch).loss
        ref_loss.backward()
        ref_opt.step()
        assert loss == pytest.approx(ref_loss.item(), rel=1e-6)
    for name, value in trainable(reference).items():
        torch.testing.assert_close(trainable(model)[name], value, rtol=1e-5, atol=1e-7)


def test_bad_batches_and_optimizers_get_clear_errors():
    model = qlora_model()
    params = [p for p in model.parameters() if p.requires_grad]
    data = batches(1)[0]
    with pytest.raises(TypeError, match="Adam or AdamW"):
        GraphedStep(model, torch.optim.SGD(params, lr=0.1), data)
    with pytest.raises(ValueError, match="paged"):
        GraphedStep(model, lowbit.optim.AdamW8bit(params, paged=True), data)
    step = GraphedStep(model, torch.optim.AdamW(params, lr=1e-3), data, warmup=1)
    with pytest.raises(ValueError, match="pad or pack"):
        step({"input_ids": data["input_ids"][:, :8], "labels": data["labels"][:, :8]})
    with pytest.raises(ValueError, match="keys"):
        step({"input_ids": data["input_ids"]})
