"""`lowbit <command>`: each command parses its arguments and calls one library function."""

from __future__ import annotations

import argparse
import sys

FORMAT_HELP = ("nf4 | fp4 | e2m1 (4-bit codebooks, blockwise absmax) | int2 | int3 | int4 | int8 | fp8_e4m3 | fp8_e5m2")  # fmt: skip
MODEL_HELP = 'a model: "smollm2-135m" (packaged default), a local transformers directory or a .gguf file'


def _demo(args) -> None:
    from lowbit.demo import DemoConfig, run_demo

    run_demo(DemoConfig(model=args.model, format=args.format, windows=args.windows,
                        max_new_tokens=args.max_new_tokens))  # fmt: skip


def _quantize(args) -> None:
    import lowbit

    model, tokenizer = lowbit.load_model(args.model)
    config = lowbit.QuantConfig(
        format=args.format, block_size=args.block_size, double_quant=not args.no_double_quant,
        group_size=args.group_size, symmetric=not args.affine, compute_dtype=args.compute_dtype,
        exclude=tuple(args.exclude),
    )  # fmt: skip
    report = lowbit.quantize(model, config, progress=True)
    print(report.to_markdown() if args.verbose else report)
    path = lowbit.save_quantized(model, args.out, tokenizer=tokenizer)
    print(f"saved to {path}")


def _perplexity(args) -> None:
    from pathlib import Path

    import lowbit
    from lowbit.io.quantized import META_FILE

    if (Path(args.model) / META_FILE).is_file():
        from transformers import AutoTokenizer

        model = lowbit.load_quantized(args.model)
        tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    else:
        model, tokenizer = lowbit.load_model(args.model)
    text = open(args.text, encoding="utf-8").read() if args.text else lowbit.evaluate.reference_text()
    ppl = lowbit.evaluate.perplexity(model, tokenizer, text, context_length=args.context_length,
                                     stride=args.stride or args.context_length, max_windows=args.windows,
                                     show_progress=True)  # fmt: skip
    print(f"perplexity {ppl:.4f}")


def _compare(args) -> None:
    from lowbit.quantize.compare import CompareConfig, compare_methods, to_markdown, write_results

    config = CompareConfig(model=args.model, settings=tuple(args.settings), n_samples=args.samples,
                           seq_len=args.seq_len, windows=args.windows, context_length=args.context_length)  # fmt: skip
    rows = compare_methods(config)
    print(to_markdown(rows, config))
    paths = write_results(rows, config, args.out)
    print("wrote " + ", ".join(str(p) for p in paths.values()))


def _add_compare(sub) -> None:
    from lowbit.quantize.compare import SETTINGS

    p = sub.add_parser("compare", help="quantize a model with every PTQ method and compare perplexity vs bits",
                       description="Quantize a fresh copy of the model with each setting (RTN, LLM.int8(), SmoothQuant "
                       "W8A8, GPTQ, SpQR at a few bit widths), measure bits/param, model bytes, token-level "
                       "perplexity on fixed non-overlapping windows of lowbit's reference text (calibration comes "
                       "from a disjoint part of it) and the time to quantize; print a table and write "
                       "compare.md, compare.csv and compare.png (perplexity vs bits) to --out. Takes minutes "
                       "on a CPU: calibrated methods run the model block by block over the calibration set.")  # fmt: skip
    p.add_argument("--model", default="smollm2-135m", help=MODEL_HELP)
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), metavar="NAME",
                   help=f"settings to run (default: all): {', '.join(SETTINGS)}")  # fmt: skip
    p.add_argument("--samples", type=int, default=32, help="calibration windows (GPTQ, SpQR, SmoothQuant)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per calibration window")
    p.add_argument("--windows", type=int, default=8, help="evaluation windows for perplexity")
    p.add_argument("--context-length", type=int, default=512, help="tokens per evaluation window")
    p.add_argument("--out", default="ptq-compare", help="directory for compare.md / .csv / .png")
    p.set_defaults(func=_compare)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lowbit",
        description="Quantize language models and fine-tune them parameter-efficiently. "
        "Run `lowbit <command> --help` for each command.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="quantize the default model to NF4 and compare it with fp32",
                       description="Load SmolLM2-135M-Instruct, measure memory, perplexity and a chat answer in "
                       "fp32, quantize (NF4 + double quantization by default) and measure again.")  # fmt: skip
    p.add_argument("--model", default="smollm2-135m", help=MODEL_HELP)
    p.add_argument("--format", default="nf4", help=FORMAT_HELP)
    p.add_argument("--windows", type=int, default=16, help="number of 512-token text windows for perplexity")
    p.add_argument("--max-new-tokens", type=int, default=40, help="length of each generated answer")
    p.set_defaults(func=_demo)

    p = sub.add_parser("quantize", help="quantize a model (round-to-nearest) and save it",
                       description="Quantize every linear layer except lm_head and save safetensors + JSON that "
                       "`lowbit perplexity` and lowbit.load_quantized read back without re-quantizing.")  # fmt: skip
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--format", default="nf4", help=FORMAT_HELP)
    p.add_argument("--block-size", type=int, default=64, help="values per absmax block (4-bit codebook formats)")
    p.add_argument("--no-double-quant", action="store_true", help="keep the absmax constants in fp32")
    p.add_argument("--group-size", type=int, default=None, help="values per scale for int/fp8 (default: per row)")
    p.add_argument("--affine", action="store_true", help="int formats: scale + zero point instead of symmetric")
    p.add_argument("--compute-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--exclude", nargs="*", default=["lm_head"], help="module name patterns to keep unquantized")
    p.add_argument("-v", "--verbose", action="store_true", help="print the per-layer table")
    p.set_defaults(func=_quantize)

    p = sub.add_parser("perplexity", help="token-level perplexity of a model on a text",
                       description="Sliding-window perplexity (non-overlapping when --stride is omitted) of a "
                       "model or a saved quantized model, on a UTF-8 text file or lowbit's offline reference "
                       "text.")  # fmt: skip
    p.add_argument("model", help=MODEL_HELP + ", or a directory written by `lowbit quantize`")
    p.add_argument("--text", help="UTF-8 text file (default: Python's reference topics, offline)")
    p.add_argument("--context-length", type=int, default=512)
    p.add_argument("--stride", type=int, default=None, help="tokens between window starts (default: context length)")
    p.add_argument("--windows", type=int, default=32, help="maximum number of windows")
    p.set_defaults(func=_perplexity)

    _add_compare(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as e:
        print(f"lowbit {args.command}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
