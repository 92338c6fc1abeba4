"""Reading rows, chat-template SFT masking, bad-row counting, packing and collation."""

import json
from pathlib import Path

import pytest
import torch

from lowbit.train.data import (
    IGNORE_INDEX,
    DataConfig,
    build_examples,
    collate,
    pack_examples,
    read_records,
)
from tests.tiny_models import tiny_llama
from tests.train.tiny_tokenizer import tiny_tokenizer

DATA = Path(__file__).resolve().parents[2] / "data"


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_shipped_datasets_are_readable_and_disjoint():
    train = read_records(DATA / "instruct" / "train.jsonl")
    val = read_records(DATA / "instruct" / "validation.jsonl")
    assert len(train) > 3000 and len(val) > 200
    key = lambda r: json.dumps(r["messages"][0])  # noqa: E731 - the question identifies a row
    assert not {key(r) for r in train} & {key(r) for r in val}
    assert {r["source"] for r in train} == {"wordnet", "debian-faq"}
    sup_train = read_records(DATA / "supersense" / "train.csv")
    sup_val = read_records(DATA / "supersense" / "validation.csv")
    assert len({r["label"] for r in sup_train}) == 8 and len(sup_val) == 320
    assert not {r["text"] for r in sup_train} & {r["text"] for r in sup_val}
    pydoc_text = __import__("lowbit").evaluate.reference_text()
    assert train[0]["messages"][1]["content"] not in pydoc_text  # not the perplexity text


def test_sft_loss_only_on_assistant_turns(tok):
    row = {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."},
                        {"role": "user", "content": "Name?"}, {"role": "assistant", "content": "Bob."}]}  # fmt: skip
    (ex,), report = build_examples([row], tok, DataConfig(max_length=200))
    text = tok.decode(ex["input_ids"])
    assert text == ("<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n"
                    "<|im_start|>user\nName?<|im_end|>\n<|im_start|>assistant\nBob.<|im_end|>\n")  # fmt: skip
    # Reference: the trained tokens are exactly the two assistant contents plus their end-of-turn markers.
    trained = [i for i, label in enumerate(ex["labels"]) if label != IGNORE_INDEX]
    spans, run = [], []
    for i in trained:
        if run and i != run[-1] + 1:
            spans.append(run)
            run = []
        run.append(i)
    spans.append(run)
    assert [tok.decode([ex["input_ids"][i] for i in s]) for s in spans] == ["Hello.<|im_end|>\n", "Bob.<|im_end|>\n"]
    assert all(ex["labels"][i] == ex["input_ids"][i] for i in trained)
    assert report.loss_tokens == len(trained)


def test_field_pairs_and_system_prompt(tok):
    rows = [{"instruction": "Add.", "input": "1 and 2", "output": "3"}, {"question": "Q", "answer": "A"}]
    examples, _ = build_examples(rows, tok, DataConfig(max_length=200, system_prompt="Be brief."))
    assert tok.decode(examples[0]["input_ids"]).startswith("<|im_start|>system\nBe brief.<|im_end|>\n"
                                                           "<|im_start|>user\nAdd.\n\n1 and 2<|im_end|>")  # fmt: skip


def test_bad_rows_are_counted_not_fatal(tok, tmp_path):
    good = {"prompt": "p", "response": "r"}
    lines = [json.dumps(good), "{not json", json.dumps({"prompt": "p"}), json.dumps({"prompt": " ", "response": "r"}),
             json.dumps({"prompt": "p" * 500, "response": "r"}), json.dumps([1, 2]),
             json.dumps({"messages": [{"role": "user", "content": "u"}]}),
             json.dumps({"messages": [{"role": "robot", "content": "u"}]})]  # fmt: skip
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n\n")
    examples, report = build_examples(read_records(path), tok, DataConfig(max_length=100))
    assert len(examples) == 1 and report.rows == 8 and report.n_bad == 7
    reasons = " | ".join(report.bad)
    for word in ("invalid JSON", "missing field", "empty", "over-long", "not an object", "no assistant", "bad message"):
        assert word in reasons
    assert "skipped 7 bad rows" in str(report)
    with pytest.raises(ValueError, match="no usable examples"):
        build_examples([{"prompt": "p"}], tok, DataConfig())
    truncated, report = build_examples([{"prompt": "p", "response": "r" * 500}], tok, DataConfig(max_length=100,
                                                                                                overlong="truncate"))  # fmt: skip
    assert len(truncated[0]["input_ids"]) == 100 and report.n_bad == 0


def test_csv_json_and_classification_labels(tok, tmp_path):
    (tmp_path / "c.csv").write_text("text,label\nred apple,fruit\nbig car,vehicle\n,fruit\nold boat,plane\nx,1\n")
    rows = read_records(tmp_path / "c.csv")
    cfg = DataConfig(task="classification", labels=("fruit", "vehicle"), max_length=64)
    examples, report = build_examples(rows, tok, cfg)
    assert [e["label"] for e in examples] == [0, 1, 1]
    assert report.bad == {"empty text": 1, "unknown label 'plane'": 1}
    (tmp_path / "j.json").write_text(json.dumps([{"text": "hello world"}, {"text": ""}]))
    lm, report = build_examples(read_records(tmp_path / "j.json"), tok, DataConfig(task="lm", max_length=4))
    assert [len(e["input_ids"]) for e in lm] == [4, 4, 4]  # 11 bytes + EOS = 12 tokens
    assert report.n_bad == 1
    with pytest.raises(ValueError, match="unknown data file type"):
        (tmp_path / "x.txt").write_text("a")
        read_records(tmp_path / "x.txt")
    with pytest.raises(FileNotFoundError):
        read_records(tmp_path / "missing.jsonl")


def test_parquet_needs_pyarrow_or_reads(tok, tmp_path):
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        (tmp_path / "d.parquet").write_bytes(b"PAR1")
        with pytest.raises(ImportError, match="pyarrow"):
            read_records(tmp_path / "d.parquet")
        return
    pq.write_table(pa.table({"prompt": ["a", "b"], "response": ["c", "d"]}), tmp_path / "d.parquet")
    assert read_records(tmp_path / "d.parquet") == [{"prompt": "a", "response": "c"}, {"prompt": "b", "response": "d"}]


def test_packing_keeps_examples_apart(tok):
    """Packed rows give every example the same logits as running it alone (block-diagonal attention)."""
    rows = [{"prompt": f"question {i}", "response": "answer " * (i + 1)} for i in range(5)]
    examples, _ = build_examples(rows, tok, DataConfig(max_length=120))
    packed = pack_examples(examples, max_length=160)
    assert len(packed) < len(examples)
    assert sum(len(r["input_ids"]) for r in packed) == sum(len(e["input_ids"]) for e in examples)
    model = tiny_llama()
    batch = collate(packed, tok.pad_token_id)
    assert "attention_mask" not in batch and batch["position_ids"].shape == batch["input_ids"].shape
    with torch.no_grad():
        # use_cache=False: with a cache transformers does not look for packed position ids (as the trainer does)
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        row, start = 0, 0
        for e in sorted(examples, key=lambda e: -len(e["input_ids"])):
            n = len(e["input_ids"])
            if batch["position_ids"][row, start] != 0 or start + n > len(packed[row]["input_ids"]) \
                    or packed[row]["input_ids"][start : start + n] != e["input_ids"]:  # fmt: skip
                row, start = row + 1, 0
            alone = model(input_ids=torch.tensor([e["input_ids"]])).logits[0]
            torch.testing.assert_close(logits[row, start : start + n], alone, rtol=1e-4, atol=1e-4)
            start += n


def test_collate_pads_right(tok):
    batch = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}], 0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    cls = collate([{"input_ids": [1, 2], "label": 1}, {"input_ids": [3], "label": 0}], 0)
    assert cls["labels"].tolist() == [1, 0]


def test_config_validation():
    for kw in (dict(task="qa"), dict(max_length=1), dict(overlong="cut"), dict(labels=("a", "a")), dict(version=2)):
        with pytest.raises(ValueError):
            DataConfig(**kw)
