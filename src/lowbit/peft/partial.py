"""Transfer learning by partial fine-tuning, and full fine-tuning as the baseline.

Partial fine-tuning trains a few chosen modules of the model — the last transformer blocks, the output
head, or a new head put on for a new task (e.g. a classifier `score` / `classifier`) — and freezes the rest.
It is the oldest parameter-efficient method and the reference point for the others, as is full fine-tuning
(every parameter trained), which `apply_full_finetuning` sets up.

Like PEFT's `modules_to_save`, each chosen module is not trained in place: it is wrapped in
`ModulesToSave`, which keeps the original module untouched and frozen and runs a trainable deep copy. The
base model's weights therefore stay bit-identical, the adapter can be removed to get the original model back,
and the trained copies save like any adapter: keys `base_model.model.<module>.<parameter>` (PEFT's names for
modules_to_save), lowbit's peft_type "PARTIAL". A copy of a weight tied to another one (lm_head tied to the
input embeddings) is an untied copy: training it leaves the embeddings alone.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import torch
from torch import nn

from lowbit.nn.matching import matches_any
from lowbit.peft.registry import PeftMethod, record_adapter, register_peft_method
from lowbit.peft.state_check import check_adapter_state, check_new_adapter_name

CONFIG_VERSION = 1
GENERIC_FIELDS = ("peft_type", "task_type", "base_model_name_or_path", "peft_version", "revision", "inference_mode")


@dataclass(frozen=True)
class PartialConfig:
    """modules_to_save: anchored name patterns (lowbit.nn.matching) of the modules to train, e.g.
    ("lm_head",), ("model.layers.11", "model.norm", "lm_head") or ("score",) for a new classification head.
    A module inside an already chosen one is part of it.
    """

    modules_to_save: tuple[str, ...]
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        value = (self.modules_to_save,) if isinstance(self.modules_to_save, str) else tuple(self.modules_to_save)
        if not value or not all(isinstance(p, str) and p for p in value):
            raise ValueError(f"modules_to_save must name at least one module, got {self.modules_to_save!r}")
        object.__setattr__(self, "modules_to_save", value)
        if self.version != CONFIG_VERSION:
            raise ValueError(f"PartialConfig version {self.version} is not supported "
                             f"(this lowbit reads {CONFIG_VERSION})")


class ModulesToSave(nn.Module):
    """The original module (frozen, never changed) and the trainable copy that runs in its place."""

    def __init__(self, original_module: nn.Module, adapter_name: str) -> None:
        super().__init__()
        self.original_module = original_module
        self.adapter_name = adapter_name
        trained = copy.deepcopy(original_module)
        for p in trained.parameters():
            p.requires_grad_(p.is_floating_point())
        self.modules_to_save = nn.ModuleDict({adapter_name: trained})

    @property
    def trained(self) -> nn.Module:
        return self.modules_to_save[self.adapter_name]

    def forward(self, *args, **kwargs):
        return self.trained(*args, **kwargs)


def find_modules_to_save(model: nn.Module, config: PartialConfig) -> list[tuple[str, nn.Module]]:
    """The outermost modules the patterns name, in model order."""
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(chosen + ".") for chosen, _ in found):
            continue
        if matches_any(name, config.modules_to_save):
            if isinstance(module, ModulesToSave) or any(isinstance(m, ModulesToSave) for m in module.modules()):
                raise ValueError(f"{name} is already trained by another partial adapter")
            if not any(True for _ in module.parameters()):
                raise ValueError(f"{name} has no parameters to train")
            found.append((name, module))
    if not found:
        raise ValueError(f"modules_to_save {config.modules_to_save} match no module of this model")
    return found


def apply_partial(model: nn.Module, config: PartialConfig, adapter_name: str = "default") -> nn.Module:
    """Freeze the model and train copies of the chosen modules instead of the originals (in place)."""
    check_new_adapter_name(model, adapter_name)
    chosen = find_modules_to_save(model, config)
    for p in model.parameters():
        p.requires_grad_(False)
    for name, module in chosen:
        model.set_submodule(name, ModulesToSave(module, adapter_name))
    record_adapter(model, adapter_name, config)
    return model


def _wrappers(model: nn.Module, adapter_name: str) -> list[tuple[str, ModulesToSave]]:
    found = [(n, m) for n, m in model.named_modules()
             if isinstance(m, ModulesToSave) and m.adapter_name == adapter_name]  # fmt: skip
    if not found or not isinstance((getattr(model, "lowbit_adapters", None) or {}).get(adapter_name), PartialConfig):
        raise ValueError(f"the model has no partial fine-tuning adapter named {adapter_name!r}")
    return found


def remove_partial(model: nn.Module, adapter_name: str = "default", keep_trained: bool = False) -> nn.Module:
    """Put the original modules back — or, with keep_trained, the trained copies in their place."""
    for name, wrapper in _wrappers(model, adapter_name):
        model.set_submodule(name, wrapper.trained if keep_trained else wrapper.original_module)
    del model.lowbit_adapters[adapter_name]
    return model


def apply_full_finetuning(model: nn.Module) -> nn.Module:
    """The baseline: every floating-point parameter trains (quantized storage, being buffers, cannot)."""
    for p in model.parameters():
        p.requires_grad_(p.is_floating_point())
    return model


def _named_tensors(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    out = {}
    for name, wrapper in _wrappers(model, adapter_name):
        for key, tensor in wrapper.trained.state_dict(keep_vars=True).items():
            out[f"base_model.model.{name}.{key}"] = tensor
    return out


def partial_state_dict(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in _named_tensors(model, adapter_name).items()}


def load_partial_state_dict(model: nn.Module, state: dict[str, torch.Tensor], adapter_name: str) -> None:
    tensors = _named_tensors(model, adapter_name)
    check_adapter_state({k: tuple(v.shape) for k, v in tensors.items()}, state, "PARTIAL")
    with torch.no_grad():
        for key, tensor in tensors.items():
            tensor.copy_(state[key])


def partial_to_peft_dict(config: PartialConfig) -> dict:
    return {"peft_type": "PARTIAL", **asdict(config), "modules_to_save": list(config.modules_to_save)}


def partial_from_peft_dict(d: dict) -> PartialConfig:
    if d.get("peft_type") != "PARTIAL":
        raise ValueError(f"expected peft_type 'PARTIAL', got {d.get('peft_type')!r}")
    fields = {k: v for k, v in d.items() if k not in GENERIC_FIELDS}
    unknown = sorted(set(fields) - set(PartialConfig.__dataclass_fields__))
    if unknown:
        raise ValueError(f"unknown PARTIAL config field(s): {unknown}")
    return PartialConfig(**fields)


PARTIAL = register_peft_method(
    PeftMethod(
        peft_type="PARTIAL",
        config_cls=PartialConfig,
        apply=apply_partial,
        state_dict=partial_state_dict,
        load_state_dict=load_partial_state_dict,
        to_peft_dict=partial_to_peft_dict,
        from_peft_dict=partial_from_peft_dict,
    )
)
