"""Calibration for post-training quantization: capture each layer's inputs, block by block.

The sequential scheme of GPTQ (Frantar et al. 2023, §5 "Implementation"): run the embedding once and keep
the inputs of the first transformer block; then, for each block, (1) run the calibration samples through
it with hooks that feed every targeted linear's input to an observer (Hessian, per-channel absmax, …),
(2) let the method quantize that block's layers, (3) run the samples through the *quantized* block to get
the next block's inputs. Only one block's activations (n_samples × seq_len × hidden) are ever held, and
every block is calibrated on what the already-quantized blocks before it really produce. Linear layers
outside the block list (e.g. a classifier head) are calibrated last with whole-model passes.

Activation statistics serve both static quantization (scales precomputed here from absmax) and the
diagnostics of dynamic, per-token schemes (LLM.int8()'s outlier columns).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, fields
from typing import Callable, Iterator

import torch
from torch import nn

CALIBRATION_HELP = "quantize(model, config, calibration=texts, tokenizer=tokenizer) (or a LongTensor of token ids)"


@dataclass(frozen=True)
class CalibrationConfig:
    """How much calibration text: `n_samples` windows of `seq_len` tokens, chosen with `seed`.

    The defaults (32 × 256) are CPU-sized; GPTQ's paper uses 128 × 2048 on a GPU.
    """

    n_samples: int = 32
    seq_len: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if f.name == "seed" else 1):
                raise ValueError(f"calibration {f.name} must be a {'non-negative' if f.name == 'seed' else 'positive'} "
                                 f"int, got {value!r}")  # fmt: skip


def split_options(options: dict, method_options: type, method: str):
    """QuantConfig.options → (method_options(**its keys), CalibrationConfig(**the calibration keys))."""
    calib_keys = {f.name for f in fields(CalibrationConfig)}
    method_keys = {f.name for f in fields(method_options)}
    unknown = set(options) - calib_keys - method_keys
    if unknown:
        raise ValueError(f"unknown {method} option(s) {sorted(unknown)}; {method} takes {sorted(method_keys)} "
                         f"and the calibration options {sorted(calib_keys)}")  # fmt: skip
    calibration = CalibrationConfig(**{k: v for k, v in options.items() if k in calib_keys})
    return method_options(**{k: v for k, v in options.items() if k in method_keys}), calibration


def calibration_ids(calibration, tokenizer, config: CalibrationConfig, method: str = "this method") -> torch.Tensor:
    """Calibration data → (n, T) token ids: up to `n_samples` non-overlapping windows of `seq_len` tokens.

    `calibration`: a text, a list of texts (joined by blank lines and tokenized once, so short documents
    still fill windows), or token ids (T,) / (n, T). Windows are drawn at random (`seed`) among all
    complete ones; a text shorter than one window gives a single shorter sample.
    """
    if calibration is None:
        raise ValueError(f"{method} needs calibration data: {CALIBRATION_HELP}")
    if isinstance(calibration, torch.Tensor):
        if calibration.dtype not in (torch.int64, torch.int32) or calibration.dim() not in (1, 2):
            raise ValueError(f"calibration token ids must be an integer (T,) or (n, T) tensor, got "
                             f"{calibration.dtype} {tuple(calibration.shape)}")  # fmt: skip
        ids = calibration.long().reshape(-1, calibration.shape[-1])[: config.n_samples, : config.seq_len]
        if ids.numel() == 0:
            raise ValueError("calibration token ids are empty")
        return ids
    texts = [calibration] if isinstance(calibration, str) else list(calibration)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise ValueError(f"calibration must be a text, a list of texts or token ids; {CALIBRATION_HELP}")
    if tokenizer is None:
        raise ValueError(f"calibration texts need a tokenizer: {CALIBRATION_HELP}")
    tokens = tokenizer("\n\n".join(texts), return_tensors="pt", verbose=False).input_ids[0]  # (N,)
    if tokens.numel() == 0:
        raise ValueError("the calibration text has no tokens")
    n_windows = tokens.numel() // config.seq_len
    if n_windows == 0:
        return tokens[None]
    starts = torch.arange(n_windows) * config.seq_len
    if n_windows > config.n_samples:
        pick = torch.randperm(n_windows, generator=torch.Generator().manual_seed(config.seed))[: config.n_samples]
        starts = starts[pick.sort().values]
    return torch.stack([tokens[s : s + config.seq_len] for s in starts.tolist()])


def check_finite_activation(x: torch.Tensor, name: str) -> None:
    if not torch.isfinite(x).all():
        raise ValueError(f"calibration activations reaching {name} contain NaN or inf: the model (or the "
                         f"layers quantized before it) produces non-finite values on the calibration data")  # fmt: skip


class HessianObserver:
    """H = 2/N · Σ_t x_t x_tᵀ over the N calibration tokens reaching a linear layer (GPTQ eq. 2's Hessian)."""

    def __init__(self, name: str, in_features: int, device=None) -> None:
        self.name = name
        self.sum = torch.zeros(in_features, in_features, device=device)
        self.n_tokens = 0

    def update(self, x: torch.Tensor) -> None:
        check_finite_activation(x, self.name)
        x = x.detach().reshape(-1, x.shape[-1]).float()  # (T, in)
        self.sum.addmm_(x.t(), x)  # float32 accumulation, as GPTQ's reference
        self.n_tokens += x.shape[0]

    def hessian(self) -> torch.Tensor:
        """(in, in) float64 (all zeros if no token was seen)."""
        return self.sum.double() * (2.0 / max(self.n_tokens, 1))


class AbsMaxObserver:
    """max_t |x_tj| per input channel j (SmoothQuant's max|X_j|, static scales, LLM.int8() outlier columns)."""

    def __init__(self, name: str, in_features: int, device=None) -> None:
        self.name = name
        self.absmax = torch.zeros(in_features, device=device)
        self.n_tokens = 0

    def update(self, x: torch.Tensor) -> None:
        check_finite_activation(x, self.name)
        x = x.detach().reshape(-1, x.shape[-1])
        self.absmax = torch.maximum(self.absmax, x.abs().amax(dim=0).float())
        self.n_tokens += x.shape[0]


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The transformer's block list: the `nn.ModuleList` holding the most parameters (None if none)."""
    best, best_size = None, 0
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module):
            size = sum(p.numel() for p in module.parameters())
            if size > best_size:
                best, best_size = (name, module), size
    return best


class _Captured(Exception):
    """Raised by the hook on the first block: the rest of the model need not run."""


def _run_model(model: nn.Module, ids: torch.Tensor) -> None:
    kwargs = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}
    model(input_ids=ids, **kwargs)


def capture_block_inputs(model: nn.Module, block: nn.Module, ids: torch.Tensor) -> tuple[list[torch.Tensor], dict]:
    """Per sample, the hidden states entering `block`, and the block's other keyword arguments.

    All samples have the same length, so the keyword arguments (position embeddings, masks) are shared.
    """
    hidden: list[torch.Tensor] = []
    block_kwargs: dict = {}

    def hook(module, args, kwargs):
        kwargs = dict(kwargs)
        hidden.append((args[0] if args else kwargs.pop("hidden_states")).detach())
        if not block_kwargs:
            block_kwargs.update({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _Captured

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for row in ids:
                try:
                    _run_model(model, row[None].to(device))
                except _Captured:
                    pass
    finally:
        handle.remove()
    if len(hidden) != len(ids):
        raise RuntimeError(f"the block list of {type(model).__name__} was not reached by the forward pass")
    return hidden, block_kwargs


def run_block(block: nn.Module, hidden: list[torch.Tensor], kwargs: dict) -> list[torch.Tensor]:
    """Each sample's hidden states through `block` (its output hidden states)."""
    outputs = []
    with torch.no_grad():
        for h in hidden:
            out = block(h, **kwargs)
            outputs.append((out[0] if isinstance(out, tuple) else out).detach())
    return outputs


@dataclass
class CalibrationStep:
    """One unit of sequential calibration: a block (or, last, the whole model) and its targeted layers."""

    names: list[str]  # targeted linear layers calibrated in this step, in model order
    prefix: str  # the block's module name ("model.layers.3"); "" for the final whole-model step
    block: nn.Module | None  # the block; None for the whole-model step
    run: Callable[[], None]  # one pass of all calibration samples through this step's scope
    hidden: list[torch.Tensor] | None = None  # block steps: each sample's hidden states entering the block
    kwargs: dict | None = None  # block steps: the block's other keyword arguments

    def observe(self, modules: dict[str, nn.Module], make_observer: Callable) -> dict:
        """Run the samples once with `make_observer(name, module)` watching every module's input."""
        observers = {name: make_observer(name, module) for name, module in modules.items()}
        handles = [
            module.register_forward_pre_hook(lambda mod, args, obs=observers[name]: obs.update(args[0]))
            for name, module in modules.items()
        ]
        try:
            self.run()
        finally:
            for h in handles:
                h.remove()
        return observers


def calibration_steps(model: nn.Module, ids: torch.Tensor, names: list[str], progress: bool = False
                      ) -> Iterator[CalibrationStep]:  # fmt: skip
    """Yield a `CalibrationStep` per block holding targets; resuming the generator moves to the next block.

    Whatever the caller did to the block's layers (quantized them) is in effect when the block then
    computes the next block's inputs. Blocks after the last targeted one are never run.
    """
    found = find_blocks(model)
    prefix, blocks = found if found is not None else ("", nn.ModuleList())
    in_block = [[n for n in names if n.startswith(f"{prefix}.{i}." if prefix else f"{i}.")] for i in range(len(blocks))]
    rest = [n for n in names if not any(n in group for group in in_block)]
    last = max((i for i, group in enumerate(in_block) if group), default=-1)
    if last >= 0:
        hidden, kwargs = capture_block_inputs(model, blocks[0], ids)
        indices = range(last + 1)
        if progress:
            from tqdm.auto import tqdm

            indices = tqdm(indices, desc="calibrate", unit="block")
        for i in indices:
            block = blocks[i]
            if in_block[i]:
                yield CalibrationStep(in_block[i], f"{prefix}.{i}" if prefix else str(i), block,
                                      lambda b=block, h=hidden: run_block(b, h, kwargs), hidden, kwargs)  # fmt: skip
            if i < last:
                hidden = run_block(block, hidden, kwargs)
        del hidden
    if rest:
        device = next(model.parameters()).device

        def run_model() -> None:
            with torch.no_grad():
                for row in ids:
                    _run_model(model, row[None].to(device))

        yield CalibrationStep(rest, "", None, run_model)


def activation_absmax(model: nn.Module, ids: torch.Tensor, names: list[str] | None = None,
                      progress: bool = False) -> dict[str, torch.Tensor]:  # fmt: skip
    """Per-input-channel max |x| of every named linear layer (default: all nn.Linear) over token ids (n, T).

    Block by block, without changing the model: the statistics static activation scales are made from.
    """
    if names is None:
        names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    stats = {}
    for step in calibration_steps(model, ids, names, progress):
        modules = {n: model.get_submodule(n) for n in step.names}
        observed = step.observe(modules, lambda n, m: AbsMaxObserver(n, m.in_features, m.weight.device))
        stats |= {n: obs.absmax for n, obs in observed.items()}
    return stats


class LayerTicker:
    """Moves `lowbit.quantize(progress=True)`'s per-layer bar as a calibrated method finishes each layer.

    `quantize` hands methods a lazy iterator of targets that draws the bar; calibrated methods work
    block by block instead, so they pull one item per finished layer. The first item is pulled at once,
    before any layer is swapped, which fixes the list of targets the bar counts.
    """

    def __init__(self, targets) -> None:
        self._targets = iter(targets)
        next(self._targets, None)

    def done(self) -> None:
        next(self._targets, None)
