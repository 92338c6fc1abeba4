"""`GenerateConfig`: every decoding knob in one frozen, validated, serialisable dataclass.

Defaults decode greedily. The names and meanings follow transformers' `GenerationConfig` so that a setting
means the same thing in both libraries (lowbit's decoder is tested token for token against `model.generate`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

CONFIG_VERSION = 1


@dataclass(frozen=True)
class GenerateConfig:
    """How to pick each next token and when to stop.

    - ``max_new_tokens``: hard cap on generated tokens (the prompt is not counted).
    - ``do_sample``: sample from the processed distribution instead of taking its argmax.
    - ``temperature`` (> 0), ``top_k`` (0 = off), ``top_p`` (1.0 = off): sampling warpers, applied in that order
      and only when sampling (as in transformers).
    - ``repetition_penalty`` (CTRL, Keskar et al. 2019, eq. in §4.1): a logit ``l`` of a token already in the
      sequence becomes ``l / θ`` if positive and ``l · θ`` if negative; 1.0 = off. ``penalize_prompt`` chooses
      whether the prompt's tokens count as "already in the sequence" (transformers: yes) or only generated ones.
    - ``num_beams`` > 1: beam search with ``length_penalty`` (score = Σ log p / len^length_penalty) and
      ``early_stopping`` (stop once ``num_beams`` hypotheses are finished).
    - ``eos_token_id``: end-of-sequence id(s); None = the model's generation config, else the tokenizer's.
    - ``stop_strings``: stop as soon as the generated text contains one of them (the text returned ends before it).
    - ``seed``: seeds a private ``torch.Generator`` for sampling; None = torch's global generator.
    - ``static_cache``: decode with lowbit's preallocated KV cache and fixed-shape step (`static.StaticDecoder`),
      replayed as one CUDA graph a token on a GPU. None = on for a supported model on CUDA, True = always (an
      error for a model it does not support), False = transformers' own cache. Beam search always uses the latter.
    - ``fused_ops``: in the static decoder's step, compute the norms, the rotary embedding and SwiGLU with
      lowbit's fused kernels (Triton on CUDA) instead of the modules' chains of small kernels. None = on for
      CUDA (Llama-3-8B shape, NF4, batch 1 on an H100: 130 → 160 tokens/s, bench/RESULTS.md), off on the CPU.
    """

    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    penalize_prompt: bool = True
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool = False
    eos_token_id: int | tuple[int, ...] | None = None
    stop_strings: tuple[str, ...] = ()
    seed: int | None = None
    static_cache: bool | None = None
    fused_ops: bool | None = None
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        if isinstance(self.stop_strings, str):
            object.__setattr__(self, "stop_strings", (self.stop_strings,))
        elif isinstance(self.stop_strings, list):
            object.__setattr__(self, "stop_strings", tuple(self.stop_strings))
        _check_int("max_new_tokens", self.max_new_tokens, minimum=1)
        _check_int("top_k", self.top_k, minimum=0)
        _check_int("num_beams", self.num_beams, minimum=1)
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 (use do_sample=False for greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0 (1.0 = off), got {self.repetition_penalty}")
        if self.num_beams > 1 and self.do_sample:
            raise ValueError("beam sampling is not supported: use num_beams=1 with do_sample, or do_sample=False")
        if any(not isinstance(s, str) or not s for s in self.stop_strings):
            raise ValueError(f"stop_strings must be non-empty strings, got {self.stop_strings!r}")
        eos = (self.eos_token_id,) if isinstance(self.eos_token_id, int) else self.eos_token_id
        if eos is not None and not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in eos):
            raise ValueError(f"eos_token_id must be a non-negative int or a tuple of them, got {self.eos_token_id!r}")
        if self.seed is not None:
            _check_int("seed", self.seed, minimum=0)
        if self.static_cache not in (None, True, False):
            raise ValueError(f"static_cache must be None (auto), True or False, got {self.static_cache!r}")
        if self.fused_ops not in (None, True, False):
            raise ValueError(f"fused_ops must be None (auto), True or False, got {self.fused_ops!r}")
        if self.version != CONFIG_VERSION:
            raise ValueError(f"GenerateConfig version {self.version} is not supported (this lowbit: {CONFIG_VERSION})")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["stop_strings"] = list(self.stop_strings)
        if isinstance(self.eos_token_id, tuple):
            d["eos_token_id"] = list(self.eos_token_id)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> GenerateConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown GenerateConfig field(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int ≥ {minimum}, got {value!r}")
