"""Processes of test_distributed.py: tiny LoRA / QLoRA runs on 1 or 2 gloo processes (torch.multiprocessing).

One spawn of 2 processes does every 2-process check (spawning and importing torch dominate the time):
DDP and FSDP2 loss curves, the sharded 4-bit storage, gathering it back, adapter save/load, an FSDP
checkpoint resumed in a fresh model, and the cross-rank layout check. Rank 0 writes what it saw as JSON;
the asserts live in the test.
"""

import json
import math
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

import lowbit
from lowbit.nn import QuantLinear
from lowbit.train import DataConfig, TrainConfig, build_examples, read_records, train
from lowbit.train.checkpoint import trainable_state
from lowbit.train.distributed import LayoutMismatch, check_consistent, unsharded
from tests.tiny_models import tiny_llama
from tests.train.tiny_tokenizer import tiny_tokenizer

DATA = Path(__file__).resolve().parents[2] / "data"
RUNS = (("ddp", False), ("fsdp", True))  # (strategy, NF4 base)
STEPS, SAVE_EVERY, RESUME_AT = 5, 2, 2


def base(quantized: bool, block_size: int = 64):
    model = tiny_llama()
    if quantized:
        lowbit.quantize(model, lowbit.QuantConfig(format="nf4", block_size=block_size))
    return model


def base_model(quantized: bool, block_size: int = 64, lora_seed: int = 0):
    model = base(quantized, block_size)
    torch.manual_seed(lora_seed)  # identical LoRA initialisation in every process
    return lowbit.peft.apply_lora(model, lowbit.peft.LoraConfig(r=4, alpha=8))


def config(world: int, strategy: str) -> TrainConfig:
    return TrainConfig(max_steps=STEPS, batch_size=8 // world, lr=1e-2, strategy=strategy, save_every=SAVE_EVERY,
                       keep_checkpoints=3, progress=False, plot=False)  # fmt: skip


def examples():
    tok = tiny_tokenizer()
    ex, _ = build_examples(read_records(DATA / "instruct" / "train.jsonl")[:48], tok, DataConfig(max_length=160))
    return ex, tok.pad_token_id


def gather(value) -> list:
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, value)
    return everyone


def storage_report(model, reference: dict) -> dict:
    """Bytes of 4-bit storage this process holds, against the whole; whether gathering restores it exactly."""
    local = total = bound = 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            assert not any(n.startswith("weight") for n in m._buffers), "storage left as replicated buffers"
            for t in m.storage().values():
                size = t.element_size()
                local, total = local + t.to_local().numel() * size, total + t.numel() * size
                bound += math.ceil(t.numel() / dist.get_world_size()) * size  # FSDP2's padded dim-0 chunk
    # The full state dict (what a save writes): FSDP2's state_dict() holds shards; torch gathers them.
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    exact = all(state[k].dtype == v.dtype and torch.equal(state[k], v) for k, v in reference["storage"].items())
    with unsharded(model):  # inside, the modules hold the gathered tensors: a forward, a dequantize see them
        weights_equal = all(torch.equal(m.dequantize(), reference["weights"][n])
                            for n, m in model.named_modules() if isinstance(m, QuantLinear))  # fmt: skip
    return {"local": local, "total": total, "bound": bound, "exact": exact, "weights_equal": weights_equal}


def fsdp_checks(rank: int, model, losses: list, ex, pad: int, reference: dict, out: Path) -> dict:
    """After the 2-process FSDP QLoRA run: storage shards, adapter round trip, resume from a checkpoint."""
    result = {"storage": gather(storage_report(model, reference))}
    ids = torch.tensor([ex[0]["input_ids"][:32]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits  # sharded forward: every process takes part
    with unsharded(model):
        if rank == 0:
            lowbit.peft.save_adapter(model, out / "adapter")
    dist.barrier()
    if rank == 0:
        reloaded = lowbit.peft.load_adapter(base(True), out / "adapter")
        with torch.no_grad():
            result["adapter_diff"] = float((reloaded(input_ids=ids).logits - logits).abs().max())
    final = trainable_state(model)
    # Resume in a fresh model with other LoRA weights: the checkpoint must restore weights and Adam state.
    fresh = base_model(True, lora_seed=1)
    resumed = train(fresh, ex, config(2, "fsdp"), pad_token_id=pad, output_dir=out / "resumed",
                    resume=out / "fsdp" / f"checkpoint-{RESUME_AT:08d}").losses  # fmt: skip
    result["resumed"], result["straight"] = resumed, losses[RESUME_AT:]
    after = trainable_state(fresh)
    result["resumed_weights_diff"] = max(float((after[k] - final[k]).abs().max()) for k in final)
    return result


def mismatch_checks(rank: int, ex, pad: int) -> dict:
    """Rank 1 with another block size (through train(): stops before step 1) or storage dtype; then agreement;
    then an 8-bit optimizer under FSDP (refused before step 1)."""
    messages = {}
    model = base_model(True, block_size=32 if rank == 1 else 64)
    try:
        train(model, ex, config(2, "fsdp"), pad_token_id=pad)
        messages["block_size"] = None
    except LayoutMismatch as e:
        messages["block_size"] = str(e)
    model = base_model(True)
    if rank == 1:  # same bytes reinterpreted: decoding still "works", the layouts differ
        q = model.get_submodule("model.layers.1.mlp.down_proj.base_layer")
        q.weight = q.weight.view(torch.int8)
    try:
        check_consistent(model)
        messages["dtype"] = None
    except LayoutMismatch as e:
        messages["dtype"] = str(e)
    model = base_model(True)
    check_consistent(model)  # the same model everywhere: passes silently
    cfg = TrainConfig(max_steps=1, batch_size=4, strategy="fsdp", optimizer="adamw8bit", progress=False, plot=False)
    try:
        train(model, ex, cfg, pad_token_id=pad)
        messages["optimizer"] = None
    except ValueError as e:
        messages["optimizer"] = str(e)
    return {"mismatch": gather(messages)}


def run(rank: int, world: int, out: str) -> None:
    """Every run of RUNS in this process group (plus the 2-process checks); rank 0 writes the results."""
    torch.set_num_threads(1)
    out = Path(out)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=world)
    ex, pad = examples()
    results = {}
    for strategy, quantized in RUNS:
        model = base_model(quantized)
        reference = {"storage": {k: v.clone() for k, v in model.state_dict().items() if ".base_layer.weight" in k},
                     "weights": {n: m.dequantize() for n, m in model.named_modules() if isinstance(m, QuantLinear)}}
        run_dir = out / strategy if world > 1 else None
        losses = train(model, ex, config(world, strategy if world > 1 else "none"), pad_token_id=pad,
                       output_dir=run_dir).losses  # fmt: skip
        results[f"{strategy}-{quantized}"] = losses
        if world > 1 and strategy == "fsdp":
            results |= fsdp_checks(rank, model, losses, ex, pad, reference, out)
    if world > 1:
        results |= mismatch_checks(rank, ex, pad)
    if rank == 0:
        Path(out, f"results-{world}.json").write_text(json.dumps(results))
    if world > 1:
        dist.destroy_process_group()
        # A spawned process sometimes aborts in the interpreter's teardown, after everything above has
        # finished ("terminate called without an active exception" from a gloo thread, ~1 run in 5 on two
        # cores): the results are written, so leave without the teardown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def spawn(world: int, out: str) -> dict:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if world == 1:
        run(0, 1, out)
    else:
        torch.multiprocessing.spawn(run, args=(world, out), nprocs=world, join=True)
    return json.loads(Path(out, f"results-{world}.json").read_text())
