"""Fused vs unfused QLoRA on SmolLM2-135M: do the two paths give the same loss curve? (issue 8)

One QLoRA model (NF4 + double quant, block 64; LoRA r = 16, α = 32 on every linear layer of the blocks,
B initialised random so the adapters change the output from step 0), deep-copied; the copy goes through
`lowbit.kernels.fuse_for_training` (fused RMSNorm, SwiGLU MLP, QLoRA linear and chunked cross-entropy;
backend "auto": Triton on CUDA, the torch references on the CPU). Both then take the same --steps AdamW
steps on the same batches: fixed windows of --seq tokens of data/instruct/train.jsonl (chat-templated,
concatenated, cut, shuffled with a fixed seed), labels = inputs. Printed: the loss of each path every 10
steps, max |Δloss|, max relative Δ, first → last loss and tokens/s of each (over the steps after the first,
which carries Triton's compile on CUDA). On the CPU the base model is float32; on CUDA bfloat16 (as a user
would load it), LoRA adapters float32 in both.

    OMP_NUM_THREADS=1 python bench/fused_vs_unfused.py --steps 50 --seq 128            # CPU, a few minutes
    python3 bench/fused_vs_unfused.py --device cuda --steps 50 --seq 512 --out $OUT     # GPU (bf16 base)

--out DIR writes DIR/fused_vs_unfused.json (settings, both loss curves, the summary). On CUDA an exception
in the fused path is caught and reported; the unfused numbers are still printed and written.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src")]

import lowbit  # noqa: E402
from lowbit.kernels import fuse_for_training  # noqa: E402
from lowbit.kernels.dispatch import triton_available  # noqa: E402


def log(*a) -> None:
    print(*a, flush=True)


def batches(tokenizer, path: Path, seq: int, batch: int, steps: int, seed: int) -> list[torch.Tensor]:
    """steps × (batch, seq) token windows cut from the chat-templated records of `path`, seeded order."""
    stream: list[int] = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        messages = json.loads(line)["messages"]
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template(messages, tokenize=False)
        else:
            text = "\n".join(f"{m['role']}: {m['content']}" for m in messages)
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    windows = [stream[i : i + seq] for i in range(0, len(stream) - seq + 1, seq)]
    need = steps * batch
    if len(windows) < need:
        raise SystemExit(f"{path} gives {len(windows)} windows of {seq} tokens; {need} needed")
    random.Random(seed).shuffle(windows)
    ids = torch.tensor(windows[:need], dtype=torch.long)
    return list(ids.view(steps, batch, seq))


def train(model, data: list[torch.Tensor], lr: float, device: str, record: list[float]) -> float:
    """AdamW steps over `data`, appending each step's loss to `record`; returns seconds of steps 2…N."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    start = None
    for i, ids in enumerate(data):
        if i == 1:
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        ids = ids.to(device)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        record.append(loss.item())  # .item() syncs, so the timing covers the GPU work
    return time.perf_counter() - start if start is not None else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fp32", action="store_true", help="float32 base on CUDA too (default there: bfloat16)")
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "instruct" / "train.jsonl")
    parser.add_argument("--out", type=Path, default=None, help="directory for fused_vs_unfused.json")
    parser.add_argument("--random-init", type=Path, default=None, metavar="DIR",
                        help="SmolLM2's config.json and tokenizer from DIR, weights random (seeded): for a GPU "
                             "machine without the packaged model (~/.cache/lowbit/smollm2-135m-instruct minus "
                             "model.safetensors)")  # fmt: skip
    args = parser.parse_args()
    device = args.device
    dtype = torch.float32 if device == "cpu" or args.fp32 else torch.bfloat16

    torch.manual_seed(args.seed)
    if args.random_init is None:
        model, tokenizer = lowbit.load_model("smollm2-135m", dtype=dtype)
    else:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        config = AutoConfig.from_pretrained(args.random_init, local_files_only=True)
        model = AutoModelForCausalLM.from_config(config).to(dtype)
        tokenizer = AutoTokenizer.from_pretrained(args.random_init, local_files_only=True)
    model.config.use_cache = False
    model.to(device)
    lowbit.quantize(model, lowbit.QuantConfig(format="nf4", block_size=64, double_quant=True))
    torch.manual_seed(args.seed)  # the adapters' random init
    model = lowbit.peft.apply_lora(model, lowbit.peft.LoraConfig(r=16, alpha=32, init_lora_weights=False))
    model.to(device)
    data = batches(tokenizer, args.data, args.seq, args.batch, args.steps, args.seed)
    tokens = args.batch * args.seq * (args.steps - 1)  # the timed steps

    fused = copy.deepcopy(model)
    counts = fuse_for_training(fused)  # backend "auto"
    probe = torch.empty(0, device=device)
    backend = "triton" if (probe.is_cuda and triton_available()) else "torch references"
    log(f"SmolLM2-135M{' (random weights)' if args.random_init else ''} {str(dtype).removeprefix('torch.')} on {device}"
        f"{' (' + torch.cuda.get_device_name() + ')' if device == 'cuda' else ''}; NF4+DQ b64, LoRA r16 α32 "
        f"all-linear; {args.steps} steps × {args.batch} × {args.seq} tokens, AdamW lr {args.lr}")  # fmt: skip
    log(f"fuse_for_training: {counts}; fused ops run: {backend}")

    unfused_losses: list[float] = []
    t_unfused = train(model, data, args.lr, device, unfused_losses)
    log(f"unfused: {unfused_losses[0]:.4f} → {unfused_losses[-1]:.4f}, {tokens / t_unfused:.0f} tokens/s")
    del model
    if device == "cuda":
        torch.cuda.empty_cache()

    fused_losses: list[float] = []
    error = None
    t_fused = float("nan")
    try:
        t_fused = train(fused, data, args.lr, device, fused_losses)
    except Exception as exc:  # report, keep the unfused numbers (on the CPU a failure is a bug: re-raise)
        if device != "cuda":
            raise
        error = "".join(traceback.format_exception(exc))
        log(f"FUSED PATH FAILED at step {len(fused_losses) + 1}:\n{error}")

    log("\n| step | unfused loss | fused loss | |Δ| |\n|---:|---:|---:|---:|")
    for i in range(args.steps):
        if i == 0 or (i + 1) % 10 == 0 or i == args.steps - 1:
            f = fused_losses[i] if i < len(fused_losses) else float("nan")
            log(f"| {i + 1} | {unfused_losses[i]:.6f} | {f:.6f} | {abs(f - unfused_losses[i]):.2e} |")

    pairs = list(zip(unfused_losses, fused_losses))
    summary = {
        "device": device if device == "cpu" else f"cuda ({torch.cuda.get_device_name()})",
        "base_dtype": str(dtype).removeprefix("torch."),
        "fused_backend": backend,
        "fused_counts": counts,
        "steps_compared": len(pairs),
        "max_abs_dloss": max((abs(a - b) for a, b in pairs), default=None),
        "max_rel_dloss": max((abs(a - b) / abs(a) for a, b in pairs), default=None),
        "unfused_first_last": [unfused_losses[0], unfused_losses[-1]],
        "fused_first_last": [fused_losses[0], fused_losses[-1]] if fused_losses else None,
        "unfused_tokens_per_s": tokens / t_unfused,
        "fused_tokens_per_s": tokens / t_fused if fused_losses and len(fused_losses) == args.steps else None,
        "fused_error": error,
    }
    log("\nsummary:")
    for key, value in summary.items():
        if key != "fused_error" or value:
            log(f"  {key}: {value}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        record = {"settings": settings, "summary": summary, "unfused_losses": unfused_losses,
                  "fused_losses": fused_losses}  # fmt: skip
        (args.out / "fused_vs_unfused.json").write_text(json.dumps(record, indent=1))
        log(f"wrote {args.out / 'fused_vs_unfused.json'}")


if __name__ == "__main__":
    main()
