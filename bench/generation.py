"""Generation tokens/s at batch 1 on a Llama-3-8B-shaped model (random weights): lowbit NF4 vs transformers +
bitsandbytes NF4 vs bf16.

Each model decodes two ways: transformers' `model.generate` (dynamic KV cache, eager: what users run today),
and lowbit's `generate_ids` with its static KV cache, one CUDA graph replayed per token (`static_cache=True`).
bitsandbytes' layers run in both, so the second way also compares the 4-bit kernels under equal conditions.
(transformers' own static cache under `torch.compile(mode="reduce-overhead")` failed for every model in an
earlier run: bench/RESULTS.md.)

Greedy, a 16-token prompt, exactly --new tokens (EOS ignored), after a short warm-up generation (kernel
autotuning). tok/s = new tokens / wall time including the prompt (and, for lowbit, the graph capture); the
steady per-token time is also reported. Checks that each model's two ways give the same first tokens.

    python3 bench/generation.py --out $OUT          # on a GPU; bitsandbytes from its carried wheel
    python3 bench/generation.py --tiny              # CPU smoke run on a tiny shape (eager only)
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "src"), str(Path(__file__).resolve().parent)]

import lowbit  # noqa: E402
from lowbit.generate import GenerateConfig, KVDecoder, iter_tokens  # noqa: E402
from lowbit.generate.static import StaticDecoder  # noqa: E402
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


def hf_generate(model, prompt: torch.Tensor, new: int) -> tuple[dict, list[int]]:
    kwargs = dict(do_sample=False, pad_token_id=0)
    with torch.no_grad():
        model.generate(prompt, max_new_tokens=8, min_new_tokens=8, **kwargs)  # warm-up: autotuning
        sync(prompt.device)
        start = time.perf_counter()
        out = model.generate(prompt, max_new_tokens=new, min_new_tokens=new, **kwargs)
        sync(prompt.device)
    seconds = time.perf_counter() - start
    return {"tok_s": new / seconds, "ms_per_token": 1e3 * seconds / new}, out[0, prompt.shape[1] :].tolist()


def lowbit_generate(model, prompt: torch.Tensor, new: int, fused_ops: bool = False) -> tuple[dict, list[int]]:
    """lowbit's decoder with the static cache; each token is on the host when yielded (its .tolist() syncs)."""

    def run(n: int) -> tuple[list[float], list[int]]:
        config = GenerateConfig(max_new_tokens=n, eos_token_id=(), static_cache=True, fused_ops=fused_ops)
        stamps, tokens = [time.perf_counter()], []
        for (token,) in iter_tokens(model, prompt, config):
            stamps.append(time.perf_counter())
            tokens.append(token)
        return stamps, tokens

    run(8)  # warm-up: autotuning at the prompt's and the step's shapes
    stamps, tokens = run(new)
    total = stamps[-1] - stamps[0]
    steady = (stamps[-1] - stamps[2]) / (new - 2)  # after the first step's capture
    return {"tok_s": new / total, "ms_per_token": 1e3 * steady, "prefill_capture_ms": 1e3 * (stamps[2] - stamps[0])}, tokens


def logit_check(model, prompt: torch.Tensor, n: int = 32) -> dict:
    """Teacher-forced logits of n steps, static decoder (graph) and transformers' dynamic cache, against the
    uncached forward over the whole sequence: the static path should be as close as the dynamic one."""
    forced = torch.randint(0, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(1))
    forced = forced.to(prompt.device)
    with torch.no_grad():
        want = model(input_ids=torch.cat([prompt, forced], 1)).logits[0, prompt.shape[1] - 1 :].float()  # (n+1, V)
    result = {"logit_scale": want.abs().max().item()}
    decoders = {"static": StaticDecoder(model, prompt, prompt.shape[1] + n),
                "static + fused ops": StaticDecoder(model, prompt, prompt.shape[1] + n, fused_ops=True),
                "dynamic": KVDecoder(model, prompt)}  # fmt: skip
    for name, decoder in decoders.items():
        got = torch.cat([decoder.forward(prompt).clone()] + [decoder.advance(forced[:, i]).clone() for i in range(n)])
        result[name] = {"max_abs": (got - want).abs().max().item(),
                        "argmax_agree": (got.argmax(-1) == want.argmax(-1)).float().mean().item()}  # fmt: skip
    return result


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


WAYS = {"transformers generate": hf_generate, "lowbit static + CUDA graph": lowbit_generate,
        "lowbit static + CUDA graph + fused ops": functools.partial(lowbit_generate, fused_ops=True)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--new", type=int, default=256)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--check-only", action="store_true", help="only the teacher-forced logit check")
    parser.add_argument("--kinds", help="comma-separated subset of bnb-nf4, lowbit-nf4, bf16")
    parser.add_argument("--ways", help="comma-separated subset of the ways' numbers: 0 transformers generate, "
                        "1 lowbit static + CUDA graph, 2 ... + fused ops (default all)")  # fmt: skip
    args = parser.parse_args()
    device = "cpu" if args.tiny else "cuda"
    shape, layers = (TINY, 2) if args.tiny else (LLAMA3_8B, args.layers)
    kinds = ["bnb-nf4", "lowbit-nf4", "bf16"] if not args.tiny else ["lowbit-nf4", "bf16"]
    kinds = args.kinds.split(",") if args.kinds else kinds
    ways = {w: fn for i, (w, fn) in enumerate(WAYS.items()) if not args.ways or str(i) in args.ways.split(",")}
    prompt = torch.randint(0, shape["vocab_size"], (1, 16), generator=torch.Generator().manual_seed(0)).to(device)
    results: dict[str, dict | None] = {}
    for kind in kinds:
        model = prepare(kind, shape, layers, device)
        tokens = {}
        for way, fn in {} if args.check_only else ways.items():
            key = f"{kind} · {way}"
            try:
                results[key], tokens[way] = fn(model, prompt, args.new)
                log(f"{key}: {results[key]}, first tokens {tokens[way][:8]}")
            except Exception as e:  # a contender that fails is reported, not fatal
                results[key] = None
                log(f"{key}: failed: {type(e).__name__}: {str(e)[:300]}")
        try:
            results[f"{kind} · logits vs uncached forward"] = check = logit_check(model, prompt)
            log(f"{kind}: teacher-forced logits vs the uncached forward: {check}")
        except Exception as e:
            log(f"{kind}: logit check failed: {type(e).__name__}: {str(e)[:300]}")
        if len(tokens) >= 2:
            a, b = list(tokens.values())[:2]
            agree = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
            results[f"{kind} · tokens agreeing from the start"] = agree
            log(f"{kind}: the two ways agree on the first {agree} of {len(a)} greedy tokens")
        del model
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    if args.check_only:
        kinds = []  # no timings to tabulate
    log("\n| model | " + " | ".join(f"{w} tok/s (ms/token)" for w in ways) + " |\n|---|" + "---|" * len(ways))
    for kind in kinds:
        cells = [results.get(f"{kind} · {w}") for w in ways]
        log(f"| {kind} | " + " | ".join("failed" if c is None else f"{c['tok_s']:.1f} ({c['ms_per_token']:.2f})"
                                        for c in cells) + " |")  # fmt: skip
    peer = results.get("bnb-nf4 · transformers generate")
    for way in list(WAYS)[1:]:
        ours = results.get(f"lowbit-nf4 · {way}")
        if peer and ours:
            log(f"lowbit NF4 ({way}) / transformers + bnb NF4 (generate): {ours['tok_s'] / peer['tok_s']:.2f}×")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "generation.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
