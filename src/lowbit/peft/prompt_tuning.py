"""Prompt tuning: N trainable virtual-token embeddings prepended to every input.

Lester, Al-Rfou & Constant, "The Power of Scale for Parameter-Efficient Prompt Tuning" (2021), §2: the
input X = [x_1 … x_T] is embedded to X_e ∈ R^{T×C}; a learned prompt P_e ∈ R^{N×C} is concatenated in
front, the frozen model reads [P_e; X_e] ∈ R^{(N+T)×C}, and training maximises log p(Y | [P_e; X_e]) with
gradients flowing only into P_e. Initialising P_e from real token embeddings (random vocabulary entries or
the tokens of a text describing the task) trains better than random vectors (§3.2); a "random" start is
drawn with the standard deviation of the model's own embedding matrix so that it has a token's scale.

How the prompt gets in — a forward pre-hook on the model, not a wrapped embedding module:
the prompt changes the sequence length, so the attention mask (N ones in front), the labels (N × -100, no
loss on virtual positions), token_type_ids and position ids must grow with it. An embedding wrapper can
lengthen the embeddings but cannot see any of those, and the model would then build a mask for the wrong
length. A pre-hook registered on this one model instance (``register_forward_pre_hook(with_kwargs=True)``)
sees every argument of the call, turns ``input_ids`` into ``inputs_embeds = [P_e; embed(input_ids)]`` and
fixes the rest; nothing on the class changes and removing the adapter removes the hook.

Generation needs no extra code: ``generate`` calls the model, so the hook runs at every step. At the
prefill (empty cache) it prepends the prompt; afterwards the cache already holds the N virtual positions, so
it only extends the attention mask and shifts explicit position ids by N. The contract is that attention
masks, labels and position ids handed to the model always describe the real tokens only.

P-tuning (p_tuning.py) uses the same hook with a prompt produced by an encoder; prefix tuning
(prefix_tuning.py) reuses the argument handling below but injects key/value prefixes through the cache.
Only one prompt-learning adapter (prompt, P- or prefix tuning) can be on a model at a time (PEFT, too,
runs one prompt-learning adapter at a time).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import torch
from torch import nn

from lowbit.hf_compat import cache_key
from lowbit.peft.registry import PeftMethod, record_adapter, register_peft_method
from lowbit.peft.state_check import check_adapter_state, check_new_adapter_name

CONFIG_VERSION = 1
PROMPT_INITS = ("random", "sample_vocab", "text")
TASK_TYPES = ("CAUSAL_LM", "SEQ_CLS", "TOKEN_CLS", "FEATURE_EXTRACTION")
VIRTUAL_TOKENS_ATTR = "lowbit_virtual_tokens"  # ModuleDict {adapter name: prompt source} on the model
PREFIX_ATTR = "lowbit_prefix"  # prefix_tuning.py's holder; listed here so the two methods exclude each other
IGNORED_PEFT_FIELDS = ("peft_version", "auto_mapping", "base_model_name_or_path", "revision", "inference_mode")


@dataclass(frozen=True)
class PromptTuningConfig:
    """num_virtual_tokens: N, the prompt length.
    init: "random" (normal with the embedding matrix's std), "sample_vocab" (embeddings of N random vocabulary
        tokens) or "text" (the embeddings of ``init_text``'s tokens, repeated or cut to N).
    tokenizer_name_or_path: a local tokenizer for "text" when no tokenizer object is passed to apply.
    token_dim, num_layers, num_attention_heads: the model's sizes; None = read from the model by apply
        (the recorded config has them, because PEFT's adapter_config.json carries them).
    """

    num_virtual_tokens: int = 20
    init: str = "random"
    init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    task_type: str = "CAUSAL_LM"
    token_dim: int | None = None
    num_layers: int | None = None
    num_attention_heads: int | None = None
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        check_prompt_learning_fields(self, "PromptTuningConfig")
        if self.init not in PROMPT_INITS:
            raise ValueError(f"init must be one of {PROMPT_INITS}, got {self.init!r}")
        if self.init == "text" and not self.init_text:
            raise ValueError('init="text" needs init_text (the text whose token embeddings start the prompt)')


def check_prompt_learning_fields(config: Any, name: str) -> None:
    """Validation shared by the prompt-learning configs (prompt, P- and prefix tuning)."""
    if not isinstance(config.num_virtual_tokens, int) or config.num_virtual_tokens < 1:
        raise ValueError(f"{name}.num_virtual_tokens must be a positive int, got {config.num_virtual_tokens!r}")
    if config.task_type not in TASK_TYPES:
        raise ValueError(f"{name}.task_type must be one of {TASK_TYPES}, got {config.task_type!r}")
    for field in ("token_dim", "num_layers", "num_attention_heads"):
        value = getattr(config, field)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{name}.{field} must be a positive int or None, got {value!r}")
    if config.version != CONFIG_VERSION:
        raise ValueError(f"{name} version {config.version} is not supported (this lowbit reads {CONFIG_VERSION})")


def prompt_learning_dims(model: nn.Module) -> dict[str, int]:
    """token_dim / num_layers / num_attention_heads as PEFT records them for prompt learning."""
    cfg = getattr(model, "config", None)
    layers = getattr(cfg, "num_hidden_layers", None)
    heads = getattr(cfg, "num_attention_heads", None)
    if layers is None or heads is None:
        raise ValueError("prompt learning needs a transformers model whose config has num_hidden_layers and "
                         "num_attention_heads")  # fmt: skip
    return {"token_dim": model.get_input_embeddings().embedding_dim, "num_layers": layers, "num_attention_heads": heads}


def resolve_dims(model: nn.Module, config: Any) -> Any:
    """The config with the model's sizes filled in; a size given in the config must match the model."""
    dims = prompt_learning_dims(model)
    for field, actual in dims.items():
        given = getattr(config, field)
        if given is not None and given != actual:
            raise ValueError(f"{type(config).__name__}.{field}={given} but the model has {actual}")
    return replace(config, **dims)


# ---- the pre-hook machinery (shared with p_tuning.py; prefix_tuning.py uses the argument helpers) -----


def forward_kwargs(model: nn.Module, args: tuple, kwargs: dict) -> dict:
    """The call's arguments as keywords (``model(ids)`` passes input_ids positionally)."""
    merged = dict(kwargs)
    if args:
        names = list(inspect.signature(model.forward).parameters)
        if len(args) > len(names):
            raise TypeError(f"{type(model).__name__}.forward got {len(args)} positional arguments")
        for name, value in zip(names, args):
            if name in merged:
                raise TypeError(f"{type(model).__name__}.forward got {name!r} twice")
            merged[name] = value
    return merged


def cached_length(cache: Any) -> int:
    """Positions already in a transformers Cache (0 for none)."""
    if cache is None:
        return 0
    if not hasattr(cache, "get_seq_length"):
        raise TypeError("prompt learning needs a transformers Cache object as the KV cache, "
                        f"got {type(cache).__name__}")  # fmt: skip
    return cache.get_seq_length()


def extend_attention_mask(kwargs: dict, n: int) -> None:
    """Put n ones (the virtual positions are always visible) in front of a 2-D attention mask."""
    mask = kwargs.get("attention_mask")
    if mask is None:
        return
    if mask.dim() != 2:
        raise ValueError(f"prompt learning needs a 2-D (batch, seq) attention mask, got shape {tuple(mask.shape)}")
    kwargs["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], n), mask], dim=1)  # (B, n + T)


def _prepend_prompt(model: nn.Module, kwargs: dict, prompt: torch.Tensor) -> None:
    """input_ids → inputs_embeds with the prompt in front; labels / token types / positions follow."""
    n = prompt.shape[0]
    embeds = kwargs.get("inputs_embeds")
    if embeds is None:
        if kwargs.get("input_ids") is None:
            raise ValueError("the model needs input_ids or inputs_embeds")
        embeds = model.get_input_embeddings()(kwargs["input_ids"])  # (B, T, C)
    batch = embeds.shape[0]
    prompt = prompt.to(embeds.dtype).unsqueeze(0).expand(batch, -1, -1)  # (B, n, C)
    kwargs["inputs_embeds"] = torch.cat([prompt, embeds], dim=1)  # (B, n + T, C)
    kwargs["input_ids"] = None
    labels = kwargs.get("labels")
    if labels is not None and labels.dim() == 2:  # per-token labels; (B,) class labels stay as they are
        kwargs["labels"] = torch.cat([labels.new_full((batch, n), -100), labels], dim=1)
    token_types = kwargs.get("token_type_ids")
    if token_types is not None:
        kwargs["token_type_ids"] = torch.cat([token_types.new_zeros(token_types.shape[0], n), token_types], 1)
    positions = kwargs.get("position_ids")
    if positions is not None:  # virtual tokens take positions 0..n-1, the real ones move up by n
        head = torch.arange(n, device=positions.device, dtype=positions.dtype).expand(positions.shape[0], n)
        kwargs["position_ids"] = torch.cat([head, positions + n], dim=1)


def _virtual_tokens_hook(model: nn.Module, args: tuple, kwargs: dict, *, source: nn.Module):
    kwargs = forward_kwargs(model, args, kwargs)
    n = source.num_virtual_tokens
    if cached_length(kwargs.get(cache_key(model, kwargs))) == 0:
        _prepend_prompt(model, kwargs, source())
    elif kwargs.get("position_ids") is not None:  # decoding: the cache already holds the n virtual positions
        kwargs["position_ids"] = kwargs["position_ids"] + n
    extend_attention_mask(kwargs, n)
    return (), kwargs


def check_no_prompt_adapter(model: nn.Module) -> None:
    for attr in (VIRTUAL_TOKENS_ATTR, PREFIX_ATTR):
        holder = getattr(model, attr, None)
        if holder is not None and len(holder):
            raise ValueError(f"the model already has the prompt-learning adapter {next(iter(holder))!r}; only "
                             "one prompt, P- or prefix tuning adapter fits at a time (remove it first)")  # fmt: skip


def freeze_parameters(model: nn.Module) -> None:
    """Freeze everything already in the model; the method's own parameters are added afterwards."""
    for p in model.parameters():
        p.requires_grad_(False)


def attach_virtual_tokens(model: nn.Module, adapter_name: str, source: nn.Module) -> None:
    """Hold `source` (a module whose call returns the (n, C) prompt) on the model and hook it in."""
    check_no_prompt_adapter(model)
    model.add_module(VIRTUAL_TOKENS_ATTR, nn.ModuleDict({adapter_name: source}))
    hook = partial(_virtual_tokens_hook, source=source)
    source.hook_handle = model.register_forward_pre_hook(hook, with_kwargs=True)


def detach_prompt_source(model: nn.Module, adapter_name: str, attr: str, config_cls: type) -> nn.Module:
    """Undo attach_*: remove the hook and the holder, forget the adapter; returns the removed module."""
    holder = getattr(model, attr, None)
    if holder is None or adapter_name not in holder:
        raise ValueError(f"the model has no {config_cls.__name__[:-6]} adapter named {adapter_name!r}")
    recorded = getattr(model, "lowbit_adapters", {}).get(adapter_name)
    if not isinstance(recorded, config_cls):
        raise ValueError(f"adapter {adapter_name!r} is a {type(recorded).__name__}, not a {config_cls.__name__}")
    source = holder[adapter_name]
    source.hook_handle.remove()
    delattr(model, attr)
    del model.lowbit_adapters[adapter_name]
    return source


def prompt_source(model: nn.Module, adapter_name: str, attr: str = VIRTUAL_TOKENS_ATTR) -> nn.Module:
    holder = getattr(model, attr, None)
    if holder is None or adapter_name not in holder:
        raise ValueError(f"the model has no prompt-learning adapter named {adapter_name!r}")
    return holder[adapter_name]


# ---- prompt tuning proper ------------------------------------------------------------------------------


class PromptEmbedding(nn.Module):
    """P_e, the (N, C) trainable prompt; calling it returns the prompt."""

    def __init__(self, prompt: torch.Tensor) -> None:
        super().__init__()
        self.embedding = nn.Parameter(prompt.detach().clone())  # (N, C)

    @property
    def num_virtual_tokens(self) -> int:
        return self.embedding.shape[0]

    def forward(self) -> torch.Tensor:
        return self.embedding  # (N, C)


def _initial_prompt(model: nn.Module, config: PromptTuningConfig, tokenizer: Any) -> torch.Tensor:
    table = model.get_input_embeddings().weight.detach()  # (V, C)
    n = config.num_virtual_tokens
    if config.init == "random":
        return torch.randn(n, table.shape[1], device=table.device) * table.float().std()
    if config.init == "sample_vocab":
        ids = torch.randint(0, table.shape[0], (n,), device=table.device)
    else:
        # the text's own tokens (no BOS/EOS): cycled when shorter than N, cut when longer (as PEFT does)
        ids = tokenizer(config.init_text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"init_text {config.init_text!r} tokenizes to nothing")
        ids = torch.tensor((ids * (n // len(ids) + 1))[:n], device=table.device)
    return table[ids].float().clone()  # (N, C)


def _text_tokenizer(config: PromptTuningConfig, tokenizer: Any) -> Any:
    if tokenizer is not None or config.init != "text":
        return tokenizer
    if not config.tokenizer_name_or_path:
        raise ValueError('init="text" needs a tokenizer: pass tokenizer= or set tokenizer_name_or_path')
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(config.tokenizer_name_or_path, local_files_only=True)


def _attach_prompt(model: nn.Module, config: PromptTuningConfig, adapter_name: str, prompt: torch.Tensor) -> None:
    check_new_adapter_name(model, adapter_name)
    check_no_prompt_adapter(model)
    freeze_parameters(model)
    attach_virtual_tokens(model, adapter_name, PromptEmbedding(prompt))
    record_adapter(model, adapter_name, config)


def apply_prompt_tuning(
    model: nn.Module, config: PromptTuningConfig, adapter_name: str = "default", tokenizer: Any = None
) -> nn.Module:
    """Freeze the model and prepend `config.num_virtual_tokens` trainable embeddings to every input.

    `tokenizer` is needed for ``init="text"`` (or a local ``config.tokenizer_name_or_path``). The model is
    changed in place and returned.
    """
    config = resolve_dims(model, config)
    tokenizer = _text_tokenizer(config, tokenizer)
    if tokenizer is not None and config.init == "text" and not config.tokenizer_name_or_path:
        config = replace(config, tokenizer_name_or_path=getattr(tokenizer, "name_or_path", None) or None)
    _attach_prompt(model, config, adapter_name, _initial_prompt(model, config, tokenizer))
    return model


def _apply_for_load(model: nn.Module, config: PromptTuningConfig, adapter_name: str) -> nn.Module:
    """The registry's apply: the values are about to be overwritten, so no tokenizer / text is needed."""
    config = resolve_dims(model, config)
    table = model.get_input_embeddings().weight
    _attach_prompt(model, config, adapter_name, torch.zeros(config.num_virtual_tokens, config.token_dim,
                                                            device=table.device))  # fmt: skip
    return model


def remove_prompt_tuning(model: nn.Module, adapter_name: str = "default") -> nn.Module:
    """Take the prompt off again; the base model is exactly as before apply (except requires_grad)."""
    detach_prompt_source(model, adapter_name, VIRTUAL_TOKENS_ATTR, PromptTuningConfig)
    return model


def prompt_tuning_state_dict(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    return {"prompt_embeddings": prompt_source(model, adapter_name)().detach().clone()}  # (N, C)


def load_prompt_tuning_state_dict(model: nn.Module, state: dict[str, torch.Tensor], adapter_name: str) -> None:
    source = prompt_source(model, adapter_name)
    check_adapter_state({"prompt_embeddings": tuple(source.embedding.shape)}, state, "PROMPT_TUNING")
    with torch.no_grad():
        source.embedding.copy_(state["prompt_embeddings"])


def prompt_learning_peft_fields(config: Any, peft_type: str) -> dict:
    """The PromptLearningConfig fields of PEFT (one transformer submodule: decoder-only or encoder-only)."""
    if config.token_dim is None:
        raise ValueError(f"{type(config).__name__} has no model sizes yet: write the config apply recorded")
    return {"peft_type": peft_type, "task_type": config.task_type, "inference_mode": True,
            "num_virtual_tokens": config.num_virtual_tokens, "token_dim": config.token_dim,
            "num_transformer_submodules": 1, "num_attention_heads": config.num_attention_heads,
            "num_layers": config.num_layers, "modules_to_save": None}  # fmt: skip


def prompt_learning_kwargs(d: dict, peft_type: str, own_fields: tuple[str, ...]) -> dict:
    """Check a PEFT prompt-learning config dict and pick out the fields lowbit's config takes."""
    if d.get("peft_type") != peft_type:
        raise ValueError(f"expected peft_type {peft_type!r}, got {d.get('peft_type')!r}")
    if d.get("num_transformer_submodules") not in (None, 1):
        raise ValueError("lowbit's prompt learning supports one transformer submodule (no encoder-decoder models), "
                         f"got num_transformer_submodules={d['num_transformer_submodules']}")  # fmt: skip
    if d.get("modules_to_save"):
        raise ValueError(f"modules_to_save is not supported with {peft_type}: {d['modules_to_save']}")
    fields = ("num_virtual_tokens", "task_type", "token_dim", "num_layers", "num_attention_heads") + own_fields
    return {k: d[k] for k in fields if d.get(k) is not None}


def prompt_tuning_to_peft_dict(config: PromptTuningConfig) -> dict:
    d = prompt_learning_peft_fields(config, "PROMPT_TUNING")
    init = {"random": "RANDOM", "sample_vocab": "SAMPLE_VOCAB", "text": "TEXT"}[config.init]
    if init == "TEXT" and not config.tokenizer_name_or_path:
        init = "RANDOM"  # PEFT refuses TEXT without a tokenizer path; the start value no longer matters once trained
    d.update(prompt_tuning_init=init, prompt_tuning_init_text=config.init_text,
             tokenizer_name_or_path=config.tokenizer_name_or_path)  # fmt: skip
    return d


def prompt_tuning_from_peft_dict(d: dict) -> PromptTuningConfig:
    kwargs = prompt_learning_kwargs(d, "PROMPT_TUNING", ("tokenizer_name_or_path",))
    init = str(d.get("prompt_tuning_init") or "RANDOM").lower()
    if init not in PROMPT_INITS:
        raise ValueError(f"unsupported prompt_tuning_init {d.get('prompt_tuning_init')!r}")
    return PromptTuningConfig(init=init, init_text=d.get("prompt_tuning_init_text"), **kwargs)


PROMPT_TUNING = register_peft_method(
    PeftMethod(
        peft_type="PROMPT_TUNING",
        config_cls=PromptTuningConfig,
        apply=_apply_for_load,
        state_dict=prompt_tuning_state_dict,
        load_state_dict=load_prompt_tuning_state_dict,
        to_peft_dict=prompt_tuning_to_peft_dict,
        from_peft_dict=prompt_tuning_from_peft_dict,
    )
)
