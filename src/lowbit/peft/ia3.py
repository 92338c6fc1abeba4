"""(IA)³: learned vectors that rescale keys, values and the feed-forward activation.

Liu et al., "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning"
(2022), §3.3, eq. in the text: attention becomes softmax(Q (l_k ⊙ K)ᵀ / √d) (l_v ⊙ V) and the feed-forward
block (l_ff ⊙ γ(W₁x)) W₂, with l_k, l_v ∈ R^{d_kv}, l_ff ∈ R^{d_ff} per layer, initialised to ones (the
model starts unchanged) and the only trained parameters.

Here a target linear layer is wrapped in `IA3Linear`:
  - attention targets (k_proj, v_proj): the output is scaled, y = l ⊙ (x Wᵀ + b), l of shape (out, 1);
    K is scaled as it leaves k_proj, before the rotary embedding — PEFT's choice, and the one that keeps
    merging exact;
  - feed-forward targets (down_proj / fc2 / output.dense): the input is scaled, y = (l ⊙ x) Wᵀ + b, l of
    shape (1, in) — the input of the down projection *is* the intermediate activation γ(W₁x).
Shapes and names follow PEFT's IA3 (`base_model.model.<module>.ia3_l`), so files move both ways.

Merging folds the vectors into the weights: W ← diag(l) W and b ← l ⊙ b for attention targets (rows
scaled), W ← W diag(l) for feed-forward targets (columns scaled, bias untouched); afterwards the model is
a plain model again. Several IA3 adapters on one layer multiply (as PEFT does with several active ones).
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, replace

import torch
from torch import nn

from lowbit.nn.matching import matches_any
from lowbit.peft.registry import PeftMethod, record_adapter, register_peft_method
from lowbit.peft.state_check import check_adapter_state, check_new_adapter_name

CONFIG_VERSION = 1
# model_type → (targets, feed-forward targets, excluded): the paper's keys, values and FF activation.
# BERT's "output.dense" pattern also names attention.output.dense, the attention output projection,
# which is not part of (IA)³: it is excluded by name.
DEFAULT_TARGETS = {
    **{t: (("k_proj", "v_proj", "down_proj"), ("down_proj",), ())
       for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo", "olmo2")},
    **{t: (("key", "value", "output.dense"), ("output.dense",), ("attention.output.dense",))
       for t in ("bert", "roberta")},
    "opt": (("k_proj", "v_proj", "fc2"), ("fc2",), ()),
}  # fmt: skip
PLAIN_PATTERN = re.compile(r"[\w.]+")
IGNORED_PEFT_FIELDS = ("peft_version", "auto_mapping", "base_model_name_or_path", "revision", "inference_mode",
                       "init_ia3_weights")  # fmt: skip

Patterns = tuple[str, ...] | str  # tuple: anchored patterns (lowbit.nn.matching); str: a regex, fully matched


@dataclass(frozen=True)
class IA3Config:
    """target_modules: layers that get a vector; feedforward_modules: those of them scaled on the input side.
    Each is a tuple of anchored name patterns (see lowbit.nn.matching) or one regex string that must match
    the whole module name (PEFT's string form). None = the architecture's defaults (keys, values, FF
    down projection). exclude_modules: names never targeted.
    """

    target_modules: Patterns | None = None
    feedforward_modules: Patterns | None = None
    exclude_modules: Patterns = ()
    task_type: str | None = "CAUSAL_LM"
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        for field in ("target_modules", "feedforward_modules", "exclude_modules"):
            value = getattr(self, field)
            if value is None or isinstance(value, str):
                if isinstance(value, str):
                    try:
                        re.compile(value)
                    except re.error as e:
                        raise ValueError(f"IA3Config.{field} is not a valid regex: {e}") from None
                continue
            value = tuple(value)
            if not all(isinstance(p, str) and p for p in value):
                raise ValueError(f"IA3Config.{field} must hold non-empty strings, got {value!r}")
            object.__setattr__(self, field, value)
        targets, ff = self.target_modules, self.feedforward_modules
        # PEFT refuses two name lists where feed-forward names are not among the targets; lists are what
        # plain patterns are written as (globs become a regex, which PEFT does not check)
        plain = isinstance(targets, tuple) and isinstance(ff, tuple) and all(map(PLAIN_PATTERN.fullmatch, targets + ff))
        if plain and not set(ff) <= set(targets):
            raise ValueError(f"feedforward_modules {ff} must be a subset of target_modules {targets}")
        if targets == ():
            raise ValueError("IA3Config.target_modules is empty")
        if self.version != CONFIG_VERSION:
            raise ValueError(f"IA3Config version {self.version} is not supported (this lowbit reads {CONFIG_VERSION})")


def _selected(name: str, patterns: Patterns) -> bool:
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return matches_any(name, patterns)


class IA3Linear(nn.Module):
    """A linear layer whose output (attention) or input (feed-forward) is rescaled by learned vectors."""

    def __init__(self, base_layer: nn.Module, is_feedforward: bool) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.is_feedforward = is_feedforward
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.ia3_l = nn.ParameterDict()  # adapter name → (1, in) or (out, 1)

    def add_adapter(self, adapter_name: str) -> None:
        shape = (1, self.in_features) if self.is_feedforward else (self.out_features, 1)
        device = next(self.base_layer.buffers(), next(self.base_layer.parameters(), None))
        device = device.device if device is not None else None
        self.ia3_l[adapter_name] = nn.Parameter(torch.ones(shape, device=device))  # ones: starts as the identity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not len(self.ia3_l):
            return self.base_layer(x)
        scale = 1
        for vector in self.ia3_l.values():
            scale = scale * vector.flatten()  # (in,) or (out,)
        if self.is_feedforward:
            return self.base_layer((x.to(scale.dtype) * scale).to(x.dtype))  # (…, in) scaled, then W
        y = self.base_layer(x)  # (…, out)
        return (y * scale).to(y.dtype)


def _resolve(model: nn.Module, config: IA3Config) -> IA3Config:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    default = DEFAULT_TARGETS.get(model_type)
    if config.target_modules is None or config.feedforward_modules is None:
        if default is None:
            raise ValueError(f"no default IA3 targets for model_type {model_type!r}: set target_modules and "
                             "feedforward_modules (() for none)")  # fmt: skip
        if config.target_modules is None:
            config = replace(config, target_modules=default[0], exclude_modules=config.exclude_modules or default[2])
        if config.feedforward_modules is None:
            ff = default[1] if isinstance(config.target_modules, str) else tuple(
                p for p in default[1] if p in config.target_modules)  # fmt: skip
            config = replace(config, feedforward_modules=ff)
    return config


def find_ia3_targets(model: nn.Module, config: IA3Config) -> list[tuple[str, nn.Module, bool]]:
    """(name, module, is_feedforward) for every layer the (resolved) config targets, in model order."""
    found = []
    for name, module in model.named_modules():
        if not name or "base_layer" in name.split(".") or not _selected(name, config.target_modules):
            continue
        if config.exclude_modules and _selected(name, config.exclude_modules):
            continue
        is_ff = _selected(name, config.feedforward_modules)
        if isinstance(module, IA3Linear):
            if module.is_feedforward != is_ff:
                kind = "feed-forward" if module.is_feedforward else "attention"
                raise ValueError(f"{name} already carries IA3 as a {kind} target; another adapter cannot treat it "
                                 "differently")  # fmt: skip
        elif not all(isinstance(getattr(module, a, None), int) for a in ("in_features", "out_features")):
            raise ValueError(f"IA3 target {name} is a {type(module).__name__}; IA3 wraps linear layers "
                             "(nn.Linear, QuantLinear) that have in_features/out_features")  # fmt: skip
        found.append((name, module, is_ff))
    if not found:
        raise ValueError(f"IA3 target_modules {config.target_modules!r} match no layer of this model")
    return found


def apply_ia3(model: nn.Module, config: IA3Config | None = None, adapter_name: str = "default") -> nn.Module:
    """Freeze the model and wrap every targeted layer in `IA3Linear` with ones-initialised vectors (in place)."""
    check_new_adapter_name(model, adapter_name)
    config = _resolve(model, config or IA3Config())
    targets = find_ia3_targets(model, config)
    for p in model.parameters():
        p.requires_grad_(False)
    for name, module, is_ff in targets:
        if not isinstance(module, IA3Linear):
            module = IA3Linear(module, is_ff)
            model.set_submodule(name, module)
        module.add_adapter(adapter_name)
    record_adapter(model, adapter_name, config)
    return model


def _layers_with(model: nn.Module, adapter_name: str) -> list[tuple[str, IA3Linear]]:
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, IA3Linear) and adapter_name in m.ia3_l]
    if not layers or not isinstance((getattr(model, "lowbit_adapters", None) or {}).get(adapter_name), IA3Config):
        raise ValueError(f"the model has no IA3 adapter named {adapter_name!r}")
    return layers


def _drop(model: nn.Module, adapter_name: str, layers: list[tuple[str, IA3Linear]]) -> None:
    for name, layer in layers:
        del layer.ia3_l[adapter_name]
        if not len(layer.ia3_l):  # the last vector is gone: put the plain layer back
            model.set_submodule(name, layer.base_layer)
    del model.lowbit_adapters[adapter_name]


def remove_ia3(model: nn.Module, adapter_name: str = "default") -> nn.Module:
    """Take adapter `adapter_name` off; layers left without vectors become their base layer again."""
    _drop(model, adapter_name, _layers_with(model, adapter_name))
    return model


def merge_ia3(model: nn.Module, adapter_name: str = "default") -> nn.Module:
    """Fold the adapter's vectors into the base weights and remove it.

    Attention targets: W ← diag(l)·W, b ← l ⊙ b; feed-forward targets: W ← W·diag(l). Needs nn.Linear bases.
    """
    layers = _layers_with(model, adapter_name)
    for name, layer in layers:
        if type(layer.base_layer) is not nn.Linear:
            raise ValueError(f"cannot merge IA3 into {name}: its base is a {type(layer.base_layer).__name__}, "
                             "merging needs a plain nn.Linear weight (dequantize the model first)")  # fmt: skip
    with torch.no_grad():
        for _, layer in layers:
            base, vector = layer.base_layer, layer.ia3_l[adapter_name]
            base.weight.copy_(base.weight * vector.to(base.weight.dtype))  # (out, in) · (out, 1) or (1, in)
            if base.bias is not None and not layer.is_feedforward:
                base.bias.copy_(base.bias * vector.flatten().to(base.bias.dtype))
    _drop(model, adapter_name, layers)
    return model


def ia3_state_dict(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    return {f"base_model.model.{name}.ia3_l": layer.ia3_l[adapter_name].detach().clone()
            for name, layer in _layers_with(model, adapter_name)}  # fmt: skip


def load_ia3_state_dict(model: nn.Module, state: dict[str, torch.Tensor], adapter_name: str) -> None:
    layers = _layers_with(model, adapter_name)
    keys = {f"base_model.model.{name}.ia3_l": layer.ia3_l[adapter_name] for name, layer in layers}
    check_adapter_state({k: tuple(v.shape) for k, v in keys.items()}, state, "IA3")
    with torch.no_grad():
        for key, vector in keys.items():
            vector.copy_(state[key])


def _to_peft_patterns(patterns: Patterns) -> list[str] | str | None:
    """PEFT reads a list as "equal to, or ends with '.' + entry" (lowbit's plain patterns), a string as a
    full-match regex; globs are turned into that regex so that PEFT selects the same layers."""
    if isinstance(patterns, str) or not patterns:
        return patterns or None
    if all(PLAIN_PATTERN.fullmatch(p) for p in patterns):
        return list(patterns)
    parts = [f"{re.escape(p)}|.*\\.{re.escape(p)}|{fnmatch.translate(p)}" for p in patterns]
    return "|".join(f"(?:{part})" for part in parts)


def ia3_to_peft_dict(config: IA3Config) -> dict:
    if config.target_modules is None or config.feedforward_modules is None:
        raise ValueError("write the IA3Config that apply_ia3 recorded (with its targets resolved)")
    return {"peft_type": "IA3", "task_type": config.task_type, "inference_mode": True,
            "target_modules": _to_peft_patterns(config.target_modules),
            "feedforward_modules": _to_peft_patterns(config.feedforward_modules) or [],
            "exclude_modules": _to_peft_patterns(config.exclude_modules),
            "fan_in_fan_out": False, "init_ia3_weights": True, "modules_to_save": None}  # fmt: skip


def ia3_from_peft_dict(d: dict) -> IA3Config:
    if d.get("peft_type") != "IA3":
        raise ValueError(f"expected peft_type 'IA3', got {d.get('peft_type')!r}")
    if d.get("fan_in_fan_out"):
        raise ValueError("fan_in_fan_out=True (GPT-2 Conv1D layers) is not supported by lowbit's IA3")
    if d.get("modules_to_save"):
        raise ValueError(f"modules_to_save is not supported with IA3 here: {d['modules_to_save']}")
    if d.get("target_modules") == "all-linear":
        raise ValueError('target_modules="all-linear" is not supported for IA3; list the layers')

    def patterns(value):
        return value if value is None or isinstance(value, str) else tuple(value)

    return IA3Config(
        target_modules=patterns(d.get("target_modules")),
        feedforward_modules=patterns(d.get("feedforward_modules")) or (),
        exclude_modules=patterns(d.get("exclude_modules")) or (),
        task_type=d.get("task_type"),
    )


IA3 = register_peft_method(
    PeftMethod(
        peft_type="IA3",
        config_cls=IA3Config,
        apply=apply_ia3,
        state_dict=ia3_state_dict,
        load_state_dict=load_ia3_state_dict,
        to_peft_dict=ia3_to_peft_dict,
        from_peft_dict=ia3_from_peft_dict,
    )
)
