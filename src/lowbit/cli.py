"""`lowbit <command>`: each command parses its arguments and calls one library function."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

FORMAT_HELP = ("nf4 | fp4 | e2m1 (4-bit codebooks, blockwise absmax) | int2 | int3 | int4 | int8 | fp8_e4m3 | fp8_e5m2")  # fmt: skip
MODEL_HELP = 'a model: "smollm2-135m" (packaged default), a local transformers directory or a .gguf file'


def _demo(args) -> None:
    from lowbit.demo import DemoConfig, run_demo

    run_demo(DemoConfig(model=args.model, format=args.format, windows=args.windows,
                        max_new_tokens=args.max_new_tokens, finetune_steps=args.finetune_steps))  # fmt: skip


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
                           seq_len=args.seq_len, windows=args.windows, context_length=args.context_length,
                           device=args.device)  # fmt: skip
    rows = compare_methods(config)
    print(to_markdown(rows, config))
    paths = write_results(rows, config, args.out)
    print("wrote " + ", ".join(str(p) for p in paths.values()))


def _add_compare(sub) -> None:
    from lowbit.quantize.compare import SETTINGS

    p = sub.add_parser("compare", help="quantize a model with every PTQ method and compare perplexity vs bits",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Quantize a fresh copy of the model with each setting (RTN, LLM.int8(), SmoothQuant "
                       "W8A8, GPTQ, SpQR at a few bit widths), measure bits/param, model bytes, token-level "
                       "perplexity on fixed non-overlapping windows of lowbit's reference text (calibration comes "
                       "from a disjoint part of it) and the time to quantize; print a table and write "
                       "compare.md, compare.csv and compare.png (perplexity vs bits) to --out. Takes minutes "
                       "on a CPU: calibrated methods run the model block by block over the calibration set."
                       "\n\nexamples:\n"
                       "  lowbit compare --out ptq-compare\n"
                       "  lowbit compare --settings fp32 rtn-nf4 gptq-int4-g128 --samples 16 --windows 4")  # fmt: skip
    p.add_argument("--model", default="smollm2-135m", help=MODEL_HELP)
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), metavar="NAME",
                   help=f"settings to run (default: all): {', '.join(SETTINGS)}")  # fmt: skip
    p.add_argument("--samples", type=int, default=32, help="calibration windows (GPTQ, SpQR, SmoothQuant)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per calibration window")
    p.add_argument("--windows", type=int, default=8, help="evaluation windows for perplexity")
    p.add_argument("--context-length", type=int, default=512, help="tokens per evaluation window")
    p.add_argument("--device", default="cpu", help="where to quantize and evaluate: cpu (default), cuda, cuda:1, …")
    p.add_argument("--out", default="ptq-compare", help="directory for compare.md / .csv / .png")
    p.set_defaults(func=_compare)


# --- generate / chat / eval / prune / export (thin shells over lowbit.generate, .evaluate, .prune, .io) ---------


def _load_any(name: str):
    from lowbit.io import load_any

    return load_any(name)


def _add_decoding_options(p) -> None:
    g = p.add_argument_group("decoding")
    g.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate at most (default 128)")
    g.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = off)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0 = off)")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="CTRL penalty on repeated tokens (1.0 = off)")
    g.add_argument("--num-beams", type=int, default=1, help="beam search with this many beams (1 = off)")
    g.add_argument("--length-penalty", type=float, default=1.0, help="beam score = log p / length^this")
    g.add_argument("--stop", nargs="*", default=[], metavar="TEXT", help=r"stop strings (escapes like \n work)")
    g.add_argument("--seed", type=int, default=None, help="seed for sampling")
    g.add_argument("--static-cache", action=argparse.BooleanOptionalAction, default=None,
                   help="lowbit's preallocated KV cache and fixed-shape step, replayed as a CUDA graph on a GPU "
                        "(default: on for Llama/Mistral/Qwen-layout models on CUDA)")  # fmt: skip
    g.add_argument("--fused-ops", action=argparse.BooleanOptionalAction, default=None,
                   help="with the static cache: lowbit's fused RMSNorm / rotary / SwiGLU kernels in each step "
                        "(default: on CUDA)")  # fmt: skip


def _generate_config(args):
    import codecs

    from lowbit.generate import GenerateConfig

    return GenerateConfig(max_new_tokens=args.max_new_tokens, do_sample=args.sample, temperature=args.temperature,
                          top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                          num_beams=args.num_beams, length_penalty=args.length_penalty, seed=args.seed,
                          static_cache=args.static_cache, fused_ops=args.fused_ops,
                          stop_strings=tuple(codecs.decode(s, "unicode_escape") for s in args.stop))  # fmt: skip


def _generate(args) -> None:
    from lowbit.generate import ChatSession, load_few_shot, stream

    prompts = list(args.prompt or [])
    if args.prompt_file:
        prompts.append(Path(args.prompt_file).read_text(encoding="utf-8"))
    if not prompts:
        raise ValueError("give a prompt with --prompt TEXT or --prompt-file FILE")
    model, tokenizer = _load_any(args.model)
    config, shots = _generate_config(args), load_few_shot(args.few_shot) if args.few_shot else None
    for prompt in prompts:
        if args.chat:
            pieces = ChatSession(model, tokenizer, config, system=args.system, few_shot=shots).stream(prompt)
        else:
            pieces = stream(model, tokenizer, shots.text(prompt) if shots else prompt, config)
        if args.no_stream:
            print("".join(pieces))
            continue
        for piece in pieces:
            print(piece, end="", flush=True)
        print()


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt (greedy, sampling or beam search)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Complete prompts with any model lowbit loads (quantized ones included), "
                       "streaming the text as it is produced.\n\nexamples:\n"
                       "  lowbit generate smollm2-135m --chat --prompt 'What is the capital of France?'\n"
                       "  lowbit generate ./smollm2-nf4 --prompt 'Once upon a time' --sample --top-p 0.9 --seed 0\n"
                       "  lowbit generate smollm2-135m --prompt 'Q: 2+2?\\nA:' --num-beams 4 --stop '\\n'\n"
                       "  lowbit generate smollm2-135m --chat --few-shot shots.json --prompt 'Capital of Peru?'")  # fmt: skip
    p.add_argument("model", help=MODEL_HELP + ", a `lowbit quantize` directory or a bitsandbytes 4-bit checkpoint")
    p.add_argument("--prompt", action="append", help="prompt text (repeat for several prompts)")
    p.add_argument("--prompt-file", help="a UTF-8 file whose whole content is one prompt")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--system", help="system message (with --chat)")
    p.add_argument("--few-shot", help="few-shot template file (JSON/YAML: prompt, examples, system)")
    p.add_argument("--no-stream", action="store_true", help="print each answer only once it is complete")
    _add_decoding_options(p)
    p.set_defaults(func=_generate)


def _chat(args) -> None:
    from lowbit.generate import ChatSession, chat_loop, load_few_shot

    model, tokenizer = _load_any(args.model)
    shots = load_few_shot(args.few_shot) if args.few_shot else None
    print("chatting with", args.model, "— /reset forgets the conversation, /exit (or Ctrl-D) ends it")
    chat_loop(ChatSession(model, tokenizer, _generate_config(args), system=args.system, few_shot=shots))


def _add_chat(sub) -> None:
    p = sub.add_parser("chat", help="talk to a model at the terminal (chat template, streaming)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="An interactive conversation through the tokenizer's chat template.\n\n"
                       "examples:\n  lowbit chat smollm2-135m --system 'Answer briefly.'\n"
                       "  lowbit chat ./smollm2-nf4 --sample --temperature 0.7 --top-p 0.9")  # fmt: skip
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--system", help="system message")
    p.add_argument("--few-shot", help="few-shot template file put before the conversation")
    _add_decoding_options(p)
    p.set_defaults(func=_chat)


def _eval(args) -> None:
    import lowbit

    model, tokenizer = _load_any(args.model)
    if args.task == "perplexity":
        text = Path(args.data).read_text(encoding="utf-8") if args.data else lowbit.evaluate.reference_text()
        ppl = lowbit.evaluate.perplexity(model, tokenizer, text, context_length=args.context_length,
                                         stride=args.stride or args.context_length, max_windows=args.windows,
                                         show_progress=True)  # fmt: skip
        print(f"perplexity {ppl:.4f}")
    elif args.task == "mc":
        if not args.data:
            raise ValueError("--task mc needs --data QUESTIONS.jsonl")
        result = lowbit.evaluate.evaluate_multiple_choice(model, tokenizer, args.data, args.normalization, args.style,
                                                          show_progress=True)  # fmt: skip
        print(result.to_markdown(), result, sep="\n\n")
    else:
        config = lowbit.QuantConfig(format=args.format, block_size=args.block_size, group_size=args.group_size)
        report = lowbit.evaluate.error_report_for(model, config)
        print(report.to_markdown())
        if args.plot:
            print(f"plot written to {report.plot(args.plot)}")


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a model: perplexity, multiple choice, quantization error",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="perplexity: token-level sliding-window perplexity on a text file (default: "
                       "Python's reference topics).\nmc: multiple-choice accuracy by length-normalised "
                       "log-likelihood on an MMLU-style JSONL file\n    ({\"question\", \"choices\", \"answer\"} per "
                       "line).\nerrors: quantize a copy with --format and report every layer's relative error, "
                       "outlier share and bits.\n\nexamples:\n  lowbit eval smollm2-135m --task perplexity --windows 8\n"
                       "  lowbit eval ./smollm2-nf4 --task mc --data questions.jsonl\n"
                       "  lowbit eval smollm2-135m --task errors --format nf4 --plot errors.png")  # fmt: skip
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--task", choices=["perplexity", "mc", "errors"], default="perplexity")
    p.add_argument("--data", help="perplexity: a UTF-8 text file; mc: a JSONL file of questions")
    p.add_argument("--context-length", type=int, default=512, help="perplexity window (tokens)")
    p.add_argument("--stride", type=int, default=None, help="perplexity stride (default: the context length)")
    p.add_argument("--windows", type=int, default=32, help="perplexity: maximum number of windows")
    p.add_argument("--normalization", choices=["tokens", "chars", "none"], default="tokens", help="mc scoring")
    p.add_argument("--style", choices=["cloze", "letters"], default="cloze", help="mc: answer texts or letters")
    p.add_argument("--format", default="nf4", help="errors: " + FORMAT_HELP)
    p.add_argument("--block-size", type=int, default=64, help="errors: absmax block size")
    p.add_argument("--group-size", type=int, default=None, help="errors: int/fp8 group size")
    p.add_argument("--plot", help="errors: write the per-layer plot to this PNG file")
    p.set_defaults(func=_eval)


def _elo_answers(args) -> tuple[list[str], dict[str, list[str]]]:
    """The tournament's prompts and answers: read from --answers, or generated by each of --models in turn."""
    from lowbit.evaluate import generate_answers, read_answers, read_prompts, write_answers

    if bool(args.answers) == bool(args.models):
        raise ValueError("give either --answers FILE or --models M1 M2 … with --prompts FILE")
    if args.answers:
        return read_answers(args.answers)
    if not args.prompts:
        raise ValueError("--models needs --prompts FILE (.txt: one prompt per line; .jsonl: a \"prompt\" field)")
    prompts, answers = read_prompts(args.prompts), {}
    for spec in args.models:  # NAME=MODEL or MODEL; one model in memory at a time
        name, _, path = spec.rpartition("=") if "=" in spec else (spec, "", spec)
        if name in answers:
            raise ValueError(f"two players are named {name!r}; name them NAME=MODEL")
        answers |= generate_answers({name: _load_any(path)}, prompts, _generate_config(args))
    if args.save_answers:
        print(f"answers written to {write_answers(args.save_answers, prompts, answers)}")
    return prompts, answers


def _terminal_line(prompt: str) -> str:
    try:
        return input(prompt)
    except EOFError:
        raise ValueError("the input ended before every match was judged") from None


def _elo(args) -> None:
    from lowbit.evaluate import bootstrap_elo, human_judge, likelihood_judge, model_judge, play_tournament

    prompts, answers = _elo_answers(args)
    if args.judge == "human":
        judge = human_judge(read=_terminal_line)
    else:
        model, tokenizer = _load_any(args.judge)
        scorer = likelihood_judge if args.judge_mode == "likelihood" else model_judge
        judge = scorer(model, tokenizer, tie_margin=args.tie_margin)
    matches = play_tournament(answers, prompts, judge, both_orders=not args.one_order, progress=args.judge != "human")
    table = bootstrap_elo(matches, rounds=args.rounds, seed=args.bootstrap_seed, confidence=args.confidence)
    print(f"\n{len(answers)} players, {len(prompts)} prompts, {len(matches)} matches judged by {args.judge}"
          f"{'' if args.judge == 'human' else f' ({args.judge_mode})'}; Elo over {args.rounds} bootstrap rounds:\n")
    print(table.to_markdown())


def _add_elo(sub) -> None:
    p = sub.add_parser("elo", help="rank models by an Elo tournament of their answers (model or human judge)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Every pair of players meets on every prompt, once in each order of presentation; "
                       "a judge picks the better answer (or a tie) and bootstrapped Elo ratings (QLoRA, Dettmers et "
                       "al. 2023, §5) rank the players with confidence intervals.\nAnswers come from a JSONL file — "
                       "{\"prompt\": …, \"answers\": {\"model-a\": …, \"model-b\": …}} per line, or {\"prompt\", "
                       "\"model\", \"answer\"} per line — or the --models answer --prompts themselves (greedy, "
                       "chat template).\nJudges: a model that scores each answer by its mean log-likelihood per token "
                       "after the prompt (--judge-mode likelihood), or that reads both answers and says ' A' or ' B' "
                       "(verdict); or you: --judge human asks a / b / t(ie) at the terminal.\n\nexamples:\n"
                       "  lowbit elo --answers answers.jsonl --judge smollm2-135m\n"
                       "  lowbit elo --answers answers.jsonl --judge human --one-order\n"
                       "  lowbit elo --models fp32=smollm2-135m nf4=./smollm2-nf4 tuned=./smollm2-tuned --prompts "
                       "prompts.txt \\\n      --max-new-tokens 64 --save-answers answers.jsonl --judge smollm2-135m")  # fmt: skip
    p.add_argument("--answers", help="JSONL of prompts and each player's answer")
    p.add_argument("--models", nargs="+", metavar="[NAME=]MODEL", help="players that answer --prompts first")
    p.add_argument("--prompts", help="with --models: a .txt (one prompt per line) or .jsonl (\"prompt\") file")
    p.add_argument("--save-answers", help="with --models: write the answers here (JSONL, --answers layout)")
    p.add_argument("--judge", required=True, help='"human" (you, at the terminal) or a judge model: "smollm2-135m", a '
                   "local transformers / lowbit / bnb-4bit directory or a .gguf file")
    p.add_argument("--judge-mode", choices=["likelihood", "verdict"], default="likelihood",
                   help="model judge: mean log p(answer | prompt) per token, or its ' A' / ' B' verdict on both")
    p.add_argument("--tie-margin", type=float, default=0.0, help="model judge: a score gap this small is a tie")
    p.add_argument("--one-order", action="store_true", help="judge each pair once, not in both orders")
    p.add_argument("--rounds", type=int, default=1000, help="bootstrap rounds (random order, resampled matches)")
    p.add_argument("--confidence", type=float, default=0.95, help="confidence level of the intervals")
    p.add_argument("--bootstrap-seed", type=int, default=0, help="seed of the bootstrap resampling")
    _add_decoding_options(p)
    p.set_defaults(func=_elo)


def _prune(args) -> None:
    import lowbit
    from lowbit import prune

    model, tokenizer = _load_any(args.model)
    text = lowbit.evaluate.reference_text()
    ppl = lambda: lowbit.evaluate.perplexity(model, tokenizer, text, 512, 512, max_windows=args.windows)  # noqa: E731
    before = ppl() if args.windows else None
    if args.method == "magnitude":
        report = prune.magnitude_prune(model, args.sparsity, scope=args.scope)[1]
    elif args.method == "2:4":
        report = prune.semi_structured_prune(model)[1]
    else:
        if not (args.heads or args.channels):
            raise ValueError("--method structured needs --heads N and/or --channels N")
        n_params = prune.parameter_count(model)
        # Importance from activations on calibration text taken from the end of the reference text; the
        # perplexity windows come from its start, so the two never overlap.
        heads, channels = prune.activation_importance(model, tokenizer, text[-60000:], max_sequences=args.calibration)
        if args.heads:
            prune.prune_attention_heads(model, args.heads, scores=heads)
        if args.channels:
            prune.prune_mlp_channels(model, args.channels, scores=channels)
        report = prune.sparsity_report(model, method=f"structured ({n_params:,} → {prune.parameter_count(model):,} "
                                                     "parameters)")  # fmt: skip
    if before is not None:
        report.metrics = {"perplexity before": before, "perplexity after": ppl()}
    if args.verbose:
        print(report.to_markdown())
    print(report)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    print(f"saved to {args.out}")


def _add_prune(sub) -> None:
    p = sub.add_parser("prune", help="prune a model (magnitude, 2:4, heads / MLP channels) and save it",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Prune a full-precision model, report sparsity and perplexity before/after "
                       "(on --windows 512-token windows of lowbit's reference text) and save it as a plain "
                       "transformers directory. Structured pruning ranks heads and channels by their activations "
                       "on calibration text (see lowbit.prune.activation_importance).\n\nexamples:\n"
                       "  lowbit prune smollm2-135m --method magnitude --sparsity 0.3 --out smollm2-sparse\n"
                       "  lowbit prune smollm2-135m --method 2:4 --out smollm2-24\n"
                       "  lowbit prune smollm2-135m --method structured --heads 3 --channels 256 --out smollm2-small")  # fmt: skip
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--method", choices=["magnitude", "2:4", "structured"], default="magnitude")
    p.add_argument("--sparsity", type=float, default=0.5, help="magnitude: fraction of weights to zero")
    p.add_argument("--scope", choices=["layer", "global"], default="layer", help="magnitude: per layer or global")
    p.add_argument("--heads", type=int, default=0, help="structured: attention heads to remove per layer")
    p.add_argument("--channels", type=int, default=0, help="structured: MLP channels to remove per layer")
    p.add_argument("--calibration", type=int, default=8, help="structured: 256-token calibration windows")
    p.add_argument("--windows", type=int, default=4, help="perplexity windows before/after (0 = skip)")
    p.add_argument("-v", "--verbose", action="store_true", help="print the per-layer table")
    p.set_defaults(func=_prune)


def _load_with_adapter(model_name: str, adapter: str | None):
    """(model, tokenizer) of any model lowbit loads, with a PEFT-format adapter directory applied when given."""
    model, tokenizer = _load_any(model_name)
    if adapter:
        from lowbit.peft import load_adapter

        model = load_adapter(model, adapter)
    return model, tokenizer


def _save_merged(model, tokenizer, out: str, dtype: str | None = None):
    """`lowbit merge` and `lowbit export --to merged`: one library call, lowbit.io.save_merged."""
    import torch

    from lowbit import io

    return io.save_merged(model, out, tokenizer, dtype=getattr(torch, dtype) if dtype else None)


def _merge(args) -> None:
    import lowbit
    from lowbit.evaluate import reference_text

    model, tokenizer = _load_with_adapter(args.base, args.adapter)
    text = reference_text()
    calibration = [text[len(text) // 2 :]] if args.method == "gptq" else None  # disjoint from the eval windows
    lowbit.merge_adapter(model, target=args.target, method=args.method, fp_model=args.fp_base, tokenizer=tokenizer,
                         calibration=calibration, n_samples=args.calibration_samples, eval_windows=args.eval_windows,
                         report_dir=args.report_dir or args.out)  # fmt: skip
    if args.target == "requantized":
        lowbit.save_quantized(model, args.out)
        tokenizer.save_pretrained(args.out)
        print(f"merged {args.adapter} into {args.base} and requantized it; saved a lowbit model to {args.out}")
    else:
        path = _save_merged(model, tokenizer, args.out, args.dtype)
        print(f"merged {args.adapter} into {args.base} ({args.target}); saved a plain transformers model to {path}")


def _add_merge(sub) -> None:
    p = sub.add_parser("merge", help="merge a LoRA adapter into its base and save a plain transformers model",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Load BASE, apply the PEFT-format LoRA adapter (adapter_config.json + "
                       "adapter_model.safetensors, written by `lowbit finetune` or HF peft), fold it into the "
                       "weights (W + (alpha/r)·B·A), dequantize 4-/8-bit layers and save config.json + "
                       "model.safetensors + tokenizer: transformers' AutoModelForCausalLM.from_pretrained reads "
                       "the result without lowbit.\nA QLoRA adapter was trained on the quantized base: give that "
                       "same base (the `lowbit quantize` directory) to get exactly the model you trained; the "
                       "fp32 base gives base + adapter in full precision.\n--target says where the merge lands: "
                       "dequantized (default: dequant(Q) + ΔW, dense), fp (the original full-precision weights "
                       "+ ΔW; --fp-base names them) or requantized (back into the base's 4-/8-bit format, by "
                       "plain rounding or --method gptq, which compensates the rounding error on calibration "
                       "text). Every merge prints and saves (merge_report.md/.json) each layer's reconstruction "
                       "error and the KL divergence and perplexity of the merged model vs the adapter-on model."
                       "\n\nexamples:\n"
                       "  lowbit merge smollm2-nf4 smollm2-qlora/adapter --out smollm2-tuned\n"
                       "  lowbit merge smollm2-135m my-lora --out smollm2-lora-merged --dtype bfloat16\n"
                       "  lowbit merge smollm2-nf4 smollm2-qlora/adapter --target requantized --method gptq "
                       "--out smollm2-tuned-nf4\n"
                       "  lowbit merge smollm2-nf4 smollm2-qlora/adapter --target fp --fp-base smollm2-135m "
                       "--out smollm2-tuned-fp\n"
                       "  python -c 'from transformers import AutoModelForCausalLM as M; "
                       "M.from_pretrained(\"smollm2-tuned\")'")  # fmt: skip
    p.add_argument("base", help=MODEL_HELP + ", a `lowbit quantize` directory or a bitsandbytes 4-bit checkpoint")
    p.add_argument("adapter", help="a PEFT-format LoRA adapter directory (e.g. OUT/adapter of `lowbit finetune`)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="cast the saved weights (default: as loaded)")
    p.add_argument("--target", choices=["dequantized", "fp", "requantized"], default="dequantized",
                   help="where the merge lands (default dequantized)")
    p.add_argument("--fp-base", help="target fp: the full-precision model the quantized base came from")
    p.add_argument("--method", choices=["rtn", "gptq"], default="rtn", help="target requantized: how to round")
    p.add_argument("--calibration-samples", type=int, default=32, help="gptq: 256-token calibration windows")
    p.add_argument("--eval-windows", type=int, default=4,
                   help="256-token windows for the KL / perplexity check (0 = skip)")
    p.add_argument("--report-dir", help="where merge_report.md / .json go (default: --out)")
    p.set_defaults(func=_merge)


def _export(args) -> None:
    import lowbit
    from lowbit import io

    model, tokenizer = _load_with_adapter(args.model, args.adapter)
    if args.to == "merged":
        path = _save_merged(model, tokenizer, args.out)
    elif args.to == "bnb4":
        if not any(isinstance(m, lowbit.QuantLinear) for m in model.modules()):
            lowbit.quantize(model, lowbit.QuantConfig(format=args.format), progress=True)
        path = io.save_bnb_4bit(model, args.out, tokenizer)
    elif args.to == "gguf-lora":
        if not args.adapter:
            raise ValueError("--to gguf-lora needs --adapter (the PEFT-format LoRA directory to convert)")
        path = io.export_peft_lora_gguf(args.adapter, model.config, args.out)
    else:
        pre = args.tokenizer_pre or ("smollm" if io.checkpoint_kind(args.model) == "packaged" else "default")
        importance = _imatrix(model, tokenizer, args.imatrix_text, args.imatrix_tokens) if args.imatrix_text else None
        path = io.export_gguf(model, args.out, tokenizer=tokenizer, dtype=args.gguf_type, tokenizer_pre=pre,
                              importance=importance)  # fmt: skip
    print(f"exported ({args.to}) to {path}")


def _imatrix(model, tokenizer, text_file: str, tokens: int):
    """llama.cpp's importance matrix (mean x² per input column) from up to `tokens` tokens of a text file."""
    from pathlib import Path

    from lowbit import io

    ids = tokenizer(Path(text_file).read_text(), return_tensors="pt").input_ids[:, :tokens]
    return io.collect_imatrix(model, [ids[:, i : i + 512] for i in range(0, ids.shape[1], 512)])


def _add_export(sub) -> None:
    from lowbit.io.gguf_export import GGUF_TYPES

    p = sub.add_parser("export", help="export: merged safetensors, bitsandbytes 4-bit, or GGUF",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="merged: LoRA merged and quantized layers dequantized into a plain transformers "
                       "model.\nbnb4: a transformers + bitsandbytes 4-bit checkpoint (from_pretrained loads it with "
                       "bitsandbytes).\ngguf: a GGUF file for llama.cpp (Llama/Mistral/Qwen2; f32, f16, q8_0, q4_0 and the "
                       "K-quants q4_k, q5_k, q6_k, q4_k_m — llama.cpp's mix — optionally weighted by an importance "
                       "matrix from --imatrix-text).\ngguf-lora: the --adapter LoRA as a llama.cpp GGUF adapter "
                       "(each layer's true scale folded in: rsLoRA and per-module rank/alpha come out right)."
                       "\n\nexamples:\n  lowbit export ./smollm2-nf4 --to merged --out smollm2-dense\n"
                       "  lowbit export smollm2-135m --adapter my-lora --to merged --out smollm2-tuned\n"
                       "  lowbit export smollm2-135m --to bnb4 --format nf4 --out smollm2-bnb\n"
                       "  lowbit export smollm2-135m --to gguf --gguf-type q8_0 --out smollm2.q8_0.gguf\n"
                       "  lowbit export smollm2-135m --to gguf --gguf-type q4_k_m --imatrix-text notes.txt "
                       "--out smollm2.q4_k_m.gguf\n"
                       "  lowbit export smollm2-135m --to gguf-lora --adapter my-lora --out my-lora.gguf")  # fmt: skip
    p.add_argument("model", help=MODEL_HELP + ", a `lowbit quantize` directory or a bitsandbytes 4-bit checkpoint")
    p.add_argument("--to", choices=["merged", "bnb4", "gguf", "gguf-lora"], required=True, help="what to write")
    p.add_argument("--out", required=True, help="output directory (merged, bnb4) or .gguf file")
    p.add_argument("--adapter", help="a PEFT-format LoRA adapter directory to merge in first")
    p.add_argument("--format", choices=["nf4", "fp4"], default="nf4", help="bnb4: format if not quantized yet")
    p.add_argument("--gguf-type", choices=list(GGUF_TYPES), default="f16", help="gguf: weight type")
    p.add_argument("--imatrix-text", help="gguf K-quants: a text file whose activations weight the rounding")
    p.add_argument("--imatrix-tokens", type=int, default=4096, help="gguf: tokens of --imatrix-text to use")
    p.add_argument("--tokenizer-pre", help="gguf: llama.cpp pre-tokenizer name (packaged model: smollm)")
    p.set_defaults(func=_export)


def _finetune(args) -> None:
    from lowbit.train import DataConfig, TrainConfig
    from lowbit.train.finetune import FinetuneConfig, run_finetune

    data = DataConfig(task=args.task, max_length=args.max_length, labels=tuple(args.labels) if args.labels else None,
                      system_prompt=args.system_prompt)  # fmt: skip
    train = TrainConfig(max_steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
                        weight_decay=args.weight_decay, optimizer=args.optimizer, schedule=args.schedule,
                        warmup_steps=args.warmup_steps, max_grad_norm=args.max_grad_norm or None,
                        precision=args.precision,
                        gradient_checkpointing=args.gradient_checkpointing or args.checkpoint_layers is not None,
                        checkpoint_layers=args.checkpoint_layers, memory_budget_gib=args.memory_budget,
                        offload_activations=args.offload_activations, offload_embeddings=args.offload_embeddings,
                        cuda_graphs=args.cuda_graphs, fused_kernels=args.fused_kernels, eval_every=args.eval_every,
                        eval_batches=args.eval_batches,
                        early_stopping_patience=args.early_stopping, save_every=args.save_every, seed=args.seed,
                        strategy=args.strategy)  # fmt: skip
    cfg = FinetuneConfig(model=args.model, data=args.data, eval_data=args.eval_data, data_config=data,
                         packing=args.packing, method=args.method, r=args.r, alpha=args.alpha, dropout=args.dropout,
                         train=train, out=args.out, resume=args.resume, prompts=tuple(args.prompt))  # fmt: skip
    summary = run_finetune(cfg)
    for key in ("eval_before", "eval_after"):
        if summary.get(key):
            print(f"{key.replace('_', ' ')}: {summary[key]}")
    print(f"{summary['steps']} steps, {summary['tokens_per_s']} tokens/s, peak RSS {summary['peak_rss_mb']} MiB; "
          f"adapter: {summary.get('adapter', '-')}; summary: {args.out}/finetune.json")  # fmt: skip


def _add_finetune(sub) -> None:
    p = sub.add_parser("finetune", help="fine-tune a model with LoRA / QLoRA / full fine-tuning on a data file",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Load the model, quantize it to NF4 + double quantization (--method qlora), put "
                       "LoRA adapters on every linear layer, train on a JSONL/JSON/CSV/Parquet file and save the "
                       "adapter in HF peft's layout (OUT/adapter), with checkpoints, metrics.jsonl and "
                       "loss_curve.png in OUT. SFT rows are {\"messages\": [...]} or prompt/response pairs; the "
                       "loss covers the assistant turns only. Bad rows are counted and skipped. MODEL may already "
                       "be quantized (a `lowbit quantize` directory): QLoRA then trains on its stored 4-bit "
                       "weights; `lowbit merge` folds the adapter in afterwards.\n\nexamples:\n"
                       "  lowbit finetune smollm2-135m --data data/instruct/train.jsonl --eval-data "
                       "data/instruct/validation.jsonl \\\n      --steps 200 --packing --out smollm2-qlora\n"
                       "  lowbit finetune smollm2-nf4 --data data/instruct/train.jsonl --steps 50 --out smollm2-qlora\n"
                       "  lowbit finetune smollm2-135m --task classification --data data/supersense/train.csv "
                       "--labels animal artifact body food \\\n      location person plant substance --method lora "
                       "--out supersense-lora\n"
                       "  torchrun --nproc-per-node 2 -m lowbit.train smollm2-135m --data ... --strategy ddp   "
                       "# several processes")  # fmt: skip
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--data", required=True, help="training file (.jsonl .json .csv .parquet)")
    p.add_argument("--eval-data", help="validation file, evaluated before, every --eval-every steps and at the end")
    p.add_argument("--task", choices=["sft", "lm", "classification"], default="sft",
                   help="sft: chat/instruction data; lm: plain text (field text); classification: text + label")
    p.add_argument("--labels", nargs="+", help="classification: the class names, in id order")
    p.add_argument("--system-prompt", help="sft: system message for conversations that have none")
    p.add_argument("--max-length", type=int, default=512, help="tokens per example; longer rows are skipped")
    p.add_argument("--packing", action="store_true", help="pack short examples into rows of --max-length tokens")
    p.add_argument("--method", choices=["qlora", "lora", "full"], default="qlora")
    p.add_argument("--lora-r", "--r", dest="r", type=int, default=16,
                   help="LoRA rank (under torchrun write --lora-r: torchrun takes --r for one of its own options)")
    p.add_argument("--alpha", type=float, default=32, help="LoRA alpha (the update is scaled by alpha / r)")
    p.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=4, help="examples per micro-batch (per process)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=2e-4, help="peak learning rate")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--optimizer", default="adamw8bit",
                   choices=["adamw", "adamw8bit", "paged_adamw", "paged_adamw8bit", "sgd"],
                   help="8-bit: blockwise 8-bit Adam states (a LoRA of an 8B model: 80 MB); paged: states in CPU "
                        "RAM between steps on a GPU, copied both ways every step (for states the GPU cannot hold)")
    p.add_argument("--schedule", choices=["constant", "linear", "cosine"], default="cosine")
    p.add_argument("--warmup-steps", type=int, default=10)
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0: off)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32", help="autocast dtype")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    p.add_argument("--checkpoint-layers", type=_layers_or_auto, default=None, metavar="N|auto",
                   help="recompute only the first N blocks (implies --gradient-checkpointing): the others keep "
                        "their activations, trading memory for speed (see `lowbit memory --checkpoint-layers`); "
                        "auto: as few as the memory estimate fits in --memory-budget")
    p.add_argument("--memory-budget", type=float, default=None, metavar="GIB",
                   help="with --checkpoint-layers auto: the memory to fit (default: 90%% of the GPU's; required "
                        "on the CPU)")
    p.add_argument("--offload-activations", action="store_true",
                   help="keep activations saved for backward in pinned CPU memory (GPU): longer sequences fit")
    p.add_argument("--offload-embeddings", action="store_true",
                   help="keep the frozen input embedding table in CPU memory, looking up each batch's rows there "
                        "(1 GiB less GPU memory for Llama-3-8B; not for a tied or trained table)")
    p.add_argument("--fused-kernels", action=argparse.BooleanOptionalAction, default=None,
                   help="fused RMSNorm / SwiGLU / QLoRA-linear ops and chunked loss (Llama, Qwen2, Mistral; "
                        "lowbit.kernels); default: on for a CUDA device")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="replay each micro-batch's forward and backward as a CUDA graph (one per padded width): "
                        "a quantized 8B model's eager step waits on Python's kernel launches. Not with fp16, "
                        "--offload-activations or several processes")
    p.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (0: only before and after)")
    p.add_argument("--eval-batches", type=int, default=None, help="at most this many eval batches")
    p.add_argument("--early-stopping", type=int, default=None, help="stop after N evaluations without improvement")
    p.add_argument("--save-every", type=int, default=50, help="checkpoint every N steps (and at the end)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--strategy", choices=["none", "ddp", "fsdp"], default="ddp", help="with several processes")
    p.add_argument("--prompt", action="append", default=[], help="a prompt to answer before and after training")
    p.add_argument("--out", default="finetune-out", help="output directory")
    p.set_defaults(func=_finetune)


def _layers_or_auto(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of blocks or 'auto', got {value!r}") from None


def _memory(args) -> None:
    from lowbit.evaluate.memory import MemoryConfig, estimate_memory, load_config, plan_checkpoint_layers, rule_of_thumb

    if args.params:
        r = rule_of_thumb(args.params)
        print(f"{args.params:.3g} fp32 parameters: {r['store_fp32'] / 1e9:.3g} GB to store; full training with Adam "
              f"{r['train_adam_per_param_table'] / 1e9:.3g} GB at 4 + 20 bytes/param "
              f"(the '20× storage' shortcut says {r['train_20x_storage'] / 1e9:.3g} GB)")  # fmt: skip
        return
    cfg = MemoryConfig(method=args.method, seq_len=args.seq_len, batch=args.batch, optimizer=args.optimizer,
                       precision=args.precision, lora_r=args.r,
                       gradient_checkpointing=args.gradient_checkpointing or args.checkpoint_layers is not None,
                       checkpoint_layers=args.checkpoint_layers, fused_kernels=args.fused_kernels,
                       offload_embeddings=args.offload_embeddings)  # fmt: skip
    config = load_config(args.model)
    if args.budget is None:
        print(estimate_memory(config, cfg).to_markdown())
        return
    try:
        layers, estimate = plan_checkpoint_layers(config, cfg, int(args.budget * 2**30))
    except ValueError as e:
        raise SystemExit(f"lowbit memory: {e}") from None
    print(estimate.to_markdown())
    advice = "no gradient checkpointing needed" if layers == 0 else f"--checkpoint-layers {layers}"
    print(f"\nfits {args.budget:g} GiB with {advice} ({layers} of {config.num_hidden_layers} blocks recomputed)")


def _add_memory(sub) -> None:
    p = sub.add_parser("memory", help="predict the memory needed to fine-tune or serve a model",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Break down peak training memory — weights, quantization constants, gradients, "
                       "optimizer states, activations with and without gradient checkpointing — and inference "
                       "memory (weights + KV cache), from the model's config alone (no weights are loaded). "
                       "--params N prints the rule of thumb instead (4 GB to store 1B fp32 parameters, 4 + 20 bytes "
                       "per parameter to train with Adam).\n\nexamples:\n"
                       "  lowbit memory smollm2-135m --method qlora --seq-len 512 --batch 4 --optimizer adamw8bit\n"
                       "  lowbit memory ./llama-3-8b/config.json --method lora --gradient-checkpointing\n"
                       "  lowbit memory ./llama-3-8b/config.json --checkpoint-layers 16   # half the blocks\n"
                       "  lowbit memory ./llama-3-8b/config.json --fused-kernels --precision bf16 --seq-len 8192\n"
                       "  lowbit memory ./llama-3-8b/config.json --fused-kernels --precision bf16 --budget 20"
                       "   # blocks to recompute\n"
                       "  lowbit memory --params 1e9")  # fmt: skip
    p.add_argument("model", nargs="?", default="smollm2-135m", help=MODEL_HELP + ", or a config.json")
    p.add_argument("--method", choices=["full", "lora", "qlora"], default="qlora")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--optimizer", choices=["adamw", "adamw8bit", "sgd"], default="adamw")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--r", type=int, default=16, help="LoRA rank")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--checkpoint-layers", type=int, default=None, metavar="N",
                   help="checkpoint only the first N blocks (implies --gradient-checkpointing)")
    p.add_argument("--fused-kernels", action="store_true",
                   help="lowbit's fused training kernels and chunked loss (what finetune runs on a GPU)")
    p.add_argument("--offload-embeddings", action="store_true",
                   help="the input embedding table in CPU memory (finetune --offload-embeddings)")
    p.add_argument("--budget", type=float, default=None, metavar="GIB",
                   help="plan: the fewest blocks to recompute for the training peak to fit this many GiB")
    p.add_argument("--params", type=float, help="just the rule of thumb for this many fp32 parameters")
    p.set_defaults(func=_memory)


def _read_config_file(path: str) -> dict:
    """A YAML or TOML run file: flat settings, or one table per command ([generate], [export], …)."""
    raw = Path(path).read_text(encoding="utf-8")
    if path.endswith(".toml"):
        import tomllib

        return tomllib.loads(raw)
    import yaml

    data = yaml.safe_load(raw) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config file holds settings as key: value pairs")
    return data


def _apply_config_file(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """Make a ``--config FILE``'s settings the defaults of the chosen command, so flags given on the command
    line still win. Keys are the long option names (``max-new-tokens`` or ``max_new_tokens``)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    command = next((a for a in argv if not a.startswith("-")), None)  # the top-level parser has no other options
    if not known.config or command not in sub.choices:
        return
    data = _read_config_file(known.config)
    data = data[command] if isinstance(data.get(command), dict) else data
    cmd = sub.choices[command]
    actions = {a.dest: a for a in cmd._actions}
    for key, value in data.items():
        action = actions.get(str(key).replace("-", "_"))
        if action is None or action.dest in ("help", "config"):
            raise ValueError(f"{known.config}: `lowbit {command}` has no setting {key!r}")
        typed = any(a == o or a.startswith(o + "=") for a in argv for o in action.option_strings)
        if typed:  # the command line wins (and an append option must not extend the file's list)
            continue
        if not action.option_strings:  # a positional: optional now, given by the file unless typed
            action.nargs, action.default = "?", value
        else:
            action.default, action.required = value, False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lowbit",
        description="Quantize language models and fine-tune them parameter-efficiently. "
        "Run `lowbit <command> --help` for each command.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="quantize the default model to NF4 and compare it with fp32",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Load SmolLM2-135M-Instruct, measure memory, perplexity and a chat answer in "
                       "fp32, quantize (NF4 + double quantization by default) and measure again.\n\nexamples:\n"
                       "  lowbit demo\n  lowbit demo --format int8 --windows 4 --finetune-steps 0")  # fmt: skip
    p.add_argument("--model", default="smollm2-135m", help=MODEL_HELP)
    p.add_argument("--format", default="nf4", help=FORMAT_HELP)
    p.add_argument("--windows", type=int, default=16, help="number of 512-token text windows for perplexity")
    p.add_argument("--max-new-tokens", type=int, default=40, help="length of each generated answer")
    p.add_argument("--finetune-steps", type=int, default=20, help="QLoRA steps on the shipped Q&A data (0: skip)")
    p.set_defaults(func=_demo)

    p = sub.add_parser("quantize", help="quantize a model (round-to-nearest) and save it",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Quantize every linear layer except lm_head and save safetensors + JSON that "
                       "every lowbit command (and lowbit.load_quantized) reads back without re-quantizing.\n\n"
                       "examples:\n  lowbit quantize smollm2-135m --format nf4 --out smollm2-nf4\n"
                       "  lowbit quantize smollm2-135m --format int4 --group-size 128 --out smollm2-int4\n"
                       "  lowbit quantize ./my-model --format fp8_e4m3 --exclude lm_head 'model.layers.0.*' -v --out my-fp8")  # fmt: skip
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--format", default="nf4", help=FORMAT_HELP)
    p.add_argument("--block-size", type=int, default=64, help="values per absmax block (4-bit codebook formats)")
    p.add_argument("--no-double-quant", action="store_true", help="keep the absmax constants in fp32")
    p.add_argument("--group-size", type=int, default=None, help="values per scale for int/fp8 (default: per row)")
    p.add_argument("--affine", action="store_true", help="int formats: scale + zero point instead of symmetric")
    p.add_argument("--compute-dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="dtype of the matmul (default auto: the dtype of each layer's weights)")
    p.add_argument("--exclude", nargs="*", default=["lm_head"], help="module name patterns to keep unquantized")
    p.add_argument("-v", "--verbose", action="store_true", help="print the per-layer table")
    p.set_defaults(func=_quantize)

    p = sub.add_parser("perplexity", help="token-level perplexity of a model on a text",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Sliding-window perplexity (non-overlapping when --stride is omitted) of a "
                       "model or a saved quantized model, on a UTF-8 text file or lowbit's offline reference "
                       "text.\n\nexamples:\n  lowbit perplexity smollm2-nf4 --windows 32\n"
                       "  lowbit perplexity smollm2-135m --text book.txt --context-length 1024 --stride 512")  # fmt: skip
    p.add_argument("model", help=MODEL_HELP + ", or a directory written by `lowbit quantize`")
    p.add_argument("--text", help="UTF-8 text file (default: Python's reference topics, offline)")
    p.add_argument("--context-length", type=int, default=512)
    p.add_argument("--stride", type=int, default=None, help="tokens between window starts (default: context length)")
    p.add_argument("--windows", type=int, default=32, help="maximum number of windows")
    p.set_defaults(func=_perplexity)

    _add_compare(sub)
    for add in (_add_generate, _add_chat, _add_eval, _add_elo, _add_prune, _add_merge, _add_export, _add_finetune,
                _add_memory, _add_convert):
        add(sub)
    for cmd in sub.choices.values():
        cmd.add_argument("--config", help="YAML/TOML file of settings for this command (flags given here override)")
    return parser


def _convert(args) -> None:
    from lowbit import io

    report = io.convert(args.src, args.dst, to=args.to, verify=not args.no_verify, method=args.method, bits=args.bits,
                        group_size=None if args.group_size == -1 else args.group_size, sym=not args.affine,
                        desc_act=args.desc_act, format=args.format, gguf_type=args.gguf_type,
                        checkpoint_format=args.checkpoint_format, requantize=args.requantize,
                        calibration_samples=args.calibration_samples, eval_windows=args.eval_windows,
                        eval_context=args.eval_context)  # fmt: skip
    print(report.summary())


def _add_convert(sub) -> None:
    p = sub.add_parser("convert", help="convert between lowbit, bitsandbytes NF4, GPTQ and GGUF, and verify",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Read SRC (packaged name, transformers / lowbit / bitsandbytes 4-bit / GPTQ "
                       "directory, .gguf file), write DST in the --to format and compare the two models on fixed "
                       "text: KL of the next-token distributions, perplexity, max |Δlogit|. Quantized storage the "
                       "target can hold is copied without requantizing (lowbit NF4 ⇄ bnb-nf4, lowbit int ⇄ gptq); a "
                       "float source is quantized (--method, --bits, --group-size); other pairs need --requantize."
                       "\n\nexamples:\n  lowbit convert smollm2-135m smollm2-gptq --to gptq --group-size 128\n"
                       "  lowbit convert smollm2-gptq smollm2-int4 --to lowbit\n"
                       "  lowbit convert smollm2-bnb smollm2-nf4 --to lowbit\n"
                       "  lowbit convert smollm2-nf4 smollm2.q8_0.gguf --to gguf --gguf-type q8_0")  # fmt: skip
    p.add_argument("src", help=MODEL_HELP + ", a lowbit / bitsandbytes 4-bit / GPTQ directory")
    p.add_argument("dst", help="output directory (a .gguf file path for --to gguf)")
    p.add_argument("--to", choices=["lowbit", "bnb-nf4", "gptq", "gguf"], required=True, help="format to write")
    p.add_argument("--method", choices=["rtn", "gptq"], default="rtn", help="float source: how to quantize")
    p.add_argument("--bits", type=int, choices=[2, 3, 4, 8], default=4, help="gptq target: bits per weight")
    p.add_argument("--group-size", type=int, default=128, help="int formats: values per scale (-1: per row)")
    p.add_argument("--affine", action="store_true", help="int formats: zero points (GPTQ sym=false)")
    p.add_argument("--desc-act", action="store_true", help="--method gptq: act-order (g_idx)")
    p.add_argument("--format", default="nf4", help="lowbit target from a float source: " + FORMAT_HELP)
    p.add_argument("--gguf-type", default="q8_0", help="gguf target: f32 f16 q8_0 q4_0 q4_k q5_k q6_k q4_k_m")
    p.add_argument("--checkpoint-format", choices=["gptq", "gptq_v2"], default="gptq",
                   help="gptq target: v1 (zero − 1 stored, what transformers/AutoGPTQ read) or GPTQModel's v2")
    p.add_argument("--requantize", action="store_true", help="allow dequantize + quantize when storage cannot move")
    p.add_argument("--calibration-samples", type=int, default=32, help="--method gptq: 256-token windows")
    p.add_argument("--eval-windows", type=int, default=4, help="verification: non-overlapping windows")
    p.add_argument("--eval-context", type=int, default=256, help="verification: tokens per window")
    p.add_argument("--no-verify", action="store_true", help="skip the comparison with the source")
    p.set_defaults(func=_convert)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    try:
        _apply_config_file(parser, argv)
    except (ValueError, OSError, ImportError) as e:
        parser.error(str(e))
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (ValueError, TypeError, OSError, RuntimeError, ImportError) as e:
        print(f"lowbit {args.command}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
