"""Several LoRA adapters on one frozen base: multi-tenant serving (one base model, one adapter per user).

    lowbit.peft.load_adapter(model, "alice", adapter_name="alice")
    lowbit.peft.load_adapter(model, "bob", adapter_name="bob")
    lowbit.peft.set_active_adapters(model, "bob")           # whole batches through bob's adapter
    with lowbit.peft.mixed_batch(model, ["alice", None, "bob"]):
        logits = model(input_ids).logits                     # row 0: alice, row 1: the base, row 2: bob

A mixed batch never merges anything: every LoRA layer runs the shared base matmul once for the whole
batch and then, per adapter present, one low-rank product on just its rows (S-LoRA/Punica-style
batching, here as gathered sub-batches). Each row's result therefore equals running that row alone with
its adapter active, up to floating-point summation order.

Routing lives on the LoRA layers themselves (their `active_adapters`, `disabled`, `row_adapters`), never
in global state; `mixed_batch` sets the row routing only for the duration of its `with` block.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

from torch import nn

from lowbit.peft.lora import LoraConfig, lora_layers, saved_module_wrappers, set_active_lora


def list_adapters(model: nn.Module) -> dict[str, object]:
    """{adapter name: config} of every adapter on the model, of any method."""
    return dict(getattr(model, "lowbit_adapters", None) or {})


def _lora_names(model: nn.Module) -> list[str]:
    return [n for n, c in list_adapters(model).items() if isinstance(c, LoraConfig)]


def _check_lora_names(model: nn.Module, names: Sequence[str | None], allow_none: bool = False) -> None:
    known = _lora_names(model)
    for name in names:
        if name is None and allow_none:
            continue
        if name not in known:
            other = list_adapters(model).get(name)
            why = f"it is a {type(other).__name__} adapter; routing handles LoRA adapters" if other is not None else (
                f"the model's LoRA adapters are {known}")  # fmt: skip
            raise ValueError(f"no LoRA adapter named {name!r}: {why}")


def _check_routable(model: nn.Module, what: str) -> None:
    if any(layer.merged_adapters for _, layer in lora_layers(model)):
        raise ValueError(f"cannot {what} while LoRA adapters are merged into the base; call unmerge_lora(model) first")
    saved = saved_module_wrappers(model, _lora_names(model))
    if saved:  # a trained copy of a whole module has no low-rank path to switch off or route per row
        raise ValueError(f"cannot {what}: LoRA adapter {saved[0][1].adapter_name!r} trains {saved[0][0]} as a"
                         " module to save, which routing does not cover")  # fmt: skip


def active_adapters(model: nn.Module) -> list[str]:
    """The LoRA adapters currently applied to whole batches (empty while disabled)."""
    layers = lora_layers(model)
    if not layers or all(layer.disabled for _, layer in layers):
        return []
    active = {n for _, layer in layers for n in layer.active_adapters}
    return [n for n in _lora_names(model) if n in active]


def set_active_adapters(model: nn.Module, names: str | Sequence[str]) -> None:
    """Route whole batches through `names` (one adapter, or several whose updates add up).

    Only routing changes: which parameters require grad is left as it is.
    """
    names = [names] if isinstance(names, str) else list(names)
    _check_lora_names(model, names)
    _check_routable(model, "switch adapters")
    set_active_lora(model, names)


def disable_adapters(model: nn.Module) -> None:
    """Run the bare base model: every LoRA layer returns its base layer's output."""
    _check_routable(model, "disable adapters")
    for _, layer in lora_layers(model):
        layer.disabled = True


def enable_adapters(model: nn.Module) -> None:
    """Undo `disable_adapters`: the active adapters apply again."""
    for _, layer in lora_layers(model):
        layer.disabled = False


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """`with adapters_disabled(model):` runs the base model, then restores each layer's previous state."""
    _check_routable(model, "disable adapters")
    layers = [layer for _, layer in lora_layers(model)]
    previous = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield
    finally:
        for layer, flag in zip(layers, previous):
            layer.disabled = flag


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove LoRA adapter `name` from every layer; a layer left with no adapter becomes its base again."""
    _check_lora_names(model, [name])
    for module_name, layer in lora_layers(model):
        if name in layer.merged_adapters:
            raise ValueError(f"adapter {name!r} is merged into {module_name}; unmerge_lora(model) first")
    for module_name, layer in lora_layers(model):
        if name in layer.lora_A:
            layer.delete_adapter(name)
        if not layer.lora_A:
            model.set_submodule(module_name, layer.base_layer)
    for module_name, wrapper in saved_module_wrappers(model, [name]):
        model.set_submodule(module_name, wrapper.original_module)
    del model.lowbit_adapters[name]


@contextmanager
def mixed_batch(model: nn.Module, adapter_names: Sequence[str | None]) -> Iterator[None]:
    """Inside the block, batch row i goes through LoRA adapter `adapter_names[i]` (None: the base alone).

    The batch given to the model must have exactly len(adapter_names) rows (dim 0 of every LoRA layer's
    input). Active/disabled settings are ignored inside the block and apply again afterwards.
    """
    adapter_names = list(adapter_names)
    if not adapter_names:
        raise ValueError("mixed_batch needs one adapter name (or None) per batch row")
    _check_lora_names(model, adapter_names, allow_none=True)
    _check_routable(model, "run a mixed batch")
    layers = [layer for _, layer in lora_layers(model)]
    for layer in layers:
        layer.row_adapters = adapter_names
    try:
        yield
    finally:
        for layer in layers:
            layer.row_adapters = None
