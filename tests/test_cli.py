"""The `lowbit` command line as a user runs it: in-process for most commands, by subprocess for a few."""

import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from lowbit.cli import main
from tests.generate.conftest import train_bpe_tokenizer

MC_SAMPLE = Path(__file__).parent / "evaluate" / "data" / "mc_sample.jsonl"
DATA = Path(__file__).parents[1] / "data"  # the shipped datasets


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A saved tiny Llama (untied, vocabulary 400) with a real byte-level BPE tokenizer and chat template."""
    tok = train_bpe_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=1024,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=False)  # fmt: skip
    path = tmp_path_factory.mktemp("tiny")
    LlamaForCausalLM(cfg).eval().save_pretrained(path)
    tok.save_pretrained(path)
    return path


def run_cli(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "lowbit.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300)  # fmt: skip


@pytest.mark.slow
def test_generate_on_the_real_model_by_subprocess():
    out = run_cli("generate", "smollm2-135m", "--chat", "--prompt", "What is the capital of France?",
                  "--max-new-tokens", "8")  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout


def cli_ok(*args) -> str:
    out = run_cli(*args)
    assert out.returncode == 0, f"lowbit {args[0]} failed:\n{out.stderr[-3000:]}"
    return out.stdout


@pytest.mark.slow
def test_quantize_finetune_merge_eval_generate_on_the_real_model_by_subprocess(tmp_path):
    """The QLoRA workflow as a user types it, on SmolLM2-135M: quantize to NF4, train a LoRA on the stored 4-bit
    weights, merge it into a plain transformers model, measure its perplexity, chat with it (~100 s of CPU)."""
    import lowbit
    from lowbit.peft import load_adapter

    q, run, tuned = tmp_path / "smollm2-nf4", tmp_path / "qlora", tmp_path / "smollm2-tuned"
    assert "4.127 bits/param" in cli_ok("quantize", "smollm2-135m", "--format", "nf4", "--out", q)
    cli_ok("finetune", q, "--data", DATA / "instruct" / "train.jsonl", "--steps", 2, "--batch-size", 1,
           "--max-length", 64, "--warmup-steps", 0, "--lr", "1e-3", "--optimizer", "adamw", "--out", run)  # fmt: skip
    summary = json.loads((run / "finetune.json").read_text())
    assert summary["steps"] == 2 and math.isfinite(summary["final_train_loss"])
    assert all(t.abs().max() > 0 for k, t in load_file(run / "adapter" / "adapter_model.safetensors").items()
               if "lora_B" in k)  # fmt: skip  (B starts at zero: the steps trained it)
    cli_ok("merge", q, run / "adapter", "--out", tuned)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {f.name for f in tuned.iterdir()}
    assert "quantization_config" not in json.loads((tuned / "config.json").read_text())
    ppl = float(cli_ok("eval", tuned, "--task", "perplexity", "--windows", 2, "--context-length", 128).split()[-1])
    answer = cli_ok("generate", tuned, "--chat", "--prompt", "What is Debian?", "--max-new-tokens", 8, "--no-stream")
    assert len(answer.strip().split()) >= 3, answer

    plain = AutoModelForCausalLM.from_pretrained(tuned, local_files_only=True).eval()  # transformers alone
    assert not any(type(m).__module__.startswith("lowbit") for m in plain.modules())
    model = lowbit.load_quantized(q).eval()
    tokenizer = AutoTokenizer.from_pretrained(tuned, local_files_only=True)
    text = lowbit.evaluate.reference_text()
    ids = tokenizer(text[:2000], return_tensors="pt").input_ids[:, :96]
    with torch.no_grad():
        base = model(input_ids=ids).logits
        load_adapter(model, run / "adapter")
        expected, got = model(input_ids=ids).logits, plain(input_ids=ids).logits
    scale = expected.abs().max()
    # measured: max |Δ| ≈ 2e-6 of the largest logit (fp32 rounding: dense W + ΔW vs 4-bit dequant + LoRA branch)
    assert (got - expected).abs().max() < 1e-5 * scale
    assert (expected - base).abs().max() > 1e-3 * scale  # and the adapter does change the model
    reference = lowbit.evaluate.perplexity(plain, tokenizer, text, 128, 128, max_windows=2)  # = the adapter model's
    assert ppl == pytest.approx(reference, rel=1e-3) and 5 < ppl < 100


def test_export_then_eval_by_subprocess(tiny_dir, tmp_path):
    gguf_file = tmp_path / "tiny.q8_0.gguf"
    out = run_cli("export", tiny_dir, "--to", "gguf", "--gguf-type", "q8_0", "--out", gguf_file)
    assert out.returncode == 0, out.stderr
    assert f"exported (gguf) to {gguf_file}" in out.stdout and gguf_file.stat().st_size > 0
    out = run_cli("eval", gguf_file, "--task", "mc", "--data", MC_SAMPLE)  # the GGUF, read back by transformers
    assert out.returncode == 0, out.stderr
    assert "accuracy" in out.stdout and "| **all (24)** |" in out.stdout


def test_errors_are_one_line_and_a_nonzero_exit_by_subprocess(tmp_path):
    out = run_cli("eval", tmp_path / "no-such-model", "--task", "mc", "--data", MC_SAMPLE)
    assert out.returncode == 1
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("lowbit eval: error: cannot load"), out.stderr
    assert "Traceback" not in out.stderr


def test_generate_in_process_with_a_config_file(tiny_dir, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {tiny_dir}\nprompt: [Hello there]\nmax-new-tokens: 50\nsample: true\nseed: 3\n")
    assert main(["generate", "--config", str(config), "--max-new-tokens", "6", "--no-stream"]) == 0
    first = capsys.readouterr().out
    assert main(["generate", str(tiny_dir), "--prompt", "Hello there", "--max-new-tokens", "6", "--sample",
                 "--seed", "3", "--no-stream"]) == 0  # fmt: skip
    assert capsys.readouterr().out == first  # flags override the file: 6 tokens, not 50
    toml = tmp_path / "run.toml"
    toml.write_text(f'[generate]\nmodel = "{tiny_dir}"\nprompt = ["Hello there"]\nmax_new_tokens = 6\nsample = true\n'
                    "seed = 3\nno_stream = true\n")  # fmt: skip
    assert main(["generate", "--config", str(toml)]) == 0
    assert capsys.readouterr().out == first
    other = tmp_path / "other.yaml"
    other.write_text(f"model: {tiny_dir}\nprompt: [Something else]\nmax-new-tokens: 6\nsample: true\nseed: 3\n")
    assert main(["generate", "--config", str(other), "--prompt", "Hello there", "--no-stream"]) == 0
    assert capsys.readouterr().out == first  # the typed prompt replaces the file's list
    (tmp_path / "bad.yaml").write_text("beams: 3\n")
    with pytest.raises(SystemExit) as e:
        main(["generate", str(tiny_dir), "--config", str(tmp_path / "bad.yaml")])
    assert e.value.code == 2 and "no setting 'beams'" in capsys.readouterr().err


def test_generate_streams_chat_and_few_shot(tiny_dir, tmp_path, capsys, monkeypatch):
    shots = tmp_path / "shots.json"
    shots.write_text(json.dumps({"prompt": "Q: {input}\nA:", "examples": [{"input": "1+1?", "output": "2"}]}))
    assert main(["generate", str(tiny_dir), "--chat", "--few-shot", str(shots), "--prompt", "2+2?",
                 "--max-new-tokens", "4", "--num-beams", "2"]) == 0  # fmt: skip
    assert capsys.readouterr().out.endswith("\n")
    replies = iter(["hi", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(replies))
    assert main(["chat", str(tiny_dir), "--max-new-tokens", "3"]) == 0
    assert "model> " in capsys.readouterr().out
    assert main(["generate", str(tiny_dir)]) == 1
    assert "--prompt" in capsys.readouterr().err


def test_eval_perplexity_and_error_report(tiny_dir, tmp_path, capsys):
    assert main(["eval", str(tiny_dir), "--task", "perplexity", "--windows", "2", "--context-length", "64"]) == 0
    ppl = float(capsys.readouterr().out.split()[-1])
    assert 100 < ppl < 1000  # a random model: about the vocabulary size (400)
    png = tmp_path / "errors.png"
    assert main(["eval", str(tiny_dir), "--task", "errors", "--format", "int4", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert out.count("| model.layers.") == 14 and png.read_bytes()[:4] == b"\x89PNG"
    assert main(["eval", str(tiny_dir), "--task", "mc"]) == 1


def test_prune_reports_and_saves(tiny_dir, tmp_path, capsys):
    out_dir = tmp_path / "pruned"
    assert main(["prune", str(tiny_dir), "--method", "structured", "--heads", "2", "--channels", "32",
                 "--windows", "1", "--out", str(out_dir)]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "perplexity before" in out and "perplexity after" in out
    loaded = AutoModelForCausalLM.from_pretrained(out_dir, local_files_only=True)
    assert loaded.config.num_attention_heads == 2 and loaded.config.intermediate_size == 96
    assert main(["prune", str(tiny_dir), "--method", "2:4", "--windows", "0", "--out", str(tmp_path / "s")]) == 0
    assert "sparsity 50.0%" in capsys.readouterr().out


def test_export_merged_and_bnb(tiny_dir, tmp_path, capsys):
    q = tmp_path / "q"
    assert main(["quantize", str(tiny_dir), "--format", "nf4", "--out", str(q)]) == 0
    assert main(["export", str(q), "--to", "merged", "--out", str(tmp_path / "dense")]) == 0
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", local_files_only=True)
    assert type(dense.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert main(["export", str(q), "--to", "bnb4", "--out", str(tmp_path / "bnb")]) == 0
    assert json.loads((tmp_path / "bnb" / "config.json").read_text())["quantization_config"]["load_in_4bit"]
    assert main(["generate", str(tmp_path / "bnb"), "--prompt", "Hi", "--max-new-tokens", "3"]) == 0  # reads it back
    assert "exported (bnb4)" in capsys.readouterr().out


def test_merge_matches_the_model_with_its_adapter_and_export_shares_it(tiny_dir, tmp_path, capsys):
    from lowbit.io import load_any
    from lowbit.peft import LoraConfig, apply_lora, save_adapter
    from tests.peft.test_lora import randomize_lora_b

    q = tmp_path / "q"
    assert main(["quantize", str(tiny_dir), "--format", "nf4", "--out", str(q)]) == 0
    model = apply_lora(load_any(q)[0], LoraConfig(r=4, alpha=8, dropout=0.1))
    randomize_lora_b(model)
    save_adapter(model, tmp_path / "adapter")
    assert main(["merge", str(q), str(tmp_path / "adapter"), "--out", str(tmp_path / "merged")]) == 0
    assert f"saved a plain transformers model to {tmp_path / 'merged'}" in capsys.readouterr().out
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", local_files_only=True)  # plain transformers
    assert not (tmp_path / "merged" / "lowbit_quant.json").exists()
    assert type(merged.model.layers[0].mlp.down_proj) is torch.nn.Linear and merged.dtype == torch.float32
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 8]])
    with torch.no_grad():
        expected, got = model.eval()(input_ids=ids).logits, merged(input_ids=ids).logits
    assert (got - expected).abs().max() < 1e-5 * expected.abs().max()  # measured: ~3e-7 relative (fp32 matmul order)
    assert main(["export", str(q), "--adapter", str(tmp_path / "adapter"), "--to", "merged",
                 "--out", str(tmp_path / "exported")]) == 0  # fmt: skip
    read = lambda d: load_file(d / "model.safetensors")  # noqa: E731
    a, b = read(tmp_path / "merged"), read(tmp_path / "exported")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # one code path
    assert main(["merge", str(tiny_dir), str(tmp_path / "adapter"), "--dtype", "bfloat16",
                 "--out", str(tmp_path / "bf16")]) == 0  # fmt: skip
    assert {t.dtype for t in read(tmp_path / "bf16").values()} == {torch.bfloat16}
    capsys.readouterr()
    assert main(["merge", str(q), str(tmp_path / "no-adapter"), "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("lowbit merge: error:") and "\n" not in err and "no-adapter" in err


def write_answers_file(path: Path) -> Path:
    rows = [{"prompt": "What is the capital of France?", "answers": {"good": "Paris.", "odd": "Fish fish fish.",
                                                                      "same": "Paris."}},
            {"prompt": "Name a colour.", "answers": {"good": "Blue.", "odd": "Seventeen.", "same": "Blue."}}]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def elo_rows(out: str) -> dict[str, list[str]]:
    """player → [rank, Elo, CI, wins, ties, losses] from the printed Markdown table."""
    rows = [line.strip("|").split("|") for line in out.splitlines() if line.startswith("| ") and "---" not in line]
    return {cells[1].strip(): [c.strip() for c in cells[:1] + cells[2:]] for cells in rows[1:]}


def test_elo_with_a_model_judge(tiny_dir, tmp_path, capsys):
    answers = write_answers_file(tmp_path / "answers.jsonl")
    assert main(["elo", "--answers", str(answers), "--judge", str(tiny_dir), "--rounds", "200"]) == 0
    out = capsys.readouterr().out
    assert "3 players, 2 prompts, 12 matches judged by" in out and "| rank | player | Elo | 95% CI |" in out
    rows = elo_rows(out)
    assert set(rows) == {"good", "odd", "same"}
    # good and same give identical answers: every game between them is a tie, and they meet odd alike
    assert rows["good"][3:] == rows["same"][3:] and int(rows["good"][4]) >= 4
    for rank, elo, ci, *wtl in rows.values():
        lower, upper = map(float, ci.split(" – "))
        assert lower <= float(elo) <= upper and sum(map(int, wtl)) == 8  # 2 prompts × 2 opponents × 2 orders
    assert main(["elo", "--answers", str(answers), "--judge", str(tiny_dir), "--one-order", "--rounds", "10"]) == 0
    assert "6 matches judged by" in capsys.readouterr().out
    # the verdict judge needs " A" / " B" as single tokens; the tiny BPE vocabulary has no such tokens
    assert main(["elo", "--answers", str(answers), "--judge", str(tiny_dir), "--judge-mode", "verdict"]) == 1
    assert capsys.readouterr().err.strip().endswith("must encode ' A' and ' B' as two different single tokens")


def test_elo_with_a_human_at_the_terminal(tiny_dir, tmp_path, capsys, monkeypatch):
    answers = tmp_path / "answers.jsonl"
    answers.write_text('{"prompt": "2+2?", "answers": {"bad": "5", "good": "4"}}\n'
                       '{"prompt": "Capital of Peru?", "answers": {"bad": "Rome", "good": "Lima"}}\n')  # fmt: skip
    # players sorted (bad, good); games: each prompt with bad shown as A, then each with good as A
    monkeypatch.setattr("sys.stdin", io.StringIO("b\nwhat?\nB\na\nt\n"))
    assert main(["elo", "--answers", str(answers), "--judge", "human", "--rounds", "100"]) == 0
    out = capsys.readouterr().out
    assert out.count("=== prompt ===") == 4 and "please type a, b or t" in out and "--- answer B ---\n4" in out
    rows = elo_rows(out)
    assert rows["good"][0] == "1" and rows["good"][3:] == ["3", "1", "0"] and rows["bad"][3:] == ["0", "1", "3"]
    assert float(rows["good"][1]) > 1000 > float(rows["bad"][1])
    monkeypatch.setattr("sys.stdin", io.StringIO("a\n"))  # the input ends after one verdict
    assert main(["elo", "--answers", str(answers), "--judge", "human"]) == 1
    assert capsys.readouterr().err.strip() == "lowbit elo: error: the input ended before every match was judged"


def test_elo_generates_the_answers_first(tiny_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hello there\nWhat is 2 + 2?\n")
    saved = tmp_path / "answers.jsonl"
    assert main(["elo", "--models", f"a={tiny_dir}", f"b={tiny_dir}", "--prompts", str(prompts), "--max-new-tokens",
                 "4", "--save-answers", str(saved), "--judge", str(tiny_dir), "--rounds", "50"]) == 0  # fmt: skip
    rows = elo_rows(capsys.readouterr().out)
    lines = [json.loads(line) for line in saved.read_text().splitlines()]
    assert [r["prompt"] for r in lines] == ["Hello there", "What is 2 + 2?"]
    assert all(r["answers"]["a"] == r["answers"]["b"] for r in lines)  # same model, greedy
    assert rows["a"][3:] == rows["b"][3:] == ["0", "4", "0"] and rows["a"][1] == rows["b"][1] == "1000"
    for argv in (["elo", "--judge", "human"], ["elo", "--models", str(tiny_dir), "--judge", "human"],
                 ["elo", "--answers", str(saved), "--models", "x", "--judge", "human"]):  # fmt: skip
        assert main(argv) == 1
        assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_every_command_teaches_with_examples():
    from lowbit.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    assert {"merge", "elo", "finetune", "export", "eval", "generate"} <= set(commands)
    for name, command in commands.items():
        text = command.format_help()
        assert "\nexamples:\n" in text and f"lowbit {name} " in text.split("\nexamples:\n")[1], name
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert all(f"lowbit {name} " in readme for name in commands)  # the README shows every command


def test_finetune_trains_on_an_already_quantized_directory(tiny_dir, tmp_path, capsys):
    q, run = tmp_path / "q", tmp_path / "run"
    assert main(["quantize", str(tiny_dir), "--format", "nf4", "--out", str(q)]) == 0
    args = ["finetune", str(q), "--data", str(DATA / "instruct" / "validation.jsonl"), "--steps", "1",
            "--batch-size", "2", "--max-length", "256", "--r", "2", "--fused-kernels", "--checkpoint-layers", "auto",
            "--memory-budget", "1", "--out", str(run)]  # fmt: skip
    assert main(args) == 0
    assert "checkpoint_layers='auto': recomputing 0 of 2 blocks" in capsys.readouterr().out  # 1 GiB holds them all
    adapter = load_file(run / "adapter" / "adapter_model.safetensors")
    assert len(adapter) == 2 * 14 and all(k.startswith("base_model.model.model.layers.") for k in adapter)
    summary = json.loads((run / "finetune.json").read_text())
    assert summary["trainable_parameters"] == sum(t.numel() for t in adapter.values())  # the 4-bit base is frozen
    capsys.readouterr()
    assert main(args[:-1] + [str(tmp_path / "full"), "--method", "full"]) == 1
    assert "the model is quantized; use qlora" in capsys.readouterr().err


def test_merge_targets_write_their_report(tiny_dir, tmp_path, capsys):
    """--target fp / requantized (GPTQ) through lowbit.merge_adapter: the report files, the saved kinds."""
    import json

    import lowbit
    from lowbit.io import load_any
    from lowbit.peft import LoraConfig, apply_lora, save_adapter
    from tests.peft.test_lora import randomize_lora_b

    q = tmp_path / "q"
    assert main(["quantize", str(tiny_dir), "--format", "int4", "--group-size", "32", "--out", str(q)]) == 0
    model = apply_lora(load_any(q)[0], LoraConfig(r=4, alpha=8))
    randomize_lora_b(model)
    save_adapter(model, tmp_path / "adapter")
    assert main(["merge", str(q), str(tmp_path / "adapter"), "--target", "requantized", "--method", "gptq",
                 "--calibration-samples", "2", "--eval-windows", "1", "--out", str(tmp_path / "rq")]) == 0  # fmt: skip
    report = json.loads((tmp_path / "rq" / "merge_report.json").read_text())
    assert (tmp_path / "rq" / "merge_report.md").exists() and "kl" in json.dumps(report).lower()
    requantized = lowbit.load_quantized(tmp_path / "rq")
    assert type(requantized.model.layers[0].mlp.down_proj) is lowbit.QuantLinear
    assert main(["merge", str(q), str(tmp_path / "adapter"), "--target", "fp", "--fp-base", str(tiny_dir),
                 "--eval-windows", "0", "--out", str(tmp_path / "fp")]) == 0  # fmt: skip
    fp = AutoModelForCausalLM.from_pretrained(tmp_path / "fp", local_files_only=True)
    base = AutoModelForCausalLM.from_pretrained(tiny_dir, local_files_only=True)
    layer = model.model.layers[0].mlp.down_proj  # scale α/r = 8/4
    want = base.model.layers[0].mlp.down_proj.weight + 2.0 * layer.lora_B["default"] @ layer.lora_A["default"]
    torch.testing.assert_close(fp.model.layers[0].mlp.down_proj.weight, want, atol=1e-6, rtol=1e-6)  # no rounding
    capsys.readouterr()


def test_export_gguf_k_quants_with_imatrix_and_a_lora_adapter(tiny_dir, tmp_path, capsys):
    import gguf

    from lowbit.io import load_any
    from lowbit.peft import LoraConfig, apply_lora, save_adapter

    notes = tmp_path / "notes.txt"
    notes.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    out = tmp_path / "tiny.q4_k_m.gguf"
    assert main(["export", str(tiny_dir), "--to", "gguf", "--gguf-type", "q4_k_m", "--imatrix-text", str(notes),
                 "--out", str(out)]) == 0  # fmt: skip
    reader = gguf.GGUFReader(out)
    assert {t.name for t in reader.tensors} >= {"token_embd.weight", "blk.0.ffn_down.weight"}
    model = apply_lora(load_any(tiny_dir)[0], LoraConfig(r=4, alpha=8))
    save_adapter(model, tmp_path / "adapter")
    adapter = tmp_path / "adapter.gguf"
    assert main(["export", str(tiny_dir), "--to", "gguf-lora", "--adapter", str(tmp_path / "adapter"),
                 "--out", str(adapter)]) == 0  # fmt: skip
    reader = gguf.GGUFReader(adapter)
    field = reader.get_field("general.type")
    assert bytes(field.parts[field.data[0]]).decode() == "adapter"
    names = {t.name for t in reader.tensors}
    assert "blk.0.attn_q.weight.lora_a" in names and "blk.1.ffn_down.weight.lora_b" in names
    capsys.readouterr()


def test_memory_plans_checkpointing_for_a_budget(tiny_dir, capsys):
    from lowbit.evaluate.memory import MemoryConfig, estimate_memory, load_config

    args = ["memory", str(tiny_dir), "--method", "qlora", "--precision", "bf16", "--seq-len", "512", "--batch", "4"]
    cfg = MemoryConfig(method="qlora", precision="bf16", seq_len=512, batch=4)
    keep = estimate_memory(load_config(str(tiny_dir)), cfg).training_total
    main(args + ["--budget", str(keep / 2**30)])
    assert "no gradient checkpointing needed (0 of 2 blocks recomputed)" in capsys.readouterr().out
    every = estimate_memory(load_config(str(tiny_dir)), MemoryConfig(**{**cfg.__dict__, "gradient_checkpointing": True}))
    main(args + ["--budget", str(every.training_total / 2**30)])
    assert "--checkpoint-layers 2 (2 of 2 blocks recomputed)" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="even with all 2 blocks recomputed"):
        main(args + ["--budget", "0.0001"])
