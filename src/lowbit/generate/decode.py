"""Autoregressive decoding with a KV cache for any transformers causal LM: greedy and sampling.

The prompt goes through the model once (prefill) and fills the key/value cache; every later step feeds only
the newest token and its position. Batches of prompts are left-padded: the attention mask hides the padding
and position ids count real tokens only, so each row decodes as it would alone. Any module that behaves like
``nn.Linear`` (QuantLinear, LoRA layers, …) works, since only ``model(...)`` is called.

The choices match transformers' ``model.generate`` for the same settings: scores are the last position's
logits in float32, processed as `logits.process_scores` says, then argmax (greedy) or one
``torch.multinomial`` draw per step over the whole batch (sampling, so a seed gives the same tokens).
Beam search lives in `beam.py`.
"""

from __future__ import annotations

import inspect
from dataclasses import replace
from typing import Callable, Iterator

import torch

from lowbit.generate.config import GenerateConfig
from lowbit.generate.logits import process_scores
from lowbit.generate.static import StaticDecoder
from lowbit.generate.static import supports as supports_static
from lowbit.generate.stopping import TextStream, find_stop
from lowbit.hf_compat import cache_kwarg, output_cache


class KVDecoder:
    """Feeds a causal LM token by token, keeping its KV cache, attention mask and position ids in step.

    ``input_ids`` (B, T) may be left-padded, with ``attention_mask`` (B, T) marking real tokens (None = no padding).
    """

    def __init__(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> None:
        self.model = model
        device = input_ids.device
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None  # no padding: let the model take its fast causal-only path, as transformers does
        self.mask = attention_mask
        if attention_mask is None:
            self.positions = torch.arange(input_ids.shape[1], device=device).expand(input_ids.shape[0], -1)
        else:  # padding sits at position 0 too; its keys are masked anyway
            self.positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
        self.cache = None
        self._logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
        self._cache_kwarg = cache_kwarg(model) or "past_key_values"

    def forward(self, new_ids: torch.Tensor) -> torch.Tensor:
        """Run ``new_ids`` (B, n) — the prompt first, then one token per step. Returns last logits (B, V) float32."""
        n = new_ids.shape[1]
        kwargs = {"input_ids": new_ids, "position_ids": self.positions[:, -n:], "use_cache": True}
        if self.cache is not None:
            kwargs[self._cache_kwarg] = self.cache
        if self.mask is not None:
            kwargs["attention_mask"] = self.mask
        if self._logits_to_keep:
            kwargs["logits_to_keep"] = 1  # the lm_head runs on the last position only
        with torch.no_grad():  # here, not around a generator's yields: the caller's grad mode stays its own
            out = self.model(**kwargs)
        self.cache = output_cache(out)
        return out.logits[:, -1].float()

    def advance(self, next_ids: torch.Tensor) -> torch.Tensor:
        """Append one token per row (B,) and return the logits for the following position."""
        self.positions = torch.cat([self.positions, self.positions[:, -1:] + 1], dim=1)
        if self.mask is not None:
            self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
        return self.forward(next_ids[:, None])

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep cache rows ``rows`` (beam search: each new beam continues the cache of its parent)."""
        if not hasattr(self.cache, "reorder_cache"):
            raise TypeError(f"beam search needs a reorderable KV cache; {type(self.cache).__name__} is not one")
        self.cache.reorder_cache(rows)
        self.positions = self.positions[rows]
        if self.mask is not None:
            self.mask = self.mask[rows]


def make_decoder(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 config: GenerateConfig) -> KVDecoder | StaticDecoder:  # fmt: skip
    """The decoder ``config.static_cache`` asks for (None: the static one on CUDA where the model allows it),
    with ``config.fused_ops`` (None: on CUDA)."""
    cuda = input_ids.device.type == "cuda"
    static = config.static_cache
    if static is None:
        static = cuda and supports_static(model)
    if static:  # the last step's token is returned, never fed: the cache needs one slot less than the total
        fused = cuda if config.fused_ops is None else config.fused_ops
        return StaticDecoder(model, input_ids, input_ids.shape[1] + config.max_new_tokens, attention_mask,
                             fused_ops=fused)  # fmt: skip
    return KVDecoder(model, input_ids, attention_mask)


def resolve_eos(model, tokenizer, config: GenerateConfig) -> tuple[int, ...]:
    """EOS ids: the config's, else the model's generation config, else the model config, else the tokenizer's."""
    candidates = [config.eos_token_id]
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None), tokenizer):
        candidates.append(getattr(source, "eos_token_id", None) if source is not None else None)
    for eos in candidates:
        if eos is not None:
            return tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)
    return ()


def ignore_mask(tokens: torch.Tensor, attention_mask: torch.Tensor | None, prompt_len: int,
                config: GenerateConfig) -> torch.Tensor | None:  # fmt: skip
    """Positions of ``tokens`` (B, L) the repetition penalty must not count: padding, and the prompt if asked."""
    ignore = None
    if attention_mask is not None:
        pad = attention_mask == 0  # (B, T)
        ignore = torch.cat([pad, pad.new_zeros(pad.shape[0], tokens.shape[1] - pad.shape[1])], dim=1)
    if not config.penalize_prompt:
        prompt = torch.zeros_like(tokens, dtype=torch.bool)
        prompt[:, :prompt_len] = True
        ignore = prompt if ignore is None else ignore | prompt
    return ignore


def iter_tokens(model, input_ids: torch.Tensor, config: GenerateConfig, attention_mask: torch.Tensor | None = None,
                eos: tuple[int, ...] = (), is_done: Callable[[int, list[int]], bool] | None = None,
                generator: torch.Generator | None = None) -> Iterator[list[int | None]]:  # fmt: skip
    """Greedy or sampled decoding, one step per iteration: yields each row's new token (None once a row ended).

    A row ends after an EOS token or when ``is_done(row, generated_ids)`` says so (stop strings); decoding ends
    when every row has or after ``max_new_tokens`` steps. Finished rows keep being fed (their tokens are
    ignored) so that the batch shape — and with it the random stream of sampling — stays as in transformers.
    """
    decoder = make_decoder(model, input_ids, attention_mask, config)
    tokens, prompt_len = input_ids, input_ids.shape[1]
    generated: list[list[int]] = [[] for _ in range(input_ids.shape[0])]
    finished = [False] * input_ids.shape[0]
    eos_t = torch.tensor(eos, dtype=torch.long, device=input_ids.device)
    logits = decoder.forward(input_ids)
    for step in range(config.max_new_tokens):
        scores = process_scores(logits, tokens, config, ignore_mask(tokens, attention_mask, prompt_len, config))
        if config.do_sample:
            probs = torch.softmax(scores, dim=-1)
            next_ids = torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)  # (B,)
        else:
            next_ids = torch.argmax(scores, dim=-1)  # (B,)
        if eos:  # a finished row is fed an EOS, like transformers' padding
            next_ids = torch.where(torch.tensor(finished, device=next_ids.device), eos_t[0], next_ids)
        tokens = torch.cat([tokens, next_ids[:, None]], dim=1)
        new: list[int | None] = []
        for row, token in enumerate(next_ids.tolist()):
            if finished[row]:
                new.append(None)
                continue
            generated[row].append(token)
            new.append(token)
            finished[row] = token in eos or (is_done is not None and is_done(row, generated[row]))
        yield new
        if all(finished) or step == config.max_new_tokens - 1:
            return
        logits = decoder.advance(next_ids)


def encode_prompts(tokenizer, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Tokenize and left-pad prompts: (input_ids (B, T), attention_mask (B, T) or None without padding)."""
    rows = [tokenizer(p, add_special_tokens=True).input_ids for p in prompts]
    if any(len(r) == 0 for r in rows):
        raise ValueError("a prompt encodes to zero tokens; give at least one token of prompt")
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    return ids, (None if bool(mask.all()) else mask)


def make_generator(config: GenerateConfig, device) -> torch.Generator | None:
    if config.seed is None:
        return None
    return torch.Generator(device=device).manual_seed(config.seed)


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def _stop_checker(tokenizer, config: GenerateConfig):
    if not config.stop_strings:
        return None
    if tokenizer is None:
        raise ValueError("stop_strings need a tokenizer to decode the generated text")

    def is_done(row: int, ids: list[int]) -> bool:
        return find_stop(tokenizer.decode(ids, skip_special_tokens=True), config.stop_strings) >= 0

    return is_done


def _resolve(config: GenerateConfig | None, overrides: dict) -> GenerateConfig:
    config = config or GenerateConfig()
    return replace(config, **overrides) if overrides else config


def generate_ids(model, input_ids: torch.Tensor, config: GenerateConfig | None = None,
                 attention_mask: torch.Tensor | None = None, tokenizer=None, **overrides) -> list[list[int]]:  # fmt: skip
    """Generated token ids for each row of ``input_ids`` (B, T) (prompt excluded; a final EOS included).

    ``overrides`` replace config fields (``generate_ids(m, ids, max_new_tokens=8, do_sample=True)``). A
    ``tokenizer`` is needed only for stop strings.
    """
    config = _resolve(config, overrides)
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be (batch, length ≥ 1), got shape {tuple(input_ids.shape)}")
    eos = resolve_eos(model, tokenizer, config)
    if config.num_beams > 1:
        from lowbit.generate.beam import beam_search

        return beam_search(model, input_ids, config, attention_mask, eos, _stop_checker(tokenizer, config))
    generator = make_generator(config, input_ids.device)
    out: list[list[int]] = [[] for _ in range(input_ids.shape[0])]
    for new in iter_tokens(model, input_ids, config, attention_mask, eos, _stop_checker(tokenizer, config), generator):
        for row, token in enumerate(new):
            if token is not None:
                out[row].append(token)
    return out


def generate(model, tokenizer, prompt: str | list[str], config: GenerateConfig | None = None,
             on_text: Callable[[str], None] | None = None, **overrides) -> str | list[str]:  # fmt: skip
    """Text completion of ``prompt`` (a string, or a list of strings decoded as one left-padded batch).

    The returned text excludes the prompt, special tokens and anything from a stop string on. ``on_text`` is
    called with each new piece of text as it is produced (single prompt only; see `stream`).
    """
    config = _resolve(config, overrides)
    if on_text is not None:
        if not isinstance(prompt, str):
            raise ValueError("on_text streams a single prompt; pass a string")
        pieces = []
        for piece in stream(model, tokenizer, prompt, config):
            on_text(piece)
            pieces.append(piece)
        return "".join(pieces)
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    ids, mask = encode_prompts(tokenizer, prompts, model_device(model))
    texts = []
    for row in generate_ids(model, ids, config, mask, tokenizer):
        text = tokenizer.decode(row, skip_special_tokens=True)
        cut = find_stop(text, config.stop_strings)
        texts.append(text[:cut] if cut >= 0 else text)
    return texts[0] if isinstance(prompt, str) else texts


def stream(model, tokenizer, prompt: str, config: GenerateConfig | None = None, **overrides) -> Iterator[str]:
    """Yield the completion of one prompt piece by piece, as soon as each piece is final.

    Concatenated, the pieces equal ``generate(...)``'s text. Beam search only knows its winner at the end, so with
    ``num_beams > 1`` the whole text comes as one piece.
    """
    config = _resolve(config, overrides)
    ids, _ = encode_prompts(tokenizer, [prompt], model_device(model))
    yield from stream_ids(model, tokenizer, ids, config)


def stream_ids(model, tokenizer, input_ids: torch.Tensor, config: GenerateConfig) -> Iterator[str]:
    """`stream` for an already tokenized prompt (1, T), e.g. a rendered chat template."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"stream_ids takes one prompt of shape (1, T), got {tuple(input_ids.shape)}")
    if config.num_beams > 1:
        text = tokenizer.decode(generate_ids(model, input_ids, config, None, tokenizer)[0], skip_special_tokens=True)
        cut = find_stop(text, config.stop_strings)
        if text[:cut] if cut >= 0 else text:
            yield text[:cut] if cut >= 0 else text
        return
    text, pending = TextStream(tokenizer, config.stop_strings), []

    def push(row: int, generated: list[int]) -> bool:  # called by the decoder for each non-EOS token
        pending.append(text.push(generated[-1]))
        return text.stopped

    eos = resolve_eos(model, tokenizer, config)
    for _ in iter_tokens(model, input_ids, config, None, eos, push, make_generator(config, input_ids.device)):
        piece = "".join(pending)
        pending.clear()
        if piece:
            yield piece
    rest = text.flush()
    if rest:
        yield rest
