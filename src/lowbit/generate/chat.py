"""Chat: render conversations with the tokenizer's chat template, few-shot prompts from a file, a terminal loop.

A few-shot file (JSON, or YAML when PyYAML is installed) holds worked examples that go in front of every
question — as earlier user/assistant turns for a chat model, or as text for a plain language model:

    {"system": "Answer with one word.",                 # optional
     "prompt": "Question: {input}\\nAnswer:",           # how a question is written; {input} is the question
     "examples": [{"input": "Capital of France?", "output": "Paris"}],
     "separator": "\\n\\n"}                              # between examples in plain-text mode (default blank line)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from lowbit.generate.config import GenerateConfig
from lowbit.generate.decode import model_device, stream_ids

TEMPLATE_VERSION = 1


@dataclass(frozen=True)
class FewShotTemplate:
    """Worked examples placed before each query (Brown et al. 2020's few-shot prompting)."""

    prompt: str = "{input}"
    examples: tuple[tuple[str, str], ...] = ()
    system: str | None = None
    separator: str = "\n\n"
    version: int = TEMPLATE_VERSION

    def __post_init__(self) -> None:
        if "{input}" not in self.prompt:
            raise ValueError(f"the few-shot prompt must contain {{input}}, got {self.prompt!r}")
        if any(len(e) != 2 or not all(isinstance(x, str) for x in e) for e in self.examples):
            raise ValueError("few-shot examples must be (input, output) string pairs")
        if self.version != TEMPLATE_VERSION:
            raise ValueError(f"few-shot template version {self.version} is not supported")

    def question(self, text: str) -> str:
        return self.prompt.replace("{input}", text)  # not str.format: questions may contain braces

    def messages(self, query: str) -> list[dict]:
        """Chat turns: system, then each example as a user question and an assistant answer, then the query."""
        turns = [{"role": "system", "content": self.system}] if self.system else []
        for question, answer in self.examples:
            turns += [{"role": "user", "content": self.question(question)}, {"role": "assistant", "content": answer}]
        return turns + [{"role": "user", "content": self.question(query)}]

    def text(self, query: str) -> str:
        """Plain-text prompt for a model without a chat template; the answer continues the last line."""
        parts = [self.system] if self.system else []
        parts += [f"{self.question(q)} {a}" for q, a in self.examples]
        return self.separator.join(parts + [self.question(query)])


def load_few_shot(path: str | os.PathLike) -> FewShotTemplate:
    """Read a few-shot template file (.json, or .yaml/.yml)."""
    path = Path(path)
    raw = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml  # optional dependency, only for YAML files

        data = yaml.safe_load(raw)
    else:
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a few-shot file holds one object with 'prompt' and 'examples'")
    unknown = set(data) - {"prompt", "examples", "system", "separator", "version"}
    if unknown:
        raise ValueError(f"{path}: unknown field(s) {sorted(unknown)}")
    examples = data.get("examples", [])
    if not isinstance(examples, list) or not all(isinstance(e, dict) and {"input", "output"} <= set(e)
                                                 for e in examples):  # fmt: skip
        raise ValueError(f"{path}: 'examples' must be a list of {{'input': …, 'output': …}} objects")
    data["examples"] = tuple((e["input"], e["output"]) for e in examples)
    return FewShotTemplate(**data)


def render_chat(tokenizer, messages: list[dict]) -> torch.Tensor:
    """Token ids (1, T) of ``messages`` in the tokenizer's chat template, ready for the assistant's turn."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("this tokenizer has no chat template; use a plain prompt or a few-shot template instead")
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    return torch.tensor([encoded["input_ids"]])


@dataclass
class ChatSession:
    """A conversation with a model: each `send` renders the whole history and streams the reply."""

    model: object
    tokenizer: object
    config: GenerateConfig = field(default_factory=GenerateConfig)
    system: str | None = None
    few_shot: FewShotTemplate | None = None
    history: list[dict] = field(default_factory=list)

    def messages(self, user_text: str) -> list[dict]:
        """System prompt, few-shot example turns, the history so far, then the new user turn."""
        shots = self.few_shot
        system = self.system or (shots.system if shots else None)
        head = [{"role": "system", "content": system}] if system else []
        if shots is not None:
            head += [t for t in shots.messages("")[:-1] if t["role"] != "system"]
            user_text = shots.question(user_text)
        return head + self.history + [{"role": "user", "content": user_text}]

    def stream(self, user_text: str) -> Iterator[str]:
        """Yield the reply piece by piece; the exchange joins the history once the reply is complete."""
        messages = self.messages(user_text)
        ids = render_chat(self.tokenizer, messages).to(model_device(self.model))
        pieces = []
        for piece in stream_ids(self.model, self.tokenizer, ids, self.config):
            pieces.append(piece)
            yield piece
        reply = "".join(pieces).strip()
        self.history += [messages[-1], {"role": "assistant", "content": reply}]

    def send(self, user_text: str, on_text: Callable[[str], None] | None = None) -> str:
        pieces = []
        for piece in self.stream(user_text):
            pieces.append(piece)
            if on_text is not None:
                on_text(piece)
        return "".join(pieces).strip()

    def reset(self) -> None:
        self.history.clear()


def chat_loop(session: ChatSession, read: Callable[[str], str] | None = None,
              write: Callable[[str], None] | None = None) -> int:  # fmt: skip
    """Talk to ``session`` at a terminal until EOF or ``/exit``; ``/reset`` forgets the history.

    Returns the number of answered turns. ``read``/``write`` default to the terminal (tests pass their own).
    """
    read = read or input  # looked up per call, so a replaced builtins.input is honoured
    write = write or (lambda s: print(s, end="", flush=True))
    turns = 0
    while True:
        try:
            line = read("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            write("\n")
            return turns
        if line in ("/exit", "/quit"):
            return turns
        if line == "/reset":
            session.reset()
            write("(history cleared)\n")
            continue
        if not line:
            continue
        write("model> ")
        session.send(line, on_text=write)
        write("\n")
        turns += 1
