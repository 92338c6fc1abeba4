"""Training data: read rows from files, turn them into token examples, count what had to be left out.

    records = read_records("data/instruct/train.jsonl")        # .jsonl .json .csv .parquet, or a datasets.Dataset
    examples, report = build_examples(records, tokenizer, DataConfig(task="sft", max_length=512))
    print(report)                                                # rows read, examples made, bad rows by reason

Three tasks:
- "sft": instruction / chat data rendered with the tokenizer's chat template; the loss is computed on the
  assistant turns only (labels of every other token are -100). A row is either {"messages": [{"role",
  "content"}, …]} or a pair of fields: prompt/instruction/question (+ optional input/context) and
  response/output/completion/answer.
- "lm": plain text (field "text"); every text gets an EOS, texts are concatenated and cut into windows of
  `max_length` tokens, all of which carry loss.
- "classification": field "text" and a label (a name from `DataConfig.labels` or an integer id).

Bad rows — not a JSON object, a missing or empty field, an unknown label, a conversation without an
assistant turn, or too long for `max_length` (with `overlong="drop"`) — are counted by reason in a
`DataReport` and skipped; they never stop a run half-way. `pack_examples` puts several short SFT
examples into one row (position ids restart per example, which transformers turns into a block-diagonal
attention mask, so packed examples do not see each other).
"""

from __future__ import annotations

import csv
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import torch

CONFIG_VERSION = 1
TASKS = ("sft", "lm", "classification")
IGNORE_INDEX = -100  # label value that cross-entropy skips (PyTorch's and transformers' convention)
PROMPT_FIELDS = ("prompt", "instruction", "question")
CONTEXT_FIELDS = ("input", "context")
RESPONSE_FIELDS = ("response", "output", "completion", "answer")
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class DataConfig:
    """task: "sft" | "lm" | "classification". max_length: tokens per example.
    overlong: "drop" (count as bad rows) or "truncate" (SFT/classification: cut to max_length).
    text_field / label_field: column names for lm and classification; labels: class names in id order
    (classification with string labels; None = the labels are integer ids already).
    system_prompt: an SFT system message added to conversations that have none.
    """

    task: str = "sft"
    max_length: int = 512
    overlong: str = "drop"
    text_field: str = "text"
    label_field: str = "label"
    labels: tuple[str, ...] | None = None
    system_prompt: str | None = None
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        if self.version != CONFIG_VERSION:
            raise ValueError(f"DataConfig version {self.version} is not supported (this lowbit reads {CONFIG_VERSION})")
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if isinstance(self.max_length, bool) or not isinstance(self.max_length, int) or self.max_length < 2:
            raise ValueError(f"max_length must be an integer ≥ 2, got {self.max_length!r}")
        if self.overlong not in ("drop", "truncate"):
            raise ValueError(f"overlong must be 'drop' or 'truncate', got {self.overlong!r}")
        if self.labels is not None:
            labels = tuple(self.labels)
            if not labels or len(set(labels)) != len(labels):
                raise ValueError(f"labels must be distinct class names, got {self.labels!r}")
            object.__setattr__(self, "labels", labels)


@dataclass
class DataReport:
    """What happened to each row: how many became examples, and why the others were skipped."""

    rows: int = 0
    examples: int = 0
    tokens: int = 0  # tokens in the examples (before packing)
    loss_tokens: int = 0  # of which carry loss (SFT: response tokens)
    bad: Counter = field(default_factory=Counter)  # reason -> count
    first_bad: list[tuple[int, str]] = field(default_factory=list)  # (row index, reason), the first few

    def skip(self, row: int, reason: str) -> None:
        self.bad[reason] += 1
        if len(self.first_bad) < 5:
            self.first_bad.append((row, reason))

    @property
    def n_bad(self) -> int:
        return sum(self.bad.values())

    def __str__(self) -> str:
        text = f"{self.rows} rows → {self.examples} examples ({self.tokens:,} tokens, {self.loss_tokens:,} with loss)"
        if self.bad:
            reasons = ", ".join(f"{n} {reason}" for reason, n in self.bad.most_common())
            rows = ", ".join(f"row {i}: {r}" for i, r in self.first_bad)
            text += f"; skipped {self.n_bad} bad rows: {reasons} (first: {rows})"
        return text


# ----------------------------------------------------------------------------------------------- reading
def read_records(source) -> list:
    """Rows from a .jsonl / .json / .csv / .parquet file, a `datasets.Dataset` or any iterable of dicts.

    A JSONL line that is not valid JSON becomes the string "<invalid JSON: …>" so `build_examples` counts
    it as a bad row instead of the whole read failing.
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"data file {str(path)!r} does not exist")
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            return [_parse_json_line(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, list):
                raise ValueError(f"{path}: a .json data file must hold a list of objects, got {type(data).__name__}")
            return data
        if suffix == ".csv":
            with open(path, encoding="utf-8", newline="") as f:
                return list(csv.DictReader(f))
        if suffix == ".parquet":
            return _read_parquet(path)
        raise ValueError(f"{path}: unknown data file type {suffix!r}; use .jsonl, .json, .csv or .parquet")
    if isinstance(source, dict):
        raise TypeError("pass a list of rows (dicts), a datasets.Dataset or a file path, not a single dict")
    if not isinstance(source, Iterable):
        raise TypeError(f"cannot read training data from a {type(source).__name__}")
    return list(source)  # a datasets.Dataset iterates as dicts


def _parse_json_line(line: str):
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        return f"<invalid JSON: {e.msg}>"


def _read_parquet(path: Path) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"reading {path} needs pyarrow: pip install pyarrow") from None
    return pq.read_table(path).to_pylist()


# ----------------------------------------------------------------------------------------------- examples
def build_examples(records: Sequence, tokenizer, config: DataConfig) -> tuple[list[dict], DataReport]:
    """Tokenize rows into examples ({"input_ids", "labels"} or, for classification, {"input_ids", "label"})."""
    report = DataReport(rows=len(records))
    if config.task == "lm":
        examples = _lm_examples(records, tokenizer, config, report)
    else:
        make = _sft_example if config.task == "sft" else _classification_example
        if config.task == "sft" and not getattr(tokenizer, "chat_template", None):
            raise ValueError("the tokenizer has no chat template; set tokenizer.chat_template or use task='lm'")
        examples = []
        for i, row in enumerate(records):
            result = make(row, tokenizer, config) if isinstance(row, dict) else _not_a_row(row)
            if isinstance(result, str):
                report.skip(i, result)
            else:
                examples.append(result)
    report.examples = len(examples)
    report.tokens = sum(len(e["input_ids"]) for e in examples)
    report.loss_tokens = sum(_loss_positions(e) for e in examples)
    if not examples:
        raise ValueError(f"no usable examples: {report}")
    return examples, report


def _not_a_row(row) -> str:
    return row.removeprefix("<").removesuffix(">") if isinstance(row, str) and row.startswith("<invalid JSON") \
        else f"not an object ({type(row).__name__})"  # fmt: skip


def _loss_positions(example: dict) -> int:
    if "label" in example:
        return 1
    return sum(1 for t in example["labels"][1:] if t != IGNORE_INDEX)  # a label predicts from the token before


def _text(value) -> str | None:
    return value if isinstance(value, str) and value.strip() else None


def conversation(row: dict, system_prompt: str | None = None) -> list[dict] | str:
    """The chat messages of an SFT row, or the reason it has none."""
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            return "empty messages"
        for m in messages:
            if not isinstance(m, dict) or m.get("role") not in ROLES or _text(m.get("content")) is None:
                return "bad message (role must be system/user/assistant, content non-empty text)"
        if not any(m["role"] == "assistant" for m in messages):
            return "no assistant turn"
    else:
        prompt = next((row[k] for k in PROMPT_FIELDS if k in row), None)
        response = next((row[k] for k in RESPONSE_FIELDS if k in row), None)
        if prompt is None or response is None:
            return f"missing field (need messages, or one of {PROMPT_FIELDS} and one of {RESPONSE_FIELDS})"
        if _text(prompt) is None or _text(response) is None:
            return "empty prompt or response"
        context = next((row[k] for k in CONTEXT_FIELDS if _text(row.get(k))), None)
        user = f"{prompt}\n\n{context}" if context else prompt
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": response}]
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}] + messages
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _sft_example(row: dict, tokenizer, config: DataConfig) -> dict | str:
    """Token ids of the whole conversation; labels are the ids on assistant turns and -100 elsewhere.

    The template is rendered for growing prefixes of the conversation: the text added by each assistant
    message (its content and the template's end-of-turn marker) carries loss, the text before it (system,
    user turns, the "assistant" header) does not. Each piece is tokenized on its own, exactly as a prompt
    is at generation time, so the model learns to continue the very tokens it will later be given.
    """
    messages = conversation(row, config.system_prompt)
    if isinstance(messages, str):
        return messages
    ids, labels, done = [], [], ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], generation_prompt=True)
        full = _render(tokenizer, messages[: i + 1], generation_prompt=False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise ValueError("the chat template does not render a conversation as a prefix of its continuation; "
                             "loss masking needs a prefix-stable template")  # fmt: skip
        prompt_ids = tokenizer(prompt[len(done) :], add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(full[len(prompt) :], add_special_tokens=False)["input_ids"]
        ids += prompt_ids + answer_ids
        labels += [IGNORE_INDEX] * len(prompt_ids) + answer_ids
        done = full
    if len(ids) > config.max_length:
        if config.overlong == "drop":
            return f"over-long (> {config.max_length} tokens)"
        ids, labels = ids[: config.max_length], labels[: config.max_length]
        if all(t == IGNORE_INDEX for t in labels[1:]):
            return f"no response token within {config.max_length} tokens"
    return {"input_ids": ids, "labels": labels}


def _classification_example(row: dict, tokenizer, config: DataConfig) -> dict | str:
    text, label = row.get(config.text_field), row.get(config.label_field)
    if text is None or label is None:
        return f"missing field ({config.text_field!r} and {config.label_field!r} are required)"
    if _text(text) is None:
        return "empty text"
    label_id = _label_id(label, config.labels)
    if label_id is None:
        return f"unknown label {label!r}"
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    if len(ids) > config.max_length:
        if config.overlong == "drop":
            return f"over-long (> {config.max_length} tokens)"
        ids = ids[: config.max_length]
    return {"input_ids": ids, "label": label_id}


def _label_id(label, names: tuple[str, ...] | None) -> int | None:
    if names is not None and isinstance(label, str) and label in names:
        return names.index(label)
    try:
        value = int(label)  # ints, and digit strings from CSV files
    except (TypeError, ValueError):
        return None
    return value if value >= 0 and (names is None or value < len(names)) else None


def _lm_examples(records: Sequence, tokenizer, config: DataConfig, report: DataReport) -> list[dict]:
    """Concatenate every text (+ EOS) and cut the stream into windows of max_length tokens."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream: list[int] = []
    for i, row in enumerate(records):
        text = row.get(config.text_field) if isinstance(row, dict) else (row if isinstance(row, str) else None)
        if text is None:
            report.skip(i, f"missing field {config.text_field!r}")
        elif _text(text) is None:
            report.skip(i, "empty text")
        else:
            stream += tokenizer(text, add_special_tokens=False)["input_ids"] + eos
    n = config.max_length
    return [{"input_ids": stream[s : s + n], "labels": stream[s : s + n]} for s in range(0, len(stream) - 1, n)
            if len(stream[s : s + n]) >= 2]  # fmt: skip


def pack_examples(examples: Sequence[dict], max_length: int) -> list[dict]:
    """First-fit packing of SFT/LM examples into rows of at most max_length tokens.

    Each packed row carries position_ids that restart at 0 for every example; given position ids and no
    attention mask, transformers builds a block-diagonal causal mask, so examples do not attend to each
    other. Examples keep their order of first fit (deterministic).
    """
    rows: list[dict] = []
    for e in sorted(examples, key=lambda e: -len(e["input_ids"])):
        n = len(e["input_ids"])
        if n > max_length:
            raise ValueError(f"an example has {n} tokens, more than the packing length {max_length}")
        row = next((r for r in rows if len(r["input_ids"]) + n <= max_length), None)
        if row is None:
            row = {"input_ids": [], "labels": [], "position_ids": []}
            rows.append(row)
        row["input_ids"] += e["input_ids"]
        # The first token of an example is never predicted from the previous example's last one.
        row["labels"] += [IGNORE_INDEX] + e["labels"][1:]
        row["position_ids"] += list(range(n))
    return rows


# ----------------------------------------------------------------------------------------------- batches
def collate(examples: Sequence[dict], pad_token_id: int, multiple: int = 1) -> dict[str, torch.Tensor]:
    """Right-pad a list of examples into tensors: input_ids (B, T), attention_mask (B, T), labels (B, T)
    or (B,) for classification; packed examples get position_ids (B, T) and no attention mask. T is the
    longest example rounded up to a multiple of ``multiple``."""
    width = -(-max(len(e["input_ids"]) for e in examples) // multiple) * multiple
    ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : len(e["input_ids"])] = torch.tensor(e["input_ids"])
        mask[i, : len(e["input_ids"])] = 1
    batch = {"input_ids": ids}
    if "label" in examples[0]:
        return batch | {"attention_mask": mask, "labels": torch.tensor([e["label"] for e in examples])}
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for i, e in enumerate(examples):
        labels[i, : len(e["labels"])] = torch.tensor(e["labels"])
    batch["labels"] = labels
    if "position_ids" in examples[0]:
        pos = torch.zeros((len(examples), width), dtype=torch.long)
        for i, e in enumerate(examples):
            # Padding continues as its own "sequence" from 0, so it never joins the last example's block.
            n = len(e["position_ids"])
            pos[i, :n] = torch.tensor(e["position_ids"])
            pos[i, n:] = torch.arange(width - n)
        return batch | {"position_ids": pos}
    return batch | {"attention_mask": mask}
