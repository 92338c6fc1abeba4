"""One QLoRA training step on a Llama-3-8B-shaped model: lowbit vs peft+bitsandbytes vs a bf16-base LoRA.

Same process, same random model, same settings (r = 16 on every linear layer of the blocks, α = 32, gradient
checkpointing, torch AdamW lr 1e-4, labels = inputs): tokens/s over timed steps after warm-up and
`torch.cuda.max_memory_allocated` over the training steps (weights and optimizer states included; not the
bf16 model each contender is built from before quantizing). Then a torch-profiler
table of one lowbit step (where the time goes) and, with --max-seq, the longest sequence each fits.

    python3 bench/qlora_step.py --out $OUT           # on a GPU; bitsandbytes from its carried wheel
    python3 bench/qlora_step.py --tiny               # CPU smoke run of the same code on a tiny shape
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "src")]

import lowbit  # noqa: E402
from lowbit.train.graphed import GraphedStep  # noqa: E402

LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                 num_key_value_heads=8, rope_theta=500000.0, max_position_embeddings=131072)  # fmt: skip
TINY = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def log(*a):
    print(*a, flush=True)


def build_model(shape: dict, layers: int, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape, num_hidden_layers=layers, torch_dtype=torch.bfloat16)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model.config.use_cache = False
    return model


def lowbit_qlora(model, dropout: float = 0.0):
    lowbit.quantize(model, lowbit.QuantConfig(format="nf4", block_size=64, double_quant=True))
    config = lowbit.peft.LoraConfig(r=16, alpha=32, target_modules=TARGETS, dropout=dropout)
    return lowbit.peft.apply_lora(model, config)


def peft_lora(model, four_bit: bool, dropout: float = 0.0):
    import peft

    if four_bit:
        import bitsandbytes as bnb

        for name, module in list(model.named_modules()):
            for child_name, child in list(module.named_children()):
                if isinstance(child, torch.nn.Linear) and child_name in TARGETS:
                    q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=False,
                                          compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4",
                                          device="meta")  # fmt: skip
                    q.weight = bnb.nn.Params4bit(child.weight.data.cpu(), requires_grad=False, quant_type="nf4",
                                                 compress_statistics=True, blocksize=64).cuda()  # fmt: skip
                    setattr(module, child_name, q)
                    del child
        gc.collect()
        torch.cuda.empty_cache()
    config = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=dropout, target_modules=TARGETS, task_type="CAUSAL_LM")
    return peft.get_peft_model(model, config)


def enable_checkpointing(model, layers: int | None = None):
    """Non-reentrant checkpointing of every block, or of the first ``layers`` blocks only."""
    from lowbit.train.trainer import enable_gradient_checkpointing

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    enable_gradient_checkpointing(base, layers)
    base.enable_input_require_grads()


def run_steps(model, batch: int, seq: int, steps: int, warmup: int, device: str,
              flags: set[str] = frozenset()) -> dict:  # fmt: skip
    """flags (see parse_kind): graph, offload, adam8bit, embcpu (token ids stay on the CPU; the table is
    offloaded in `fresh`), dropout (acts in `fresh`)."""
    from lowbit.optim import AdamW8bit
    from lowbit.train.offload import offloaded_activations

    params = [p for p in model.parameters() if p.requires_grad]
    opt = AdamW8bit(params, lr=1e-4) if "adam8bit" in flags else torch.optim.AdamW(params, lr=1e-4)
    graph = "graph" in flags
    gen = torch.Generator(device="cpu").manual_seed(1)
    vocab = model.config.vocab_size
    labels = torch.randint(0, vocab, (steps + warmup, batch, seq), generator=gen)
    ids, labels = (labels if "embcpu" in flags else labels.to(device)), labels.to(device)  # CPU table: CPU ids
    graphed = MeasuredGraphedStep(model, opt, {"input_ids": ids[0], "labels": labels[0]}) if graph else None
    losses, start = [], None
    for i in range(steps + warmup):
        if i == warmup:
            sync(device)
            start = time.perf_counter()
        if graphed is not None:
            losses.append(graphed({"input_ids": ids[i], "labels": labels[i]}).clone())
            continue
        with offloaded_activations("offload" in flags, torch.device(device)):
            loss = model(input_ids=ids[i], labels=labels[i]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    sync(device)
    seconds = time.perf_counter() - start
    result = {"tokens_per_s": batch * seq * steps / seconds, "step_ms": 1e3 * seconds / steps,
              "losses": [round(x.item(), 4) for x in losses], "trainable": sum(p.numel() for p in params)}  # fmt: skip
    if graphed is not None and device.startswith("cuda"):  # is the graph's peak the eager step's, or more?
        result.update(warmup_peak_gib=graphed.warmup_peak / 2**30, after_capture_gib=graphed.after_capture / 2**30)
    return result


class MeasuredGraphedStep(GraphedStep):
    """GraphedStep noting the peak after its eager warm-up and what stays allocated after the capture."""

    warmup_peak = after_capture = 0

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if torch.cuda.is_available():
            self.after_capture = torch.cuda.memory_allocated()

    def _eager_step(self):
        loss = super()._eager_step()
        if torch.cuda.is_available():
            self.warmup_peak = torch.cuda.max_memory_allocated()
        return loss


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


FLAGS = ("graph", "offload", "adam8bit", "dropout", "embcpu", "norope")
DROPOUT = 0.05  # +dropout: LoRA dropout as the QLoRA paper (and `lowbit finetune`'s default) use it


def parse_kind(kind: str) -> tuple[str, int | None, set[str]]:
    """``name[@k][+flag…]``: @k checkpoints only the first k blocks (the rest keep their activations); +graph
    replays each training step as one CUDA graph; +offload keeps saved activations in pinned CPU memory;
    +adam8bit uses lowbit's 8-bit AdamW; +dropout gives the adapters LoRA dropout 0.05; +embcpu keeps the input
    embedding table in CPU memory; +norope leaves transformers' RoPE in place of the fused one.
    Returns (name, k or None, flags)."""
    parts, flags = kind.split("+"), set()
    while len(parts) > 1 and parts[-1] in FLAGS:  # "peft+bnb" is a name, not a flag
        flags.add(parts.pop())
    name, _, checkpointed = "+".join(parts).partition("@")
    return name, int(checkpointed) if checkpointed else None, flags


def fresh(kind: str, shape: dict, layers: int, device: str):
    name, checkpointed, flags = parse_kind(kind)
    dropout = DROPOUT if "dropout" in flags else 0.0
    model = build_model(shape, layers, device)
    if name in ("lowbit", "lowbit-fused"):
        model = lowbit_qlora(model, dropout)
    else:
        model = peft_lora(model, four_bit=name == "peft+bnb", dropout=dropout)
    enable_checkpointing(model, checkpointed)
    if name == "lowbit-fused":  # fused RMSNorm, SwiGLU, QLoRA linear and chunked cross-entropy (issue 8)
        log(f"  fused: {lowbit.kernels.fuse_for_training(model, rope='norope' not in flags)}")
    if "embcpu" in flags:  # the frozen input embedding table in CPU memory (lowbit.train.offload)
        from lowbit.train.offload import offload_embeddings

        offload_embeddings(model)
    model.train()
    return model


def free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def measure(kind: str, shape: dict, layers: int, batch: int, seq: int, steps: int, warmup: int, device: str):
    free(device)
    base_mem = torch.cuda.memory_allocated() if device.startswith("cuda") else 0
    try:
        model = fresh(kind, shape, layers, device)
        weights = torch.cuda.memory_allocated() - base_mem if device.startswith("cuda") else 0
        if device.startswith("cuda"):  # the training peak, not the bf16 model held before quantizing
            torch.cuda.reset_peak_memory_stats()
        result = run_steps(model, batch, seq, steps, warmup, device, parse_kind(kind)[2])
        peak = torch.cuda.max_memory_allocated() - base_mem if device.startswith("cuda") else 0
        result.update(peak_gib=peak / 2**30, weights_gib=weights / 2**30, oom=False)
    except torch.OutOfMemoryError:
        result = {"oom": True}
    except Exception as e:  # a contender that fails (e.g. a step that cannot be captured) is reported, not fatal
        log(f"{kind}: failed: {type(e).__name__}: {str(e)[:400]}")
        result = {"oom": True, "error": f"{type(e).__name__}: {str(e)[:400]}"}
    finally:
        model = None
        free(device)
    return result


def profile_lowbit(shape, layers, batch, seq, device, out: Path | None, kind: str = "lowbit",
                   shapes: bool = False) -> None:  # fmt: skip
    """A torch-profiler table of two steps by self time (on CUDA: kernel time); ``shapes`` adds a second table
    of the operators split by their input shapes (which matmul of a block the time goes to)."""
    from torch.profiler import ProfilerActivity, profile

    model = fresh(kind, shape, layers, device)
    flags = parse_kind(kind)[2]
    run_steps(model, batch, seq, 1, 2, device, flags)  # warm up (Triton autotune, allocator)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=activities, record_shapes=shapes) as prof:
        run_steps(model, batch, seq, 2, 0, device, flags)
    key = "self_cuda_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=50, max_name_column_width=60)
    if shapes:
        table += "\n\n" + prof.key_averages(group_by_input_shape=True).table(
            sort_by=key, row_limit=60, max_name_column_width=40, max_shapes_column_width=80)
    log(table)
    if out is not None:
        name = "qlora_profile" + ("" if kind == "lowbit" else "_" + kind.replace("@", "_ckpt").replace("+", "_"))
        (out / f"{name}.txt").write_text(table)
    del model
    free(device)


def longest_sequence(kind: str, shape: dict, layers: int, device: str, probes=(8192, 16384),
                     lengths: list[int] | None = None) -> dict:  # fmt: skip
    """The longest batch-1 sequence whose training step fits the GPU, for one model built once.

    Activation memory grows linearly with the sequence (flash attention, checkpointed blocks), so the
    peaks at two probe lengths give the line whose crossing of the card's memory predicts the limit;
    one step at that length (rounded down to 1024) checks it, and one 5 % shorter if it does not fit.
    """
    model = fresh(kind, shape, layers, device)
    total = torch.cuda.get_device_properties(0).total_memory

    def peak(seq: int) -> float | None:
        free(device)
        try:
            run_steps(model, 1, seq, 1, 0, device, parse_kind(kind)[2])
            return float(torch.cuda.max_memory_allocated())
        except torch.OutOfMemoryError:
            return None
        finally:
            model.zero_grad(set_to_none=True)
            free(device)

    if lengths:  # given lengths, tried in order up to the first that does not fit
        result = {}
        for seq in lengths:
            p = peak(seq)
            log(f"  {kind} seq {seq}: " + ("OOM" if p is None else f"fits, peak {p / 2**30:.1f} GiB"))
            result[seq] = None if p is None else p / 2**30
            if p is None:
                break
        del model
        free(device)
        return result
    (s1, s2), (p1, p2) = probes, [peak(p) for p in probes]
    if p1 is None or p2 is None:
        del model
        free(device)
        return {"probes": dict(zip(probes, (p1, p2))), "fits": None}
    slope = (p2 - p1) / (s2 - s1)
    predicted = int(s2 + (0.97 * total - p2) / slope) // 1024 * 1024
    result = {"probes_GiB": {s1: p1 / 2**30, s2: p2 / 2**30}, "GiB_per_1k_tokens": slope * 1024 / 2**30,
              "predicted": predicted}  # fmt: skip
    for seq in (predicted, int(predicted * 0.95) // 1024 * 1024):
        p = peak(seq)
        log(f"  {kind} seq {seq}: " + ("OOM" if p is None else f"fits, peak {p / 2**30:.1f} GiB"))
        if p is not None:
            result.update(fits=seq, peak_GiB=p / 2**30)
            break
    else:
        result["fits"] = None
    del model
    free(device)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny shape on the CPU, lowbit and bf16 LoRA only")
    parser.add_argument("--out", type=Path, help="write qlora_step.json and the profile here")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--configs", default="8:2048:1,8:2048:4,8:8192:1,32:2048:1",
                        help="layers:seq:batch,… to time")  # fmt: skip
    parser.add_argument("--kinds", default="lowbit,lowbit-fused,peft+bnb,bf16-lora",
                        help="contenders, comma-separated (lowbit-fused: lowbit.kernels.fuse_for_training)")
    parser.add_argument("--no-profile", action="store_true", help="skip the torch-profiler table")
    parser.add_argument("--profile-shapes", action="store_true", help="also split the profile by input shapes")
    parser.add_argument("--max-seq", action="store_true", help="search the longest sequence (32 layers, batch 1)")
    parser.add_argument("--seq-lengths", default="", help="with --max-seq: try these lengths (comma-separated) "
                        "in order instead of predicting from two probes")  # fmt: skip
    args = parser.parse_args()
    device = "cpu" if args.tiny else "cuda"
    shape = TINY if args.tiny else LLAMA3_8B
    kinds = [k for k in args.kinds.split(",") if not (args.tiny and k == "peft+bnb")]
    configs = [tuple(int(v) for v in c.split(":")) for c in args.configs.split(",") if c]
    if args.tiny:
        configs = [(2, 64, 2)]
    if device == "cuda":
        log(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    results = []
    for layers, seq, batch in configs:
        row = {"layers": layers, "seq": seq, "batch": batch}
        for kind in kinds:
            row[kind] = measure(kind, shape, layers, batch, seq, args.steps, 2, device)
            r = row[kind]
            log(f"{layers} layers seq {seq} batch {batch} {kind}: " + ("OOM" if r["oom"] else
                f"{r['tokens_per_s']:.0f} tok/s, {r['step_ms']:.1f} ms/step, peak {r['peak_gib']:.2f} GiB, "
                f"weights {r['weights_gib']:.2f} GiB, losses {r['losses'][:3]}…"
                + (f", warm-up peak {r['warmup_peak_gib']:.2f} GiB, kept after capture {r['after_capture_gib']:.2f} GiB"
                   if "warmup_peak_gib" in r else "")))  # fmt: skip
        results.append(row)
    log("\n| layers | seq | batch | lowbit tok/s | peft+bnb tok/s | bf16-LoRA tok/s | × peft+bnb | lowbit GiB | "
        "peft+bnb GiB | bf16-LoRA GiB |\n|---|---|---|---|---|---|---|---|---|---|")  # fmt: skip
    for row in results:
        def cell(kind, key, fmt):
            r = row.get(kind)
            return "-" if r is None else ("OOM" if r["oom"] else format(r[key], fmt))

        ratio = "-"
        if "lowbit" in row and not row["lowbit"]["oom"] and "peft+bnb" in row and not row["peft+bnb"]["oom"]:
            ratio = f"{row['lowbit']['tokens_per_s'] / row['peft+bnb']['tokens_per_s']:.2f}"
        log(f"| {row['layers']} | {row['seq']} | {row['batch']} | {cell('lowbit', 'tokens_per_s', '.0f')} | "
            f"{cell('peft+bnb', 'tokens_per_s', '.0f')} | {cell('bf16-lora', 'tokens_per_s', '.0f')} | {ratio} | "
            f"{cell('lowbit', 'peak_gib', '.2f')} | {cell('peft+bnb', 'peak_gib', '.2f')} | "
            f"{cell('bf16-lora', 'peak_gib', '.2f')} |")  # fmt: skip
    fused = [k for k in kinds if k.startswith("lowbit-fused")]
    if fused:  # issue 8's goal: ≥ 2× peft+bnb tokens/s at ≤ its peak memory
        log("\n| layers | seq | batch | contender | tok/s | × lowbit | × peft+bnb | GiB "
            "| GiB ÷ peft+bnb |\n|---|---|---|---|---|---|---|---|---|")  # fmt: skip

    def ratio(row, kind, key, other):
        a, b = row[kind], row.get(other)
        return "-" if a["oom"] or b is None or b["oom"] or not b[key] else f"{a[key] / b[key]:.2f}"

    for row in results:
        for kind in fused:
            r = row[kind]
            speed, mem = ("OOM", "OOM") if r["oom"] else (f"{r['tokens_per_s']:.0f}", f"{r['peak_gib']:.2f}")
            log(f"| {row['layers']} | {row['seq']} | {row['batch']} | {kind} | {speed} | "
                f"{ratio(row, kind, 'tokens_per_s', 'lowbit')} | {ratio(row, kind, 'tokens_per_s', 'peft+bnb')} | "
                f"{mem} | {ratio(row, kind, 'peak_gib', 'peft+bnb')} |")  # fmt: skip
    if not args.no_profile and configs:
        layers, seq, batch = configs[0]
        for kind in [k for k in kinds if k.startswith("lowbit")]:
            profile_lowbit(shape, layers, batch, seq, device, args.out, kind, args.profile_shapes)
    if args.max_seq and not args.tiny:
        longest = {}
        for kind in kinds:  # in the order given: a cheap peer first, in case the run is cut short
            lengths = [int(v) for v in args.seq_lengths.split(",") if v]
            longest[kind] = longest_sequence(kind, shape, 32, device, lengths=lengths)
            log(f"longest sequence, 32 layers, batch 1, {kind}: {longest[kind]}")
        log(f"longest sequence, 32 layers, batch 1: {longest}")
        results.append({"longest_sequence": longest})
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "qlora_step.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
