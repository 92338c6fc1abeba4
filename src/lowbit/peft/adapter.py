"""Bottleneck adapters (Houlsby et al., "Parameter-Efficient Transfer Learning for NLP", 2019).

§2.1 and Fig. 2 of the paper: every transformer layer gets two small modules, one after the projection
that closes multi-head attention and one after the feed-forward block — in both places *before* the
sublayer's output is added back to the residual stream. Each module is a bottleneck with its own skip
connection:

    h ← h + W_up · f(W_down · h + b_down) + b_up        W_down: d → m,  W_up: m → d,  m ≪ d

so it costs 2·d·m + d + m parameters per site. With W_up = 0 and b_up = 0 the module is the identity at
initialisation (the paper's near-identity init, here exact), and the frozen model starts unchanged.

Here the two sites are the output projections themselves — attention's `o_proj` and the feed-forward
`down_proj` in Llama-style models, `attention.output.dense` and `output.dense` in BERT (both matched by
"output.dense"), `attn.c_proj` / `mlp.c_proj` in GPT-2 — each wrapped in `BottleneckLinear`, which runs the
projection and then the adapter(s) on its output. A projection's output is exactly the sublayer output
before the residual add, so no model code changes.

There is no PEFT equivalent: files use PEFT's layout (adapter_config.json + adapter_model.safetensors)
with lowbit's own peft_type "BOTTLENECK" and keys `base_model.model.<module>.adapter_down.weight`,
`.adapter_down.bias`, `.adapter_up.weight`, `.adapter_up.bias`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

from lowbit.nn.matching import matches_any
from lowbit.peft.registry import PeftMethod, record_adapter, register_peft_method
from lowbit.peft.state_check import check_adapter_state, check_new_adapter_name

CONFIG_VERSION = 1
NON_LINEARITIES = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}
# model_type → the attention-output and feed-forward-output projections (Houlsby's two sites per layer).
DEFAULT_TARGETS = {
    **{t: ("o_proj", "down_proj") for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo", "olmo2")},
    **{t: ("output.dense",) for t in ("bert", "roberta")},
    "gpt2": ("attn.c_proj", "mlp.c_proj"),
}  # fmt: skip
# Written into adapter_config.json by save_adapter (peft/io.py) for every method; not part of this config.
GENERIC_FIELDS = ("peft_type", "task_type", "base_model_name_or_path", "peft_version", "revision", "inference_mode")


@dataclass(frozen=True)
class BottleneckConfig:
    """bottleneck_size: m. non_linearity: f (relu, gelu, silu, tanh). dropout: on f's output, in training.
    target_modules: anchored name patterns of the output projections to follow (None = the architecture's
    attention-output and feed-forward-output projections).
    """

    bottleneck_size: int = 64
    non_linearity: str = "relu"
    dropout: float = 0.0
    target_modules: tuple[str, ...] | None = None
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        if not isinstance(self.bottleneck_size, int) or self.bottleneck_size < 1:
            raise ValueError(f"bottleneck_size must be a positive int, got {self.bottleneck_size!r}")
        if self.non_linearity not in NON_LINEARITIES:
            raise ValueError(f"non_linearity must be one of {sorted(NON_LINEARITIES)}, got {self.non_linearity!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.target_modules is not None:
            value = (self.target_modules,) if isinstance(self.target_modules, str) else tuple(self.target_modules)
            if not value or not all(isinstance(p, str) and p for p in value):
                raise ValueError(f"target_modules must be non-empty strings, got {self.target_modules!r}")
            object.__setattr__(self, "target_modules", value)
        if self.version != CONFIG_VERSION:
            raise ValueError(f"BottleneckConfig version {self.version} is not supported "
                             f"(this lowbit reads {CONFIG_VERSION})")


class Bottleneck(nn.Module):
    """h + W_up f(W_down h + b_down) + b_up, computed in the adapter's dtype (fp32 by default)."""

    def __init__(self, dim: int, config: BottleneckConfig) -> None:
        super().__init__()
        self.adapter_down = nn.Linear(dim, config.bottleneck_size)  # nn.Linear's default init
        self.non_linearity = NON_LINEARITIES[config.non_linearity]()
        self.dropout = nn.Dropout(config.dropout)
        self.adapter_up = nn.Linear(config.bottleneck_size, dim)
        nn.init.zeros_(self.adapter_up.weight)  # zero up-projection: the adapter starts as the identity
        nn.init.zeros_(self.adapter_up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = h.to(self.adapter_down.weight.dtype)  # (…, d)
        delta = self.adapter_up(self.dropout(self.non_linearity(self.adapter_down(x))))  # (…, m) → (…, d)
        return h + delta.to(h.dtype)


class BottleneckLinear(nn.Module):
    """An output projection followed by its bottleneck adapter(s), applied one after another."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()

    def forward(self, *args, **kwargs) -> torch.Tensor:
        h = self.base_layer(*args, **kwargs)  # (…, d): the sublayer output, before the residual add
        for adapter in self.adapters.values():
            h = adapter(h)
        return h


def _output_dim(name: str, module: nn.Module) -> int:
    if isinstance(getattr(module, "out_features", None), int):  # nn.Linear, QuantLinear
        return module.out_features
    if isinstance(getattr(module, "nf", None), int):  # transformers' Conv1D (GPT-2)
        return module.nf
    raise ValueError(f"bottleneck target {name} is a {type(module).__name__}; adapters follow linear "
                     "projections (nn.Linear, QuantLinear, Conv1D)")  # fmt: skip


def _resolve(model: nn.Module, config: BottleneckConfig) -> BottleneckConfig:
    if config.target_modules is not None:
        return config
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in DEFAULT_TARGETS:
        raise ValueError(f"no default bottleneck sites for model_type {model_type!r}: set target_modules to the "
                         "attention-output and feed-forward-output projections")  # fmt: skip
    return replace(config, target_modules=DEFAULT_TARGETS[model_type])


def find_bottleneck_sites(model: nn.Module, config: BottleneckConfig) -> list[tuple[str, nn.Module, int]]:
    """(name, module, output dim) of every projection the config targets, in model order."""
    found = []
    for name, module in model.named_modules():
        parts = name.split(".")
        if not name or "base_layer" in parts or "adapters" in parts or not matches_any(name, config.target_modules):
            continue
        base = module.base_layer if isinstance(module, BottleneckLinear) else module
        found.append((name, module, _output_dim(name, base)))
    if not found:
        raise ValueError(f"bottleneck target_modules {config.target_modules} match no layer of this model")
    return found


def apply_bottleneck(
    model: nn.Module, config: BottleneckConfig | None = None, adapter_name: str = "default"
) -> nn.Module:
    """Freeze the model and put an identity-initialised bottleneck adapter after every target (in place)."""
    check_new_adapter_name(model, adapter_name)
    config = _resolve(model, config or BottleneckConfig())
    sites = find_bottleneck_sites(model, config)
    for p in model.parameters():
        p.requires_grad_(False)
    for name, module, dim in sites:
        if not isinstance(module, BottleneckLinear):
            module = BottleneckLinear(module)
            model.set_submodule(name, module)
        device = next(module.base_layer.parameters(), next(module.base_layer.buffers(), None))
        module.adapters[adapter_name] = Bottleneck(dim, config).to(device.device if device is not None else None)
    record_adapter(model, adapter_name, config)
    return model


def _sites_with(model: nn.Module, adapter_name: str) -> list[tuple[str, BottleneckLinear]]:
    sites = [(n, m) for n, m in model.named_modules() if isinstance(m, BottleneckLinear) and adapter_name in m.adapters]
    if not sites or not isinstance((getattr(model, "lowbit_adapters", None) or {}).get(adapter_name), BottleneckConfig):
        raise ValueError(f"the model has no bottleneck adapter named {adapter_name!r}")
    return sites


def remove_bottleneck(model: nn.Module, adapter_name: str = "default") -> nn.Module:
    """Take adapter `adapter_name` off; projections left without adapters become plain layers again."""
    for name, site in _sites_with(model, adapter_name):
        del site.adapters[adapter_name]
        if not len(site.adapters):
            model.set_submodule(name, site.base_layer)
    del model.lowbit_adapters[adapter_name]
    return model


def _named_tensors(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    out = {}
    for name, site in _sites_with(model, adapter_name):
        for key, tensor in site.adapters[adapter_name].state_dict(keep_vars=True).items():
            out[f"base_model.model.{name}.{key}"] = tensor  # key: adapter_down.weight, …, adapter_up.bias
    return out


def bottleneck_state_dict(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in _named_tensors(model, adapter_name).items()}


def load_bottleneck_state_dict(model: nn.Module, state: dict[str, torch.Tensor], adapter_name: str) -> None:
    tensors = _named_tensors(model, adapter_name)
    check_adapter_state({k: tuple(v.shape) for k, v in tensors.items()}, state, "BOTTLENECK")
    with torch.no_grad():
        for key, tensor in tensors.items():
            tensor.copy_(state[key])


def bottleneck_to_peft_dict(config: BottleneckConfig) -> dict:
    if config.target_modules is None:
        raise ValueError("write the BottleneckConfig that apply_bottleneck recorded (with its targets resolved)")
    d = asdict(config)
    d["target_modules"] = list(config.target_modules)
    return {"peft_type": "BOTTLENECK", **d}


def bottleneck_from_peft_dict(d: dict) -> BottleneckConfig:
    if d.get("peft_type") != "BOTTLENECK":
        raise ValueError(f"expected peft_type 'BOTTLENECK', got {d.get('peft_type')!r}")
    fields = {k: v for k, v in d.items() if k not in GENERIC_FIELDS}
    unknown = sorted(set(fields) - set(BottleneckConfig.__dataclass_fields__))
    if unknown:
        raise ValueError(f"unknown BOTTLENECK config field(s): {unknown}")
    return BottleneckConfig(**fields)


BOTTLENECK = register_peft_method(
    PeftMethod(
        peft_type="BOTTLENECK",
        config_cls=BottleneckConfig,
        apply=apply_bottleneck,
        state_dict=bottleneck_state_dict,
        load_state_dict=load_bottleneck_state_dict,
        to_peft_dict=bottleneck_to_peft_dict,
        from_peft_dict=bottleneck_from_peft_dict,
    )
)
