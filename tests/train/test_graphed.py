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


def test_capture_leaves_the_causal_mask_to_sdpa(monkeypatch):
    """Under a CUDA graph capture, in training (no KV cache), transformers builds a (T × T) mask: SDPA then
    repeats K and V to every head and runs its slower masked kernel. Inside `causal_sdpa` the causal mask of
    whole sequences stays None, the logits unchanged, and a padding mask still goes to transformers' own."""
    import transformers.integrations.sdpa_attention as sdpa

    from lowbit.train.graphed import causal_sdpa

    model = tiny_llama()
    assert model.config._attn_implementation == "sdpa"
    masks = []
    forward = sdpa.sdpa_attention_forward
    def spy(module, q, k, v, mask, **kw):
        masks.append(mask)
        return forward(module, q, k, v, mask, **kw)

    monkeypatch.setattr(sdpa, "sdpa_attention_forward", spy)
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "sdpa", sdpa.sdpa_attention_forward)
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    padding = torch.ones_like(ids)
    padding[0, :3] = 0
    with torch.no_grad():
        want = model(input_ids=ids, use_cache=False).logits
        want_padded = model(input_ids=ids, attention_mask=padding, use_cache=False).logits
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
        masks.clear()
        model(input_ids=ids, use_cache=False)
        assert masks[0] is not None and masks[0].shape[-2:] == (12, 12)  # what transformers does under capture
        masks.clear()
        with causal_sdpa(model):
            got = model(input_ids=ids, use_cache=False).logits
            assert masks and all(m is None for m in masks)
            masks.clear()
            got_padded = model(input_ids=ids, attention_mask=padding, use_cache=False).logits
            assert masks[0] is not None and not masks[0][0, 0, 5, :3].any()  # padding still masked
    assert model.config._attn_implementation == "sdpa"  # put back
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_padded, want_padded)


@pytest.mark.parametrize("positions", [False, True])
def test_the_step_leaves_the_mask_to_sdpa_only_for_unpacked_batches(monkeypatch, positions):
    """Position ids may describe packed sequences, whose mask transformers must build."""
    from lowbit.train import graphed

    calls = []
    mask = graphed.causal_sdpa_mask
    monkeypatch.setattr(graphed, "causal_sdpa_mask", lambda *a, **kw: calls.append(1) or mask(*a, **kw))
    model = qlora_model()
    example = batches(1)[0] | ({"position_ids": torch.arange(16).expand(2, 16)} if positions else {})
    GraphedStep(model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad]), example, warmup=1)
    assert bool(calls) != positions
    assert model.config._attn_implementation == "sdpa"


def test_graphed_backward_accumulates_scaled_gradients_like_backward():
    """Two micro-batches through GraphedBackward (eager here) add scale·∇loss into the existing gradients, the
    offloaded embedding's rows standing in for the ids, exactly as a plain backward of each."""
    from lowbit.train.graphed import GraphedBackward

    model, reference = qlora_model(), None
    reference = copy.deepcopy(model)
    offload_embeddings(model)
    sum_loss = lambda m, b: m(**b).loss * b["labels"].numel()  # noqa: E731
    graphed = GraphedBackward(model, sum_loss)
    data = batches(2)
    losses = [graphed(batch, 0.5).item() for batch in data]
    for batch, loss in zip(data, losses):
        ref = sum_loss(reference, batch)
        (ref * 0.5).backward()
        assert loss == pytest.approx(ref.item(), rel=1e-6)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, msg=name)
