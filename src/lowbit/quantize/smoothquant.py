"""SmoothQuant: migrate activation outliers into the weights, then quantize both to int8 (Xiao et al. 2023).

Activations have a few channels with huge magnitudes; weights do not. For a linear layer Y = X Wᵀ, any
per-input-channel factors s leave Y unchanged: Y = (X diag(s)⁻¹)(W diag(s))ᵀ. SmoothQuant picks (eq. 4)

    s_j = max|X_j|^α / max|W_:,j|^(1−α),      α = 0.5 by default,

which balances the two ranges so that both quantize well. The division of X is folded offline into
whatever produces X, so inference pays nothing:

- a LayerNorm / RMSNorm feeding the layers (Llama, Qwen2, Mistral: `input_layernorm` → q, k, v;
  `post_attention_layernorm` → gate, up; OPT: `self_attn_layer_norm` → q, k, v, `final_layer_norm` →
  fc1): γ ← γ / s (and β ← β / s);
- a linear layer whose output channels are the inputs (SwiGLU's `up_proj` → `down_proj`, since
  down's input is act(gate(x)) ⊙ up(x)): that layer's rows (and bias) ← / s.

Max|X_j| comes from calibration (per block, on the already-quantized model's activations). Every
consumer of a smoothed input gets its columns scaled, targeted or not, so the float model is unchanged;
after folding, each block is checked to still compute what it computed (a guard against an architecture
whose module names match but whose wiring differs, e.g. Gemma-2's post-norms); a block that fails is
restored and left unsmoothed, with a warning. Then every targeted layer becomes a `W8A8Linear` (int8
per-channel weights; int8 activations per token at run time or per tensor with a static scale).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from lowbit.nn.w8a8_linear import ACT_SCHEMES, W8A8Linear
from lowbit.quantize.api import register_method, swap_in, target_linears
from lowbit.quantize.calibration import (
    AbsMaxObserver,
    LayerTicker,
    calibration_ids,
    calibration_steps,
    run_block,
    split_options,
)
from lowbit.quantize.report import LayerReport

# (producer, consumers) inside one transformer block, by module names relative to the block.
SMOOTH_GROUPS = (
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ("mlp.up_proj", ("mlp.down_proj",)),
    ("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("final_layer_norm", ("fc1",)),
)
_FLOOR = 1e-5  # as the SmoothQuant reference: keeps s finite for silent channels and tiny weights


@dataclass(frozen=True)
class SmoothQuantOptions:
    alpha: float = 0.5  # migration strength: 0 = leave activations alone, 1 = move everything to the weights
    act_scheme: str = "per_token"  # "per_token" (dynamic) or "per_tensor" (static scale from calibration)
    smooth: bool = True  # False: plain W8A8 (the ablation SmoothQuant is measured against)

    def __post_init__(self) -> None:
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha must be a number in [0, 1], got {self.alpha!r}")
        if self.act_scheme not in ACT_SCHEMES:
            raise ValueError(f"act_scheme must be one of {ACT_SCHEMES}, got {self.act_scheme!r}")
        if not isinstance(self.smooth, bool):
            raise ValueError(f"smooth must be a bool, got {self.smooth!r}")


def smoothing_factors(act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """Eq. 4: s_j = max|X_j|^α / max|W_:,j|^(1−α), W the consumers' (out, in) weights stacked by rows."""
    w_absmax = torch.cat([w.detach().abs().reshape(-1, w.shape[-1]) for w in weights]).amax(dim=0)  # (in,)
    x = act_absmax.to(w_absmax).clamp(min=_FLOOR)
    return (x.pow(alpha) / w_absmax.clamp(min=_FLOOR).pow(1 - alpha)).clamp(min=_FLOOR)


@torch.no_grad()
def fold_smoothing(producer: nn.Module, consumers: list[nn.Linear], s: torch.Tensor) -> None:
    """X ← X / s inside `producer` (norm: γ, β; linear: rows, bias) and W ← W diag(s) in every consumer."""
    if isinstance(producer, nn.Linear):
        producer.weight.div_(s.to(producer.weight)[:, None])
    else:
        producer.weight.div_(s.to(producer.weight))
    if getattr(producer, "bias", None) is not None:
        producer.bias.div_(s.to(producer.bias))
    for linear in consumers:
        linear.weight.mul_(s.to(linear.weight)[None, :])


def _smoothable(block: nn.Module, producer: str, consumers: tuple[str, ...], in_features: int) -> bool:
    names = dict(block.named_modules())
    if producer not in names or not all(c in names for c in consumers):
        return False
    p = names[producer]
    weight = getattr(p, "weight", None)
    width = p.out_features if isinstance(p, nn.Linear) else (weight.shape[0] if weight is not None else -1)
    if type(p) is not nn.Linear and (weight is None or weight.dim() != 1):
        return False  # a quantized producer, or a norm without a per-channel scale
    return width == in_features and all(type(names[c]) is nn.Linear for c in consumers)


def smooth_block(block: nn.Module, act_absmax: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """Fold SmoothQuant factors into `block` in place; `act_absmax` by consumer name relative to the block.

    Returns the factor s that now divides each smoothed consumer's input (by relative name). Norm groups
    first, then linear-to-linear groups (whose consumers' input statistics the norm folds do not change).
    """
    applied: dict[str, torch.Tensor] = {}
    for producer, consumers in SMOOTH_GROUPS:
        first = consumers[0]
        if first not in act_absmax or not _smoothable(block, producer, consumers, act_absmax[first].numel()):
            continue
        linears = [block.get_submodule(c) for c in consumers]
        s = smoothing_factors(act_absmax[first], [m.weight for m in linears], alpha)
        fold_smoothing(block.get_submodule(producer), linears, s)
        applied |= {c: s for c in consumers}
    return applied


def smooth_model(model: nn.Module, ids: torch.Tensor, alpha: float = 0.5) -> dict[str, torch.Tensor]:
    """Apply SmoothQuant's transformation to every block (no quantization): the float model is unchanged.

    Returns the factors by absolute consumer name.
    """
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    factors: dict[str, torch.Tensor] = {}
    for step in calibration_steps(model, ids, names):
        if step.block is not None:
            factors |= _smooth_step(step, alpha)[0]
    return factors


def _smooth_step(step, alpha: float) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Observe a block's linear inputs, smooth it, verify it; → (factors, absmax) by absolute name."""
    linears = {f"{step.prefix}.{n}": m for n, m in step.block.named_modules() if type(m) is nn.Linear}
    observers = step.observe(linears, lambda n, m: AbsMaxObserver(n, m.in_features, m.weight.device))
    absmax = {n: obs.absmax for n, obs in observers.items()}
    before = run_block(step.block, step.hidden[:1], step.kwargs)[0]  # one sample is enough to catch a bad fold
    saved = {k: v.clone() for k, v in step.block.state_dict().items()}
    relative = {n.removeprefix(step.prefix + "."): a for n, a in absmax.items()}
    factors = smooth_block(step.block, relative, alpha)
    after = run_block(step.block, step.hidden[:1], step.kwargs)[0]
    if not torch.allclose(after, before, rtol=1e-3, atol=1e-3 * before.abs().max().item()):
        step.block.load_state_dict(saved)
        warnings.warn(f"SmoothQuant: folding changed the output of {step.prefix} (a wiring lowbit's smoothing "
                      f"rules do not know); this block is left unsmoothed", stacklevel=3)  # fmt: skip
        factors = {}
    return {f"{step.prefix}.{n}": s for n, s in factors.items()}, absmax


@register_method("smoothquant")
def quantize_smoothquant(model, config, targets, calibration=None, tokenizer=None) -> list[LayerReport]:
    """`lowbit.quantize(model, QuantConfig(method="smoothquant", format="int8", options={"alpha": 0.5}), …)`."""
    options, calib = split_options(config.options, SmoothQuantOptions, "smoothquant")
    if config.format != "int8":
        raise ValueError(f"smoothquant is W8A8: use format='int8', got {config.format!r}")
    ticker = LayerTicker(targets)
    names = target_linears(model, config)
    if not names:
        return []
    ids = calibration_ids(calibration, tokenizer, calib, "smoothquant")
    reports = []
    for step in calibration_steps(model, ids, names):
        if step.block is not None and options.smooth:
            factors, absmax = _smooth_step(step, options.alpha)
        else:
            layers = {n: model.get_submodule(n) for n in step.names}
            observers = step.observe(layers, lambda n, m: AbsMaxObserver(n, m.in_features, m.weight.device))
            factors, absmax = {}, {n: obs.absmax for n, obs in observers.items()}
        for name in step.names:
            linear = model.get_submodule(name)
            x_absmax = absmax[name] / factors[name] if name in factors else absmax[name]  # what reaches it now
            module = W8A8Linear.from_linear(linear, compute_dtype=config.torch_compute_dtype,
                                            act_scheme=options.act_scheme,
                                            input_absmax=float(x_absmax.max()))  # fmt: skip
            reports.append(swap_in(model, name, linear, module))
            ticker.done()
    return reports
