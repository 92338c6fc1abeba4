"""LoRA: low-rank adaptation of frozen linear layers (Hu et al. 2021), and QLoRA over a quantized base.

A frozen weight W0 (out, in) gets a trainable low-rank update (LoRA eq. 3):

    h = W0·x + (alpha / r) · B·A·x,      A: (r, in),  B: (out, r),  r ≪ min(in, out)

A starts Kaiming-uniform (a = √5, as `nn.Linear` and HF peft do) and B starts at zero, so the model's
output is unchanged at initialisation and only the r·(in + out) values of A and B are trained.
rsLoRA (Kalajdzievski 2023) scales by alpha/√r instead, which keeps the update's size stable as r grows.

QLoRA (Dettmers et al. 2023, eq. 5) is the same wrapper around a `QuantLinear` (NF4 + double quant):
the base is dequantized on the fly inside its own forward and backward, the gradient reaches A and B
through it, and the LoRA path is computed in the QuantLinear's compute dtype (bf16 in the paper) while
A and B themselves may stay fp32. `LoraLinear` never looks inside a format: it uses the base layer's
forward and, to merge, its `dequantize()` — one wrapper for every storage format.

`merge_lora` folds B·A into the base; `unmerge_lora` restores the base exactly, because merge keeps
what it replaced (the original weight tensor, or the original QuantLinear) instead of subtracting the
update again (W0 + Δ − Δ ≠ W0 in floating point). That costs one copy of each merged dense weight
until `unmerge_lora` or `remove_lora`; `remove_lora(model, merge=True)` keeps nothing.

Files: `lowbit.peft.save_adapter` writes HF peft's layout through the functions at the end of this
module (keys `base_model.model.<module>.lora_A.weight` / `lora_B.weight`, config `peft_type: "LORA"`).
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass, field, replace
from typing import Sequence

import torch
from torch import nn

from lowbit.nn.matching import matches_any
from lowbit.nn.quant_linear import QuantLinear
from lowbit.peft.partial import ModulesToSave, PartialConfig, find_modules_to_save
from lowbit.peft.registry import PeftMethod, record_adapter, register_peft_method

CONFIG_VERSION = 1
ALL_LINEAR = "all-linear"
LORA_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
INIT_CHOICES = (True, False, "gaussian")
# Output heads that "all-linear" leaves alone (besides the model's get_output_embeddings()): training a
# vocabulary- or label-sized projection is what modules_to_save is for, and peft skips them too.
HEAD_NAMES = ("lm_head", "classifier", "score")
MERGE_MODES = ("dense", "requantize")
PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class LoraConfig:
    """Which linear layers get a LoRA update, and its rank, scale and initialisation.

    r, alpha: rank and scale; the update is (alpha / r)·B·A, or (alpha / √r)·B·A with `use_rslora`.
    dropout: dropout on the LoRA path's input during training (peft's lora_dropout).
    target_modules: "all-linear" (every nn.Linear / QuantLinear except the output head), a tuple of
        anchored name patterns (`lowbit.nn.matching`: "q_proj" picks every layer's q_proj), or a single
        string, which — as in PEFT's adapter_config.json — is a regular expression the whole module name
        must match.
    exclude_modules: modules to leave out; a tuple of names/suffixes, or a regular expression (PEFT's rule).
    rank_pattern, alpha_pattern: {pattern: r} / {pattern: alpha} overrides per module. A key is a regular
        expression matched against a whole dotted suffix of the name (PEFT's rule: "q_proj" matches
        "model.layers.0.self_attn.q_proj"; "layers\\.0\\..*" matches all of layer 0); first match wins.
    init_lora_weights: True (A Kaiming-uniform, B zero), "gaussian" (A ~ N(0, 1/r²), B zero) or False
        (B random too: the adapter changes the output from the start; for tests).
    lora_dtype: dtype of A and B ("float32" default; "bfloat16" as in the QLoRA paper).
    modules_to_save: whole modules trained alongside (e.g. a new classification head), as PEFT's field of
        that name: anchored name patterns; each runs a trainable copy (`lowbit.peft.partial.ModulesToSave`)
        and saves as `base_model.model.<module>.<parameter>`. LoRA never targets layers inside them.
    """

    r: int = 8
    alpha: float = 8
    dropout: float = 0.0
    target_modules: str | tuple[str, ...] = ALL_LINEAR
    exclude_modules: str | tuple[str, ...] | None = None
    use_rslora: bool = False
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    init_lora_weights: bool | str = True
    lora_dtype: str = "float32"
    modules_to_save: tuple[str, ...] | None = None
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        if self.version != CONFIG_VERSION:
            raise ValueError(f"LoraConfig version {self.version} is not supported (this lowbit reads {CONFIG_VERSION})")
        _check_rank(self.r, "r")
        _check_alpha(self.alpha, "alpha")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if value is None or isinstance(value, str):
                if isinstance(value, str):
                    _check_regex(value, name)
                continue
            value = tuple(value)
            if not value or not all(isinstance(p, str) and p for p in value):
                raise ValueError(f"{name} must be 'all-linear', a regex string or a non-empty tuple of names,"
                                 f" got {value!r}")  # fmt: skip
            object.__setattr__(self, name, value)
        if self.target_modules is None:
            raise ValueError("target_modules is required ('all-linear', a regex string or a tuple of names)")
        for name, check in (("rank_pattern", _check_rank), ("alpha_pattern", _check_alpha)):
            patterns = dict(getattr(self, name))
            for key, value in patterns.items():
                _check_regex(key, f"{name} key")
                check(value, f"{name}[{key!r}]")
            object.__setattr__(self, name, patterns)
        if self.init_lora_weights not in INIT_CHOICES or not isinstance(self.init_lora_weights, (bool, str)):
            raise ValueError(f"init_lora_weights must be one of {INIT_CHOICES}, got {self.init_lora_weights!r}")
        if self.lora_dtype not in LORA_DTYPES:
            raise ValueError(f"lora_dtype must be one of {list(LORA_DTYPES)}, got {self.lora_dtype!r}")
        if self.modules_to_save is not None:  # PartialConfig validates the patterns
            object.__setattr__(self, "modules_to_save", PartialConfig(self.modules_to_save).modules_to_save)

    def rank_for(self, module_name: str) -> int:
        return _pattern_value(self.rank_pattern, module_name, self.r)

    def alpha_for(self, module_name: str) -> float:
        return _pattern_value(self.alpha_pattern, module_name, self.alpha)

    def scaling_for(self, module_name: str) -> float:
        r, alpha = self.rank_for(module_name), self.alpha_for(module_name)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def _check_rank(value, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")


def _check_alpha(value, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{what} must be a positive number, got {value!r}")


def _check_regex(pattern: str, what: str) -> None:
    try:
        re.compile(pattern)
    except re.error as e:
        raise ValueError(f"{what} {pattern!r} is not a valid regular expression: {e}") from None


def _pattern_value(patterns: dict, module_name: str, default):
    """PEFT's rank/alpha pattern rule: the key must match a whole dotted suffix of the name."""
    for key, value in patterns.items():
        if re.fullmatch(rf"(?:.*\.)?(?:{key})", module_name):
            return value
    return default


def _device_of(module: nn.Module) -> torch.device:
    for t in itertools.chain(module.parameters(), module.buffers()):
        return t.device
    return torch.device("cpu")


class LoraLinear(nn.Module):
    """A linear layer (nn.Linear or QuantLinear) plus any number of named LoRA updates.

    y = base(x) + Σ_active (alpha_i / r_i) · dropout(x)·A_iᵀ·B_iᵀ, computed in the base's compute dtype.
    `row_adapters` (set by `lowbit.peft.mixed_batch`) routes each batch row to its own adapter instead.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        if not isinstance(base_layer, (nn.Linear, QuantLinear)):
            raise TypeError(f"LoRA wraps nn.Linear or QuantLinear, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.lora_A = nn.ParameterDict()  # name → (r, in)
        self.lora_B = nn.ParameterDict()  # name → (out, r)
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        self.row_adapters: list[str | None] | None = None
        self._premerge: tuple[str, object] | None = None  # what merge() replaced; a tuple is never registered

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def add_adapter(self, name: str, r: int, scaling: float, dropout: float, init: bool | str,
                    dtype: torch.dtype) -> None:  # fmt: skip
        if name in self.lora_A:
            raise ValueError(f"this layer already has a LoRA adapter named {name!r}")
        kw = {"dtype": dtype, "device": _device_of(self.base_layer)}
        a, b = torch.empty(r, self.in_features, **kw), torch.empty(self.out_features, r, **kw)
        if init == "gaussian":
            nn.init.normal_(a, std=1.0 / r)
        else:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # bound 1/√in, like nn.Linear(in, r)
        if init is False:
            nn.init.kaiming_uniform_(b, a=math.sqrt(5))
        else:
            nn.init.zeros_(b)  # zero update at init: the wrapped model computes what the base did
        self.lora_A[name], self.lora_B[name] = nn.Parameter(a), nn.Parameter(b)
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling[name] = scaling

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise ValueError(f"adapter {name!r} is merged into the base; unmerge it before deleting")
        del self.lora_A[name], self.lora_B[name], self.lora_dropout[name]
        del self.scaling[name]
        self.active_adapters = [n for n in self.active_adapters if n != name]

    def compute_dtype(self) -> torch.dtype:
        base = self.base_layer
        return base.compute_dtype if isinstance(base, QuantLinear) else base.weight.dtype

    def lora_output(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """(alpha/r)·B·A·dropout(x) for one adapter: (…, in) → (…, out) in the compute dtype."""
        dtype = self.compute_dtype()
        h = self.lora_dropout[name](x).to(dtype)
        h = nn.functional.linear(h, self.lora_A[name].to(dtype))  # (…, r)
        return nn.functional.linear(h, self.lora_B[name].to(dtype)) * self.scaling[name]  # (…, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        # A merged-dense base may hold another dtype than the activations; .to is free when they agree.
        y = base(x.to(base.weight.dtype)).to(x.dtype) if isinstance(base, nn.Linear) else base(x)
        if self.row_adapters is not None:  # a mixed batch overrides active/disabled for its duration
            return y + self._mixed_output(x).to(y.dtype)
        if self.disabled:
            return y
        for name in self.active_adapters:
            if name not in self.merged_adapters:
                y = y + self.lora_output(name, x).to(y.dtype)
        return y

    def _mixed_output(self, x: torch.Tensor) -> torch.Tensor:
        """Each batch row through its own adapter (or none): one matmul pair per adapter present."""
        rows = self.row_adapters
        if x.dim() < 2 or x.shape[0] != len(rows):
            raise ValueError(f"mixed batch names {len(rows)} rows but the input has shape {tuple(x.shape)}")
        out = x.new_zeros(x.shape[:-1] + (self.out_features,), dtype=self.compute_dtype())  # (B, …, out)
        for name in dict.fromkeys(n for n in rows if n is not None and n in self.lora_A):
            index = torch.tensor([i for i, n in enumerate(rows) if n == name], device=x.device)
            out = out.index_put((index,), self.lora_output(name, x[index]))
        return out

    def delta_weight(self, name: str) -> torch.Tensor:
        """ΔW = (alpha/r)·B·A as a dense fp32 (out, in) matrix."""
        return (self.lora_B[name].detach().float() @ self.lora_A[name].detach().float()) * self.scaling[name]

    @torch.no_grad()
    def merge(self, names: Sequence[str], mode: str = "dense", dtype: torch.dtype | None = None) -> None:
        """Fold the adapters `names` into the base (see `merge_lora`); keeps the old base for `unmerge`."""
        if self.merged_adapters:
            raise ValueError(f"adapters {self.merged_adapters} are already merged; unmerge first")
        names = [n for n in names if n in self.lora_A]
        if not names:
            return
        delta = sum(self.delta_weight(n) for n in names)  # (out, in) fp32
        base = self.base_layer
        if isinstance(base, nn.Linear):
            old = base.weight.data
            base.weight.data = (old.float() + delta.to(old.device)).to(old.dtype)
            self._premerge = ("weight", old)
        else:
            w = base.dequantize(torch.float32) + delta.to(_device_of(base))  # reached through its interface
            self.base_layer = _dense_or_requantized(base, w, mode, dtype)
            self._premerge = ("module", base)
        self.merged_adapters = list(names)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Put back exactly the base that `merge` replaced."""
        if self._premerge is None:
            return
        kind, old = self._premerge
        if kind == "weight":
            self.base_layer.weight.data = old.to(self.base_layer.weight.device)
        else:
            self.base_layer = old.to(_device_of(self.base_layer))
        self._premerge, self.merged_adapters = None, []

    def extra_repr(self) -> str:
        ranks = {n: a.shape[0] for n, a in self.lora_A.items()}
        return f"adapters(rank)={ranks}, active={self.active_adapters}, merged={self.merged_adapters}"


def _dense_or_requantized(base: QuantLinear, w: torch.Tensor, mode: str, dtype: torch.dtype | None) -> nn.Module:
    """A merged fp32 weight `w` as an nn.Linear in `dtype` (default: the compute dtype), or re-encoded in
    the base's own WeightFormat with the same compute dtype."""
    has_bias = base.bias is not None
    if mode == "requantize":
        dense = nn.Linear(base.in_features, base.out_features, bias=has_bias, device=w.device)
        dense.weight.copy_(w)
        if has_bias:
            dense.bias.copy_(base.bias.float())
        requantized = QuantLinear.from_linear(dense, base.fmt, base.compute_dtype)
        if hasattr(base, "kernel"):  # keep the matmul path the user chose for this layer
            requantized.kernel = base.kernel
        return requantized
    dtype = dtype or base.compute_dtype
    dense = nn.Linear(base.in_features, base.out_features, bias=has_bias, device=w.device, dtype=dtype)
    dense.weight.copy_(w)
    if has_bias:
        dense.bias.copy_(base.bias)
    return dense.requires_grad_(False)


# --- selecting and wrapping layers ---------------------------------------------------------------------


def _head_names(model: nn.Module) -> set[str]:
    heads = set(HEAD_NAMES)
    try:
        out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    except NotImplementedError:
        out = None
    if out is not None:
        heads |= {name for name, module in model.named_modules() if module is out}
    return heads


def _selected(name: str, patterns: str | tuple[str, ...] | None) -> bool:
    if patterns is None:
        return False
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return matches_any(name, patterns)


def _modules_to_save(model: nn.Module, config: LoraConfig) -> list[tuple[str, nn.Module]]:
    return find_modules_to_save(model, PartialConfig(config.modules_to_save)) if config.modules_to_save else []


def find_lora_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """Names of the layers `config` selects: nn.Linear / QuantLinear, or LoraLinear (another adapter)."""
    heads = _head_names(model) if config.target_modules == ALL_LINEAR else set()
    # Prefixes to skip: inside a LoraLinear (its base_layer is no separate target) or a module to save.
    inside = [name + "." for name, _ in _modules_to_save(model, config)]
    names = []
    for name, module in model.named_modules():
        if any((name + ".").startswith(p) for p in inside):
            continue
        if isinstance(module, LoraLinear):
            inside.append(name + ".")
        elif not isinstance(module, (nn.Linear, QuantLinear)):
            continue
        chosen = name not in heads if config.target_modules == ALL_LINEAR else _selected(name, config.target_modules)
        if chosen and not _selected(name, config.exclude_modules):
            names.append(name)
    return names


def lora_layers(model: nn.Module) -> list[tuple[str, LoraLinear]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLinear)]


def set_active_lora(model: nn.Module, names: Sequence[str]) -> None:
    """Make exactly `names` the active LoRA adapters of every layer that has them (no validation)."""
    for _, layer in lora_layers(model):
        layer.active_adapters = [n for n in names if n in layer.lora_A]


def apply_lora(model: nn.Module, config: LoraConfig | None = None, adapter_name: str = "default") -> nn.Module:
    """Wrap the layers `config` selects with LoRA adapter `adapter_name`, in place; returns `model`.

    Every parameter already in the model is frozen; the new A and B are the only trainable tensors, and
    the new adapter becomes the active one. A model can carry several adapters (see lowbit.peft.multi).
    """
    config = config or LoraConfig()
    _check_can_add(model, config, adapter_name)
    saved = _modules_to_save(model, config)
    targets = find_lora_targets(model, config)
    if not targets:
        hint = " (a single string is a regular expression over the whole name, as in PEFT; pass a tuple such" \
               " as ('q_proj',) to match by name)" if isinstance(config.target_modules, str) else ""  # fmt: skip
        raise ValueError(f"target_modules {config.target_modules!r} matches no linear layer of the model{hint}")
    for p in model.parameters():
        p.requires_grad_(False)
    dtype = LORA_DTYPES[config.lora_dtype]
    for name in targets:
        module = model.get_submodule(name)
        layer = module if isinstance(module, LoraLinear) else LoraLinear(module)
        layer.add_adapter(adapter_name, config.rank_for(name), config.scaling_for(name), config.dropout,
                          config.init_lora_weights, dtype)  # fmt: skip
        if layer is not module:
            model.set_submodule(name, layer)
    for name, module in saved:
        model.set_submodule(name, ModulesToSave(module, adapter_name))  # runs a trainable copy
    # Record the resolved names: the saved adapter_config.json then means the same layers to HF peft.
    resolved = replace(config, target_modules=tuple(targets), exclude_modules=None,
                       modules_to_save=tuple(name for name, _ in saved) or None)  # fmt: skip
    record_adapter(model, adapter_name, resolved)
    set_active_lora(model, [adapter_name])
    return model


def saved_module_wrappers(model: nn.Module, adapter_names: Sequence[str]) -> list[tuple[str, ModulesToSave]]:
    """The modules_to_save wrappers that belong to the given adapters."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, ModulesToSave) and m.adapter_name in adapter_names]


def _check_can_add(model: nn.Module, config: LoraConfig, adapter_name: str) -> None:
    if not isinstance(config, LoraConfig):
        raise TypeError(f"apply_lora takes a LoraConfig, got {type(config).__name__}")
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise ValueError(f"adapter_name must be a non-empty string without '.', got {adapter_name!r}")
    if adapter_name in getattr(model, "lowbit_adapters", {}):
        raise ValueError(f"an adapter named {adapter_name!r} is already on this model")
    if any(layer.merged_adapters for _, layer in lora_layers(model)):
        raise ValueError("this model has merged LoRA adapters; unmerge_lora(model) before adding another")


def _check_untied(model: nn.Module, layers: list[tuple[str, LoraLinear]]) -> None:
    counts: dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            counts[id(p)] = counts.get(id(p), 0) + 1
    for name, layer in layers:
        if isinstance(layer.base_layer, nn.Linear) and counts[id(layer.base_layer.weight)] > 1:
            raise ValueError(f"{name}'s weight is tied to another module (e.g. the embeddings);"
                             " merging into it would change both")  # fmt: skip


def merge_lora(model: nn.Module, mode: str = "dense", dtype: torch.dtype | None = None) -> nn.Module:
    """Fold every layer's active LoRA adapters into its base weight, in place; returns `model`.

    nn.Linear base: W ← W + Σ (alpha/r)·B·A in the weight's dtype. QuantLinear base: dequantize → merge
    in fp32, then `mode="dense"` keeps an nn.Linear in `dtype` (default the compute dtype) and
    `mode="requantize"` encodes the merged weight again in the same WeightFormat. The LoRA modules stay,
    so `unmerge_lora` restores the exact pre-merge base (kept meanwhile).
    """
    if mode not in MERGE_MODES:
        raise ValueError(f"mode must be one of {MERGE_MODES}, got {mode!r}")
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers to merge")
    _check_untied(model, layers)
    for _, layer in layers:
        layer.merge(layer.active_adapters, mode, dtype)
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo `merge_lora`: every base weight is bit-identical to what it was before the merge."""
    for _, layer in lora_layers(model):
        layer.unmerge()
    return model


def remove_lora(
    model: nn.Module, merge: bool = False, mode: str = "dense", dtype: torch.dtype | None = None
) -> nn.Module:
    """Replace every LoraLinear by its base layer, in place; returns `model`.

    `merge=True` folds the active adapters in first (peft's merge_and_unload; see `merge_lora` for `mode`
    and `dtype`) and keeps the trained copies of modules_to_save; `merge=False` drops all adapters and
    puts every original module back.
    """
    layers = lora_layers(model)
    if merge and layers:
        _check_untied(model, layers)
    for name, layer in layers:
        if merge:
            if not layer.merged_adapters:
                layer.merge(layer.active_adapters, mode, dtype)
        else:
            layer.unmerge()
        model.set_submodule(name, layer.base_layer)
    adapters = getattr(model, "lowbit_adapters", {})
    lora_names = [n for n, c in adapters.items() if isinstance(c, LoraConfig)]
    for name, wrapper in saved_module_wrappers(model, lora_names):  # merged: keep what was trained
        model.set_submodule(name, wrapper.trained if merge else wrapper.original_module)
    for name in lora_names:
        del adapters[name]
    return model


# --- HF peft file format ---------------------------------------------------------------------------------


def _peft_key(module_name: str, which: str) -> str:
    return f"{PEFT_PREFIX}{module_name}.lora_{which}.weight"


def _adapter_params(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    params = {}
    for name, layer in lora_layers(model):
        if adapter_name in layer.lora_A:
            params[_peft_key(name, "A")] = layer.lora_A[adapter_name]
            params[_peft_key(name, "B")] = layer.lora_B[adapter_name]
    for name, wrapper in saved_module_wrappers(model, [adapter_name]):
        for key, tensor in wrapper.trained.state_dict(keep_vars=True).items():
            params[f"{PEFT_PREFIX}{name}.{key}"] = tensor
    return params


def lora_state_dict(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """{"base_model.model.<module>.lora_A.weight": (r, in), "….lora_B.weight": (out, r)} as peft saves,
    plus `base_model.model.<module>.<tensor>` for modules_to_save."""
    return {k: p.detach() for k, p in _adapter_params(model, adapter_name).items()}


def load_lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor], adapter_name: str) -> None:
    """Copy a peft-layout LoRA state into adapter `adapter_name`; checks every key and shape first."""
    params = _adapter_params(model, adapter_name)
    for key, p in params.items():  # model order: the first mismatch named is the first layer's
        if key not in state:
            raise ValueError(f"the adapter has no tensor {key!r}, which this model's LoRA layers need")
        t = state[key]
        if tuple(t.shape) != tuple(p.shape):
            raise ValueError(f"{key}: the adapter's tensor has shape {tuple(t.shape)},"
                             f" the model needs {tuple(p.shape)}")  # fmt: skip
        if t.is_floating_point() != p.is_floating_point():
            raise ValueError(f"{key}: the adapter's tensor has dtype {t.dtype}, the model's {p.dtype}")
    unexpected = sorted(set(state) - set(params))
    if unexpected:
        raise ValueError(f"the adapter has {unexpected[0]!r}, which matches no LoRA layer of this model"
                         f" ({len(unexpected)} such tensor(s))")  # fmt: skip
    with torch.no_grad():
        for key, p in params.items():
            p.copy_(state[key].to(p.device, p.dtype))


# peft config fields lowbit cannot honour, with the values that mean "feature not used".
_UNSUPPORTED = {
    "use_dora": (False, None), "lora_bias": (False, None), "fan_in_fan_out": (False, None), "bias": ("none", None),
    "layers_to_transform": (None, []), "target_parameters": (None, []),
    "trainable_token_indices": (None, [], {}), "layer_replication": (None, []), "use_qalora": (False, None),
    "alora_invocation_tokens": (None, []), "megatron_config": (None,), "use_bdlora": (None, False),
}  # fmt: skip


def lora_config_to_peft(config: LoraConfig) -> dict:
    """adapter_config.json fields for HF peft's LoraConfig (only fields peft 0.21 knows)."""
    def as_json(v):
        return list(v) if isinstance(v, tuple) else v

    return {
        "peft_type": "LORA", "r": config.r, "lora_alpha": config.alpha, "lora_dropout": config.dropout,
        "target_modules": as_json(config.target_modules), "exclude_modules": as_json(config.exclude_modules),
        "use_rslora": config.use_rslora, "rank_pattern": dict(config.rank_pattern),
        "alpha_pattern": dict(config.alpha_pattern), "init_lora_weights": config.init_lora_weights,
        "modules_to_save": as_json(config.modules_to_save),
        "bias": "none", "fan_in_fan_out": False, "use_dora": False, "lora_bias": False,
        "layers_to_transform": None, "layers_pattern": None, "inference_mode": True,
    }  # fmt: skip


def lora_config_from_peft(d: dict) -> LoraConfig:
    """LoraConfig from an adapter_config.json dict; features lowbit lacks fail with the field's name."""
    for name, harmless in _UNSUPPORTED.items():
        if d.get(name, harmless[0]) not in harmless:
            raise ValueError(f"adapter_config.json sets {name}={d[name]!r}, which lowbit's LoRA does not support")
    init = d.get("init_lora_weights", True)
    if init not in INIT_CHOICES:
        raise ValueError(f"adapter_config.json has init_lora_weights={init!r}: that initialisation changes"
                         " the base weights, so the adapter needs its modified base; convert it to plain"
                         " LoRA first")  # fmt: skip
    target = d.get("target_modules")
    if target is None:
        raise ValueError("adapter_config.json has no target_modules")
    if isinstance(target, str):
        target = ALL_LINEAR if target.lower() == ALL_LINEAR else target
    exclude = d.get("exclude_modules") or None
    saved = d.get("modules_to_save") or None
    return LoraConfig(
        r=d.get("r", 8), alpha=d.get("lora_alpha", 8), dropout=d.get("lora_dropout", 0.0) or 0.0,
        target_modules=target if isinstance(target, str) else tuple(target),
        exclude_modules=exclude if exclude is None or isinstance(exclude, str) else tuple(exclude),
        use_rslora=bool(d.get("use_rslora", False)), rank_pattern=d.get("rank_pattern") or {},
        alpha_pattern=d.get("alpha_pattern") or {}, init_lora_weights=init,
        modules_to_save=None if saved is None else tuple(saved),
    )  # fmt: skip


register_peft_method(PeftMethod("LORA", LoraConfig, apply_lora, lora_state_dict, load_lora_state_dict,
                                lora_config_to_peft, lora_config_from_peft))  # fmt: skip

