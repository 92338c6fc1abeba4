"""Generation tokens/s at batch 1 on a Llama-3-8B-shaped model (random weights): lowbit NF4 vs transformers +
bitsandbytes NF4 vs bf16, each eager (dynamic KV cache, what `generate` does by default) and compiled
(static KV cache + `torch.compile(mode="reduce-overhead")`, i.e. CUDA graphs).

Greedy, a 16-token prompt, exactly --new tokens (EOS ignored); one warm-up generation (compilation, autotune)
before the timed one. Also checks that lowbit's NF4 model and bnb's produce the same first tokens.

    python3 bench/generation.py --out $OUT          # on a GPU; bitsandbytes from its carried wheel
    python3 bench/generation.py --tiny              # CPU smoke run on a tiny shape (eager only)
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "src"), str(Path(__file__).resolve().parent)]

import lowbit  # noqa: E402
from qlora_step import LLAMA3_8B, TARGETS, TINY, build_model, log  # noqa: E402


def to_bnb(model):
    import bitsandbytes as bnb

    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear) and name in TARGETS:
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=False, compute_dtype=torch.bfloat16,
                                      compress_statistics=True, quant_type="nf4", device="meta")  # fmt: skip
                q.weight = bnb.nn.Params4bit(child.weight.data.cpu(), requires_grad=False, quant_type="nf4",
                                             compress_statistics=True, blocksize=64).to(child.weight.device)  # fmt: skip
                setattr(module, name, q)
    return model


def prepare(kind: str, shape: dict, layers: int, device: str):
    model = build_model(shape, layers, device).eval()
    model.config.use_cache = True
    if kind == "lowbit-nf4":
        lowbit.quantize(model, lowbit.QuantConfig(format="nf4", block_size=64, double_quant=True))
    elif kind == "bnb-nf4":
        model = to_bnb(model)
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return model


def generate_timed(model, prompt: torch.Tensor, new: int, compiled: bool) -> tuple[float, torch.Tensor]:
    kwargs = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    if compiled:
        kwargs["cache_implementation"] = "static"
    with torch.no_grad():
        # warm-up: compilation and CUDA graphs need the timed run's cache length; eager only the autotune
        model.generate(prompt, **(kwargs if compiled else {**kwargs, "max_new_tokens": 8, "min_new_tokens": 8}))
        sync(prompt.device)
        start = time.perf_counter()
        out = model.generate(prompt, **kwargs)
        sync(prompt.device)
    return new / (time.perf_counter() - start), out[0, prompt.shape[1] :]


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--new", type=int, default=256)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    device = "cpu" if args.tiny else "cuda"
    shape, layers = (TINY, 2) if args.tiny else (LLAMA3_8B, args.layers)
    kinds = ["bf16", "lowbit-nf4"] + ([] if args.tiny else ["bnb-nf4"])
    modes = [False] if args.tiny else [False, True]
    prompt = torch.randint(0, shape["vocab_size"], (1, 16), generator=torch.Generator().manual_seed(0)).to(device)
    results, tokens = {}, {}
    for kind in kinds:
        model = prepare(kind, shape, layers, device)
        for compiled in modes:
            key = f"{kind} {'compiled' if compiled else 'eager'}"
            if compiled:
                model.forward = torch.compile(model.forward, mode="reduce-overhead")
            try:
                rate, out = generate_timed(model, prompt, args.new, compiled)
                results[key], tokens[key] = rate, out
                log(f"{key}: {rate:.1f} tok/s, first tokens {out[:8].tolist()}")
            except Exception as e:  # a peer that does not compile is reported, not fatal
                results[key] = None
                log(f"{key}: failed: {type(e).__name__}: {str(e)[:300]}")
        del model
        gc.collect()
        torch._dynamo.reset()
        if device == "cuda":
            torch.cuda.empty_cache()
    log("\n| model | eager tok/s | compiled tok/s |\n|---|---|---|")
    for kind in kinds:
        cells = [results.get(f"{kind} {m}") for m in ("eager", "compiled")]
        log(f"| {kind} | " + " | ".join("-" if c is None else f"{c:.1f}" for c in cells) + " |")
    best = {k: max((v for key, v in results.items() if key.startswith(k) and v), default=None) for k in kinds}
    if best.get("bnb-nf4") and best.get("lowbit-nf4"):
        log(f"lowbit best / bnb best: {best['lowbit-nf4'] / best['bnb-nf4']:.2f}×; lowbit compiled / bnb eager: "
            f"{(results.get('lowbit-nf4 compiled') or 0) / (results.get('bnb-nf4 eager') or 1):.2f}×")  # fmt: skip
    if "lowbit-nf4 eager" in tokens and "bnb-nf4 eager" in tokens:
        same = (tokens["lowbit-nf4 eager"][:16] == tokens["bnb-nf4 eager"][:16]).float().mean().item()
        log(f"lowbit vs bnb NF4 greedy tokens agreeing in the first 16: {same:.0%}")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "generation.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
