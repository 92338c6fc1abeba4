"""One converter: lowbit ⇄ bitsandbytes NF4 ⇄ GPTQ, anything → GGUF, each result checked against its source.

    report = lowbit.io.convert("smollm2-nf4", "smollm2-bnb", to="bnb-nf4")
    print(report.verdict())   # lossless: max |Δlogit| 0 over 1020 tokens (perplexity 19.06)

Routes. A quantized source whose storage the target can hold is copied value for value, never requantized:
lowbit NF4/FP4 ⇄ bitsandbytes 4-bit (the same bytes), lowbit int2/3/4/8 ⇄ GPTQ (the same codes and zero points;
GPTQ keeps scales in fp16, the one rounding on the way from lowbit), anything → lowbit. A float source (a packaged
name, a transformers directory, a GGUF file, which transformers dequantizes to float32) is quantized for the target:
NF4 for bitsandbytes, int`bits` with `group_size` by RTN or GPTQ (calibrated on the second half of
`lowbit.evaluate.reference_text()`) for GPTQ, `format` for lowbit. A quantized source in a format the target cannot
store (NF4 → GPTQ, int4 → bitsandbytes) is refused unless ``requantize=True``, which dequantizes and quantizes
again. GGUF output goes through `export_gguf` (f32/f16 dense, q8_0/q4_0 and the K-quants lossy); GGUF input is
read dequantized, so ``gguf → lowbit`` is a fresh quantization of the GGUF's values.

Verification loads what was written (as every reader of it would) and compares it with the source as loaded, on
the first half of the reference text (the calibration text never overlaps it), cut into non-overlapping windows:
mean KL(source ‖ result) of the next-token distributions, token-level perplexity of both and max |Δlogit| — the
numbers of `lowbit.peft.merge_report`, whose helpers compute them.
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from lowbit.evaluate.data import reference_text
from lowbit.io.auto import checkpoint_kind, load_any
from lowbit.io.bnb import BNB_CODEBOOKS, save_bnb_4bit
from lowbit.io.gguf_export import GGUF_TYPES, export_gguf
from lowbit.io.gptq_format import CHECKPOINT_FORMATS, GPTQ_BITS, save_gptq
from lowbit.io.merged import merged_copy
from lowbit.io.quantized import LAYER_CLASSES, save_quantized
from lowbit.nn.quant_linear import QuantLinear
from lowbit.peft.merge_report import compare_next_token, eval_token_ids, next_token_reference
from lowbit.quantize.api import quantize
from lowbit.quantize.config import QuantConfig

TARGETS = ("lowbit", "bnb-nf4", "gptq", "gguf")
METHODS = ("rtn", "gptq")
GPTQ_FORMATS = tuple(f"int{b}" for b in GPTQ_BITS)


@dataclass(frozen=True)
class ConvertOptions:
    """How a conversion quantizes (when it must) and how it is verified."""

    method: str = "rtn"  # float source → quantized target: rtn | gptq (int formats only)
    bits: int = 4  # GPTQ target from a float source
    group_size: int | None = 128  # int formats (GPTQ target, or `format` int*): values per scale; None = per row
    sym: bool = True  # int formats: symmetric (GPTQ's sym) or affine
    desc_act: bool = False  # GPTQ's act-order (method gptq only)
    format: str = "nf4"  # lowbit target from a float source: any lowbit weight format
    gguf_type: str = "q8_0"  # GGUF target: one of GGUF_TYPES
    checkpoint_format: str = "gptq"  # GPTQ target: "gptq" (v1, zero − 1 stored) or "gptq_v2"
    requantize: bool = False  # allow dequantize + quantize when the target cannot hold the source's storage
    calibration_samples: int = 32  # method gptq: windows of 256 tokens
    eval_windows: int = 4  # verification: non-overlapping windows …
    eval_context: int = 256  # … of this many tokens
    version: int = 1

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.bits not in GPTQ_BITS:
            raise ValueError(f"bits must be one of {GPTQ_BITS}, got {self.bits!r}")
        if self.gguf_type not in GGUF_TYPES:
            raise ValueError(f"gguf_type must be one of {GGUF_TYPES}, got {self.gguf_type!r}")
        if self.checkpoint_format not in CHECKPOINT_FORMATS:
            raise ValueError(f"checkpoint_format must be one of {CHECKPOINT_FORMATS}, got {self.checkpoint_format!r}")
        if self.desc_act and self.method != "gptq":
            raise ValueError("desc_act (act-order) is an option of method 'gptq'; round-to-nearest has no column order")
        for name in ("calibration_samples", "eval_windows", "eval_context"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if self.version != 1:
            raise ValueError(f"ConvertOptions version {self.version} is not supported (this lowbit reads 1)")


@dataclass
class ConvertReport:
    """What a conversion did and, when verified, how far the result's predictions moved from the source's."""

    source: str
    source_kind: str  # checkpoint_kind of the source
    target: str  # one of TARGETS
    destination: str
    route: str  # what happened to the weights, in words
    kl_divergence: float | None = None  # mean KL(source ‖ result), nats per scored token
    perplexity_source: float | None = None
    perplexity_result: float | None = None
    max_abs_logit_diff: float | None = None
    eval_tokens: int = 0
    seconds: float = 0.0

    @property
    def lossless(self) -> bool | None:
        return None if self.max_abs_logit_diff is None else self.max_abs_logit_diff == 0

    def verdict(self) -> str:
        """"lossless: …" / "lossy: KL …, perplexity a → b (+x%)" / "not verified"."""
        if self.kl_divergence is None:
            return "not verified"
        a, b, n = self.perplexity_source, self.perplexity_result, self.eval_tokens
        if self.lossless:
            return f"lossless: max |Δlogit| 0 over {n} tokens (perplexity {a:.2f})"
        change = 100 * (b / a - 1)
        return (f"lossy: KL {self.kl_divergence:.2g} nats/token, perplexity {a:.2f} → {b:.2f} ({change:+.2f}%), "
                f"max |Δlogit| {self.max_abs_logit_diff:.2g} over {n} tokens")  # fmt: skip

    def summary(self) -> str:
        return (f"{self.source} ({self.source_kind}) → {self.destination} ({self.target}): {self.route}\n"
                f"{self.verdict()}  [{self.seconds:.1f} s]")  # fmt: skip

    def to_dict(self) -> dict:
        return asdict(self) | {"verdict": self.verdict()}


def convert(src: str | os.PathLike, dst: str | os.PathLike, to: str, verify: bool = True,
            options: ConvertOptions | None = None, **overrides) -> ConvertReport:  # fmt: skip
    """Convert the checkpoint `src` into `to` format at `dst` (a directory; a .gguf file for GGUF) and verify it.

    `overrides` are `ConvertOptions` fields (``method="gptq"``, ``gguf_type="q4_k"``, …).
    """
    start = time.perf_counter()
    options = ConvertOptions(**(asdict(options or ConvertOptions()) | overrides))
    if to not in TARGETS:
        raise ValueError(f"unknown target format {to!r}; choose one of {TARGETS}")
    kind = checkpoint_kind(src)
    if kind == "unknown":
        raise ValueError(f"cannot read {str(src)!r}: not a packaged model name, a lowbit / bitsandbytes / GPTQ / "
                         "transformers directory or a .gguf file")  # fmt: skip
    dst = Path(dst)
    if to == "gguf" and dst.suffix.lower() != ".gguf":
        raise ValueError(f"a GGUF destination is a file path ending in .gguf, got {str(dst)!r}")
    if kind != "packaged" and dst.expanduser().resolve() == Path(src).expanduser().resolve():
        raise ValueError("the destination is the source; write the conversion somewhere else")
    source, tokenizer = load_any(src)
    model, route = _prepare(source, tokenizer, kind, to, options)
    _write(model, tokenizer, dst, to, kind, options)
    report = ConvertReport(str(src), kind, to, str(dst), route)
    if verify:
        del model  # the written copy is what gets checked
        result, _ = load_any(dst)
        compare_models(source, result, tokenizer, options.eval_windows, options.eval_context, report)
    report.seconds = time.perf_counter() - start
    return report


def _prepare(model: nn.Module, tokenizer, kind: str, to: str, o: ConvertOptions) -> tuple[nn.Module, str]:
    """(the model to write, the route in words); the source model itself is never modified."""
    layers = [m for m in model.modules() if isinstance(m, tuple(LAYER_CLASSES.values()))]
    if to == "gguf":
        return model, f"dequantized and written as GGUF {o.gguf_type}" if layers else f"written as GGUF {o.gguf_type}"
    if not layers:
        origin = "GGUF dequantized by transformers, then " if kind == "gguf" else ""
        return _quantized_copy(model, tokenizer, to, o), origin + _quantize_words(to, o)
    problem = _unstorable(layers, to)
    if problem is None:
        copied = "storage copied: no value requantized"
        if to == "gptq":
            copied += "; scales rounded to fp16 (GPTQ's dtype)"
        return model, copied
    if not o.requantize:
        raise ValueError(f"{problem}; converting means dequantizing and quantizing again (lossy): pass "
                         "requantize=True (--requantize)")  # fmt: skip
    return _quantized_copy(merged_copy(model), tokenizer, to, o), "dequantized, then " + _quantize_words(to, o)


def _unstorable(layers: list[nn.Module], to: str) -> str | None:
    """Why `to` cannot hold these quantized layers as they are (None if it can)."""
    names = sorted({m.fmt.name if isinstance(m, QuantLinear) else type(m).__name__ for m in layers})
    if to == "lowbit":
        return None
    allowed = BNB_CODEBOOKS if to == "bnb-nf4" else GPTQ_FORMATS
    if any(not isinstance(m, QuantLinear) for m in layers) or not set(names) <= set(allowed):
        return f"the source holds {'/'.join(names)} layers and {to} stores only {'/'.join(allowed)} weights"
    if to == "gptq" and len({(m.fmt.name, m.fmt.group_size, m.fmt.symmetric) for m in layers}) > 1:
        return "the source mixes bit widths / group sizes / symmetry, and a GPTQ config holds one of each"
    return None


def _quant_config(to: str, o: ConvertOptions) -> QuantConfig:
    fmt = {"bnb-nf4": "nf4", "gptq": f"int{o.bits}"}.get(to, o.format)
    grouped = fmt.startswith("int") or fmt.startswith("fp8")
    options = {"act_order": o.desc_act, "n_samples": o.calibration_samples} if o.method == "gptq" else {}
    return QuantConfig(method=o.method, format=fmt, group_size=o.group_size if grouped else None, symmetric=o.sym,
                       options=options)  # fmt: skip


def _quantize_words(to: str, o: ConvertOptions) -> str:
    c = _quant_config(to, o)
    detail = f" g{c.group_size}" if c.group_size else ""
    if c.format.startswith("int"):
        detail += " (symmetric)" if c.symmetric else " (affine)"
    return f"quantized to {c.format}{detail} by {c.method}"


def _quantized_copy(model: nn.Module, tokenizer, to: str, o: ConvertOptions) -> nn.Module:
    model = copy.deepcopy(model)
    config = _quant_config(to, o)
    if config.method == "gptq":
        text = reference_text()
        quantize(model, config, calibration=text[len(text) // 2 :], tokenizer=tokenizer)  # eval uses the first half
    else:
        quantize(model, config)
    return model


def _write(model: nn.Module, tokenizer, dst: Path, to: str, kind: str, o: ConvertOptions) -> None:
    if to == "lowbit":
        save_quantized(model, dst, tokenizer)
    elif to == "bnb-nf4":
        save_bnb_4bit(model, dst, tokenizer)
    elif to == "gptq":
        save_gptq(model, dst, tokenizer, checkpoint_format=o.checkpoint_format)
    else:
        pre = "smollm" if kind == "packaged" else "default"  # llama.cpp's pre-tokenizer name
        export_gguf(model, dst, tokenizer=tokenizer, dtype=o.gguf_type, tokenizer_pre=pre)


@torch.no_grad()
def compare_models(source: nn.Module, result: nn.Module, tokenizer, windows: int = 4, context: int = 256,
                   report: ConvertReport | None = None) -> ConvertReport:  # fmt: skip
    """Fill `report` with KL(source ‖ result), both perplexities and max |Δlogit| on the reference text's 1st half."""
    report = report or ConvertReport("source", "", "", "result", "")
    text = reference_text()
    ids = eval_token_ids(text[: len(text) // 2], tokenizer)
    logits: dict[str, list[torch.Tensor]] = {"source": [], "result": []}

    def capture(key):
        def hook(_module, _args, output):
            logits[key].append(output.logits[0, :-1].float().cpu())  # (T − 1, V), as the helpers score them

        return hook

    handle = source.register_forward_hook(capture("source"))
    try:
        reference = next_token_reference(source, ids, context, windows)
    finally:
        handle.remove()
    handle = result.register_forward_hook(capture("result"))
    try:
        kl, ppl_source, ppl_result, n = compare_next_token(result, reference)
    finally:
        handle.remove()
    report.max_abs_logit_diff = max(float((a - b).abs().max()) for a, b in zip(logits["source"], logits["result"]))
    report.kl_divergence, report.perplexity_source, report.perplexity_result = kl, ppl_source, ppl_result
    report.eval_tokens = n
    return report
