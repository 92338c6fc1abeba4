"""The training loop on tiny models and the shipped real data (CPU, seconds)."""

import copy
import math
from pathlib import Path

import pytest
import torch

import lowbit
from lowbit.train import DataConfig, TrainConfig, TrainingDiverged, build_examples, read_records, train
from lowbit.train import trainer as trainer_mod
from lowbit.train.data import collate
from lowbit.train.schedule import lr_factor
from tests.tiny_models import tiny_bert, tiny_llama
from tests.train.tiny_tokenizer import tiny_tokenizer

DATA = Path(__file__).resolve().parents[2] / "data"
FAST = dict(progress=False, plot=False)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def sft(tok):
    """64 real instruction examples (WordNet definitions / Debian FAQ), byte-tokenized, ≤ 160 tokens."""
    records = read_records(DATA / "instruct" / "train.jsonl")[:120]
    examples, _ = build_examples(records, tok, DataConfig(max_length=160))
    return examples[:64]


def lora_llama(seed=0, quantized=False, dropout=0.0):
    model = tiny_llama(seed)
    if quantized:
        lowbit.quantize(model, lowbit.QuantConfig(format="nf4", block_size=64))
    return lowbit.peft.apply_lora(model, lowbit.peft.LoraConfig(r=4, alpha=8, dropout=dropout))


def trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_loss_is_token_mean_cross_entropy_float64(sft, tok):
    """train_step's loss against a float64 cross-entropy over response tokens written here."""
    model = lora_llama()
    examples = sft[:3]
    batch = collate(examples, tok.pad_token_id)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    n = trainer_mod.loss_items(batch)
    loss, _ = trainer_mod.train_step(model, [batch], n, opt, TrainConfig(**FAST))
    total, count = 0.0, 0
    with torch.no_grad():
        for e in examples:
            logits = model(input_ids=torch.tensor([e["input_ids"]])).logits[0].double()  # (T, V)
            logp = torch.log_softmax(logits, dim=-1)
            for t in range(1, len(e["labels"])):
                if e["labels"][t] != -100:
                    total -= float(logp[t - 1, e["labels"][t]])
                    count += 1
    assert n == count
    assert loss == pytest.approx(total / count, rel=1e-5)


def test_gradient_accumulation_equals_one_big_batch(sft, tok):
    runs = []
    for batch_size, accum in ((4, 1), (2, 2), (1, 4)):
        model = lora_llama()
        cfg = TrainConfig(max_steps=4, batch_size=batch_size, grad_accum=accum, lr=1e-2, **FAST)
        result = train(model, sft, cfg, pad_token_id=tok.pad_token_id)
        runs.append((result.losses, trainable(model)))
    for losses, weights in runs[1:]:
        assert losses == pytest.approx(runs[0][0], rel=1e-5)
        for name, w in weights.items():
            torch.testing.assert_close(w, runs[0][1][name], rtol=1e-4, atol=1e-6)


def test_same_seed_same_run_and_loss_falls(sft, tok, tmp_path):
    a = train(lora_llama(dropout=0.1), sft, TrainConfig(max_steps=12, lr=1e-2, seed=3, **FAST), pad_token_id=0)
    b = train(lora_llama(dropout=0.1), sft, TrainConfig(max_steps=12, lr=1e-2, seed=3, **FAST), pad_token_id=0)
    assert a.losses == b.losses
    assert sum(a.losses[-3:]) < sum(a.losses[:3])


@pytest.mark.parametrize("kind", ["constant", "linear", "cosine"])
def test_schedules_match_transformers(kind):
    """The LR factor per step equals transformers' own warm-up schedulers."""
    from transformers import get_scheduler

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    name = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}[kind]
    sched = get_scheduler(name, opt, num_warmup_steps=5, num_training_steps=30)
    theirs = []
    for _ in range(30):
        theirs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    ours = [lr_factor(s, 30, 5, kind) for s in range(30)]
    assert ours == pytest.approx(theirs, abs=1e-12)
    assert lr_factor(30, 30, 5, "cosine", min_lr_ratio=0.1) == pytest.approx(0.1)


def test_gradient_checkpointing_with_qlora_gives_the_same_gradients(sft, tok):
    grads = []
    for checkpointing in (False, True):
        model = lora_llama(quantized=True)
        if checkpointing:
            trainer_mod.enable_gradient_checkpointing(model)
        model.train()
        loss = trainer_mod.batch_loss(model, collate(sft[:4], tok.pad_token_id))
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
        assert model.is_gradient_checkpointing == checkpointing
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("layers", [0, 1, 2])
def test_checkpointing_some_blocks_recomputes_only_those_and_keeps_the_gradients(sft, tok, layers):
    """checkpoint_layers = k: blocks < k run their MLP twice a step (forward, recomputation), the rest once."""
    reference = lora_llama(quantized=True)
    model = lora_llama(quantized=True)
    assert trainer_mod.enable_gradient_checkpointing(model, layers) == layers
    calls = []
    for i, block in enumerate(model.model.layers):
        # a pre-hook: the recomputation stops once it has what backward needs, before the forward hook
        block.mlp.register_forward_pre_hook(lambda *_, i=i: calls.append(i))
    grads = []
    for m in (reference, model):
        m.train()
        trainer_mod.batch_loss(m, collate(sft[:4], tok.pad_token_id)).backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.requires_grad})
    assert [calls.count(i) for i in range(2)] == [2 if i < layers else 1 for i in range(2)]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="needs gradient_checkpointing"):
        TrainConfig(checkpoint_layers=1)


def test_offloaded_activations_train_the_same(sft, tok):
    """Activations parked in CPU memory (a copy on the CPU itself) change nothing but where they wait."""
    cfg = dict(max_steps=3, lr=1e-2, gradient_checkpointing=True, **FAST)
    plain = train(lora_llama(quantized=True), sft, TrainConfig(**cfg), pad_token_id=tok.pad_token_id)
    offload = train(lora_llama(quantized=True), sft, TrainConfig(**cfg, offload_activations=True),
                    pad_token_id=tok.pad_token_id)  # fmt: skip
    assert offload.losses == pytest.approx(plain.losses, rel=1e-6)
    assert isinstance(trainer_mod.offloaded_activations(True, torch.device("cpu")), torch.autograd.graph.save_on_cpu)


def test_qlora_training_runs_with_checkpointing_and_bf16(sft, tok):
    model = lora_llama(quantized=True)
    cfg = TrainConfig(max_steps=3, lr=1e-2, precision="bf16", gradient_checkpointing=True, **FAST)
    result = train(model, sft, cfg, pad_token_id=tok.pad_token_id)
    assert all(math.isfinite(x) for x in result.losses)
    fp32 = train(lora_llama(quantized=True), sft, TrainConfig(max_steps=1, lr=1e-2, **FAST), pad_token_id=0)
    assert result.losses[0] == pytest.approx(fp32.losses[0], rel=0.02)  # bf16 autocast ≈ fp32
    fp16 = train(lora_llama(), sft, TrainConfig(max_steps=2, lr=1e-2, precision="fp16", **FAST), pad_token_id=0)
    assert all(math.isfinite(x) for x in fp16.losses)  # fp16 autocast + gradient scaler


def test_eval_metrics_jsonl_plot_and_progress(sft, tok, tmp_path, capsys):
    cfg = TrainConfig(max_steps=4, lr=1e-2, eval_every=2, progress=True)
    result = train(lora_llama(), sft[:48], cfg, eval_examples=sft[48:], pad_token_id=0, output_dir=tmp_path)
    records = lowbit.train.read_metrics(tmp_path)
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4] and [r["step"] for r in evals] == [2, 4]
    assert all(r["tokens_per_s"] > 0 and r["memory_mb"] > 0 and r["lr"] >= 0 for r in steps)
    assert result.plot is not None and result.plot.stat().st_size > 1000
    assert result.checkpoint is not None and result.checkpoint.name == "checkpoint-00000004"
    assert "loss=" in capsys.readouterr().err  # the tqdm bar shows loss, lr, tokens/s and memory


def test_early_stopping(sft, tok, monkeypatch):
    losses = iter([3.0, 2.0, 2.5, 2.4, 2.6, 1.0])
    monkeypatch.setattr(trainer_mod, "evaluate", lambda *a, **k: {"eval_loss": next(losses), "eval_items": 1})
    cfg = TrainConfig(max_steps=20, lr=1e-3, eval_every=1, early_stopping_patience=3, **FAST)
    result = train(lora_llama(), sft, cfg, eval_examples=sft[:4], pad_token_id=0)
    assert result.stopped_early and result.steps == 5  # best at step 2, then 3 evaluations without a new best


class NaNAfter(torch.nn.Module):
    """Wraps a model; from call number `start` on its logits are NaN (a diverging run)."""

    def __init__(self, model, start):
        super().__init__()
        self.model, self.start, self.calls = model, start, 0
        self.config = model.config

    def forward(self, **kw):
        out = self.model(**kw)
        self.calls += 1
        if self.calls >= self.start:
            out.logits = out.logits * float("nan")
        return out


def test_non_finite_steps_are_skipped_then_training_stops(sft, tok, tmp_path):
    model = NaNAfter(lora_llama(), start=4)
    cfg = TrainConfig(max_steps=20, lr=1e-2, save_every=3, max_bad_steps=3, **FAST)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        with pytest.raises(TrainingDiverged, match="3 steps in a row.*checkpoint-00000003"):
            train(model, sft, cfg, pad_token_id=0, output_dir=tmp_path)
    # Steps 4-6 were skipped: the weights are those after step 3, equal to the last checkpoint's.
    saved = lowbit.train.list_checkpoints(tmp_path)
    assert [p.name for p in saved] == ["checkpoint-00000003"]
    from safetensors.torch import load_file

    weights = load_file(saved[0] / "trainable.safetensors")
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert torch.equal(weights[name], p.detach())
    log = lowbit.train.read_metrics(tmp_path)
    assert [r["loss"] for r in log if "loss" in r][3:] == [None, None, None]


def test_single_non_finite_step_is_skipped_and_training_goes_on(sft, tok):
    class OneBadStep(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model, self.config, self.calls = model, model.config, 0

        def forward(self, **kw):
            out = self.model(**kw)
            self.calls += 1
            if self.calls == 2:
                out.logits = out.logits * float("inf")
            return out

    model = OneBadStep(lora_llama())
    with pytest.warns(RuntimeWarning, match="step 2: non-finite"):
        result = train(model, sft, TrainConfig(max_steps=4, lr=1e-2, **FAST), pad_token_id=0)
    assert math.isnan(result.losses[1]) and all(math.isfinite(x) for x in result.losses[2:])


def test_sequence_classification_on_real_data(tok):
    """tiny BERT + LoRA + trained classifier head on the shipped supersense data: loss falls."""
    rows = read_records(DATA / "supersense" / "train.csv")[:200]
    labels = ("animal", "artifact", "body", "food", "location", "person", "plant", "substance")
    examples, _ = build_examples(rows, tok, DataConfig(task="classification", labels=labels, max_length=64,
                                                           overlong="truncate"))  # fmt: skip
    assert len(examples) == 200
    bert = tiny_bert()
    bert.classifier = torch.nn.Linear(64, len(labels))
    bert.config.num_labels = len(labels)
    bert = lowbit.peft.apply_lora(bert, lowbit.peft.LoraConfig(r=4, alpha=8, modules_to_save=("classifier",)))
    cfg = TrainConfig(max_steps=30, batch_size=16, lr=3e-3, eval_every=30, **FAST)
    result = train(bert, examples[:160], cfg, eval_examples=examples[160:], pad_token_id=tok.pad_token_id)
    assert sum(result.losses[-5:]) / 5 < sum(result.losses[:5]) / 5
    assert 0.0 <= result.evals[-1]["eval_accuracy"] <= 1.0


def test_8bit_adamw_follows_32bit_adamw(sft, tok):
    curves = {}
    for opt in ("adamw", "adamw8bit"):
        model = tiny_llama()
        lowbit.peft.apply_full_finetuning(model)  # 8-bit states for every matrix ≥ 4096 values
        cfg = TrainConfig(max_steps=25, lr=3e-3, optimizer=opt, optimizer_block_size=256, **FAST)
        curves[opt] = train(model, sft, cfg, pad_token_id=0).losses
    assert curves["adamw8bit"][-1] < curves["adamw8bit"][0] - 0.5
    for a, b in zip(curves["adamw"], curves["adamw8bit"]):
        assert b == pytest.approx(a, rel=0.03)


def test_config_validation_and_errors(sft, tok):
    for kw in (dict(max_steps=0), dict(lr=0.0), dict(optimizer="adam"), dict(precision="fp8"), dict(schedule="step"),
               dict(max_grad_norm=0.0), dict(batch_size=True), dict(strategy="tp")):  # fmt: skip
        with pytest.raises(ValueError):
            TrainConfig(**kw)
    frozen = tiny_llama()
    for p in frozen.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        train(frozen, sft, TrainConfig(**FAST), pad_token_id=0)
    with pytest.raises(ValueError, match="no training examples"):
        train(lora_llama(), [], TrainConfig(**FAST), pad_token_id=0)
    with pytest.raises(ValueError, match="needs output_dir"):
        train(lora_llama(), sft, TrainConfig(**FAST), pad_token_id=0, resume="auto")
    assert copy.deepcopy(TrainConfig()) == TrainConfig()


def test_checkpoint_layers_auto_follows_the_memory_budget(sft, tok):
    from lowbit.evaluate.memory import MemoryConfig, estimate_memory

    seq = max(len(e["input_ids"]) for e in sft)
    memory = dict(method="qlora", seq_len=seq, batch=4, lora_r=4, precision="fp32")
    keep = estimate_memory(tiny_llama().config, MemoryConfig(**memory)).training_total
    every = estimate_memory(tiny_llama().config, MemoryConfig(**memory, gradient_checkpointing=True)).training_total
    assert every < keep
    for budget, recomputed in ((keep, 0), ((keep + every) / 2, 2)):  # 1 of 2 blocks would not save anything
        model = lora_llama(quantized=True)
        cfg = TrainConfig(max_steps=1, batch_size=4, gradient_checkpointing=True, checkpoint_layers="auto",
                          memory_budget_gib=budget / 2**30, **FAST)  # fmt: skip
        train(model, sft, cfg, pad_token_id=tok.pad_token_id)
        assert [block.gradient_checkpointing for block in model.model.layers] == [i < recomputed for i in range(2)]
    with pytest.raises(ValueError, match="needs memory_budget_gib on the CPU"):
        train(lora_llama(quantized=True), sft, TrainConfig(max_steps=1, gradient_checkpointing=True,
                                                           checkpoint_layers="auto", **FAST), pad_token_id=0)  # fmt: skip
    with pytest.raises(ValueError, match="even with all 2 blocks"):
        train(lora_llama(quantized=True), sft, TrainConfig(max_steps=1, batch_size=4, gradient_checkpointing=True,
                                                           checkpoint_layers="auto", memory_budget_gib=every / 2**31,
                                                           **FAST), pad_token_id=0)  # fmt: skip
    with pytest.raises(ValueError, match="goes with checkpoint_layers='auto'"):
        TrainConfig(gradient_checkpointing=True, memory_budget_gib=10)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_graphs_train_like_the_plain_loop(sft, tok, precision):
    """With cuda_graphs (eager on the CPU): batches padded to widths of 64, micro-batches accumulating into
    gradients kept between steps, masks of unpadded batches dropped, autocast without its cache — same losses
    and weights as without. (The graphs themselves run on a GPU: bench/train_graphs.py.)"""
    runs = []
    for graphs in (False, True):
        model = lora_llama(quantized=True)
        cfg = TrainConfig(max_steps=3, batch_size=2, grad_accum=2, lr=1e-2, cuda_graphs=graphs, precision=precision,
                          **FAST)  # fmt: skip
        if graphs:
            with pytest.warns(UserWarning, match="not on a CUDA device"):
                result = train(model, sft, cfg, pad_token_id=tok.pad_token_id)
            assert all(p.grad is not None for p in model.parameters() if p.requires_grad)  # kept in place
        else:
            result = train(model, sft, cfg, pad_token_id=tok.pad_token_id)
        runs.append((result.losses, trainable(model)))
    # The wider padding reassociates float32 sums (~1e-7); Adam turns that into up to ~1e-5 on near-zero gradient
    # entries after 3 steps of lr 1e-2, while a lost micro-batch turns the gradient and moves weights by ~lr (the
    # gradient's scale, which Adam does not see, is checked in test_graphed.py). Under bf16 autocast the padded
    # matmuls round differently, ~1e-2 of a gradient, which Adam can turn into ~lr on such entries: the losses only.
    fp32 = precision == "fp32"
    assert runs[1][0] == pytest.approx(runs[0][0], rel=1e-5 if fp32 else 2e-3)
    for name, value in runs[0][1].items() if fp32 else ():
        torch.testing.assert_close(runs[1][1][name], value, rtol=0, atol=3e-5, msg=name)


def test_cuda_graphs_refuse_what_a_graph_cannot_replay(sft, tok):
    with pytest.raises(ValueError, match="fp16"):
        TrainConfig(cuda_graphs=True, precision="fp16")
    with pytest.raises(ValueError, match="offload_activations"):
        TrainConfig(cuda_graphs=True, offload_activations=True)
    with pytest.raises(ValueError, match="without a teacher"):
        train(lora_llama(), sft[:4], TrainConfig(max_steps=1, cuda_graphs=True, **FAST), pad_token_id=tok.pad_token_id,
              teacher=tiny_llama(1))  # fmt: skip


def test_collate_pads_widths_to_a_multiple(sft, tok):
    batch = collate(sft[:3], tok.pad_token_id, multiple=64)
    longest = max(len(e["input_ids"]) for e in sft[:3])
    assert batch["input_ids"].shape[1] == -(-longest // 64) * 64
    assert (batch["labels"][:, longest:] == -100).all() and not batch["attention_mask"][:, longest:].any()
