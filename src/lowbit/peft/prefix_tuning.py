"""Prefix tuning: N trainable key/value vectors in front of every attention layer's keys and values.

Li & Liang, "Prefix-Tuning: Optimizing Continuous Prompts for Generation" (2021), §4.2–4.3: the activations
of the N prefix positions are free parameters P_θ ∈ R^{N × (layers·2·d_kv)} — for every layer a key and a
value per virtual position — and every real token attends to them as if they were earlier context. Training
P_θ directly is unstable, so it is reparameterised as P_θ[i,:] = MLP_θ(P'_θ[i,:]) with a smaller P'_θ
(eq. 5): here P' ∈ R^{N×d_kv}, MLP = Linear(d_kv, H) → tanh → Linear(H, layers·2·d_kv), PEFT's layout. After
training the MLP is dropped and only P_θ is kept (`drop_prefix_encoder`); P_θ is also what is saved (PEFT's
`prompt_embeddings`, shape (N, layers·2·d_kv)). d_kv = num_key_value_heads · head_dim, so grouped-query
attention models get prefixes only as wide as their cached keys.

How the prefix gets in: the model's own KV cache. A forward pre-hook on the model (see prompt_tuning.py
for why a hook and not a class patch) fills an empty transformers `DynamicCache` with the N prefix
positions of every layer before the model runs — keys and values enter the cache as they are (no rotary
embedding), exactly as PEFT 0.21 does with `DynamicCache(past_key_values)` — extends the attention mask by
N ones and shifts explicit position ids by N; the model then numbers the real tokens from N on. During
`generate` the first step fills the cache; later steps find it non-empty and only fix mask and positions.
The flat prefix row is laid out as PEFT lays it out: index ((layer·2 + {0: key, 1: value})·heads + head)·
head_dim + j.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial

import torch
from torch import nn
from transformers import DynamicCache

from lowbit.hf_compat import cache_key, cache_kwarg
from lowbit.peft.prompt_tuning import (
    PREFIX_ATTR,
    cached_length,
    check_no_prompt_adapter,
    check_prompt_learning_fields,
    detach_prompt_source,
    extend_attention_mask,
    forward_kwargs,
    freeze_parameters,
    prompt_learning_kwargs,
    prompt_learning_peft_fields,
    prompt_source,
)
from lowbit.peft.registry import PeftMethod, record_adapter, register_peft_method
from lowbit.peft.state_check import check_adapter_state, check_new_adapter_name

CONFIG_VERSION = 1


@dataclass(frozen=True)
class PrefixTuningConfig:
    """num_virtual_tokens: N. prefix_projection: train through the 2-layer MLP (eq. 5); False trains P_θ
    directly. encoder_hidden_size: H of the MLP (None = d_kv, as PEFT).
    token_dim (= d_kv), num_layers, num_attention_heads (= key/value heads): filled from the model by apply,
    named as in PEFT's PrefixTuningConfig.
    """

    num_virtual_tokens: int = 20
    prefix_projection: bool = True
    encoder_hidden_size: int | None = None
    task_type: str = "CAUSAL_LM"
    token_dim: int | None = None
    num_layers: int | None = None
    num_attention_heads: int | None = None
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        check_prompt_learning_fields(self, "PrefixTuningConfig")
        if self.task_type != "CAUSAL_LM":
            raise ValueError(f"prefix tuning here supports decoder-only causal LMs, got task_type {self.task_type!r}")
        if self.encoder_hidden_size is not None and (
            not isinstance(self.encoder_hidden_size, int) or self.encoder_hidden_size < 1
        ):
            raise ValueError(f"encoder_hidden_size must be a positive int or None, got {self.encoder_hidden_size!r}")
        if self.token_dim is not None and self.num_attention_heads is not None:
            if self.token_dim % self.num_attention_heads:
                raise ValueError(f"token_dim {self.token_dim} is not divisible by {self.num_attention_heads} heads")


def _prefix_dims(model: nn.Module) -> dict[str, int]:
    cfg = getattr(model, "config", None)
    if cfg is None or cache_kwarg(model) is None:
        raise ValueError("prefix tuning needs a transformers decoder whose forward takes a KV cache "
                         "(`cache` or `past_key_values`)")
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return {"token_dim": kv_heads * head_dim, "num_layers": cfg.num_hidden_layers, "num_attention_heads": kv_heads}


def _resolve(model: nn.Module, config: PrefixTuningConfig) -> PrefixTuningConfig:
    dims = _prefix_dims(model)
    for field, actual in dims.items():
        given = getattr(config, field)
        if given is not None and given != actual:
            raise ValueError(f"PrefixTuningConfig.{field}={given} but the model has {actual}")
    config = replace(config, **dims)
    return replace(config, encoder_hidden_size=config.encoder_hidden_size or config.token_dim)


class PrefixEncoder(nn.Module):
    """Produces P_θ, (N, layers·2·d_kv): through `transform` (the MLP) while training, else stored directly."""

    def __init__(self, config: PrefixTuningConfig) -> None:
        super().__init__()
        n, d, layers = config.num_virtual_tokens, config.token_dim, config.num_layers
        self.num_virtual_tokens, self.num_layers = n, layers
        self.num_heads, self.head_dim = config.num_attention_heads, d // config.num_attention_heads
        width = layers * 2 * d
        if config.prefix_projection:
            self.embedding = nn.Embedding(n, d)  # P', N(0, 1) like PEFT's
            self.transform = nn.Sequential(
                nn.Linear(d, config.encoder_hidden_size), nn.Tanh(), nn.Linear(config.encoder_hidden_size, width)
            )
        else:
            self.embedding = nn.Embedding(n, width)  # P_θ itself
            self.transform = None

    @property
    def has_encoder(self) -> bool:
        return self.transform is not None

    def forward(self) -> torch.Tensor:
        p = self.embedding.weight  # (N, d_kv) or (N, layers·2·d_kv)
        return self.transform(p) if self.transform is not None else p  # (N, layers·2·d_kv)

    def drop_encoder(self, prefix: torch.Tensor | None = None) -> None:
        """Keep only P_θ (the MLP's output now, or `prefix`), frozen; the MLP and P' are deleted."""
        with torch.no_grad():
            value = self().detach().clone() if prefix is None else prefix.detach().clone()
        self.transform = None
        self.embedding = nn.Embedding.from_pretrained(value, freeze=True)

    def key_values(self, batch: int, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (key, value), each (B, heads, N, head_dim)."""
        p = self().to(dtype)  # (N, layers·2·d_kv)
        p = p.view(self.num_virtual_tokens, self.num_layers * 2, self.num_heads, self.head_dim)
        p = p.permute(1, 2, 0, 3)  # (layers·2, heads, N, head_dim)
        shape = (batch, self.num_heads, self.num_virtual_tokens, self.head_dim)
        return [(p[2 * i].expand(shape), p[2 * i + 1].expand(shape)) for i in range(self.num_layers)]


def _prefix_hook(model: nn.Module, args: tuple, kwargs: dict, *, source: PrefixEncoder):
    kwargs = forward_kwargs(model, args, kwargs)
    n = source.num_virtual_tokens
    cache_name = cache_key(model, kwargs)
    cache = kwargs.get(cache_name)
    if cached_length(cache) == 0:
        if cache is not None and not isinstance(cache, DynamicCache):
            raise ValueError(f"prefix tuning fills a DynamicCache, got a {type(cache).__name__}")
        ref = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
        if ref is None:
            raise ValueError("the model needs input_ids or inputs_embeds")
        cache = cache if cache is not None else DynamicCache(config=model.config)
        dtype = model.get_input_embeddings().weight.dtype
        for layer, (key, value) in enumerate(source.key_values(ref.shape[0], dtype)):
            cache.update(key, value, layer)
        kwargs[cache_name] = cache
    if kwargs.get("position_ids") is not None:  # real tokens sit after the N prefix positions
        kwargs["position_ids"] = kwargs["position_ids"] + n
    extend_attention_mask(kwargs, n)
    return (), kwargs


def apply_prefix_tuning(model: nn.Module, config: PrefixTuningConfig, adapter_name: str = "default") -> nn.Module:
    """Freeze the model and give every attention layer N trainable key/value prefix positions (in place)."""
    config = _resolve(model, config)
    check_new_adapter_name(model, adapter_name)
    check_no_prompt_adapter(model)
    freeze_parameters(model)
    source = PrefixEncoder(config).to(model.get_input_embeddings().weight.device)
    model.add_module(PREFIX_ATTR, nn.ModuleDict({adapter_name: source}))
    source.hook_handle = model.register_forward_pre_hook(partial(_prefix_hook, source=source), with_kwargs=True)
    record_adapter(model, adapter_name, config)
    return model


def drop_prefix_encoder(model: nn.Module, adapter_name: str = "default") -> nn.Module:
    """After training: keep only the prefixes (the MLP's output); the model's logits do not change."""
    source = prompt_source(model, adapter_name, PREFIX_ATTR)
    if source.has_encoder:
        source.drop_encoder()
    return model


def remove_prefix_tuning(model: nn.Module, adapter_name: str = "default") -> nn.Module:
    detach_prompt_source(model, adapter_name, PREFIX_ATTR, PrefixTuningConfig)
    return model


def prefix_tuning_state_dict(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {"prompt_embeddings": prompt_source(model, adapter_name, PREFIX_ATTR)().detach().clone()}


def load_prefix_tuning_state_dict(model: nn.Module, state: dict[str, torch.Tensor], adapter_name: str) -> None:
    """Loading gives P_θ: with an MLP on the model it is dropped (the file has only the prefixes)."""
    source = prompt_source(model, adapter_name, PREFIX_ATTR)
    width = source.num_layers * 2 * source.num_heads * source.head_dim
    check_adapter_state({"prompt_embeddings": (source.num_virtual_tokens, width)}, state, "PREFIX_TUNING")
    prefix = state["prompt_embeddings"].to(source.embedding.weight.device).float()
    if source.has_encoder:
        source.drop_encoder(prefix)
    else:
        with torch.no_grad():
            source.embedding.weight.copy_(prefix)


def prefix_tuning_to_peft_dict(config: PrefixTuningConfig) -> dict:
    d = prompt_learning_peft_fields(config, "PREFIX_TUNING")
    d.update(encoder_hidden_size=config.encoder_hidden_size, prefix_projection=config.prefix_projection)
    return d


def prefix_tuning_from_peft_dict(d: dict) -> PrefixTuningConfig:
    kwargs = prompt_learning_kwargs(d, "PREFIX_TUNING", ("encoder_hidden_size",))
    return PrefixTuningConfig(prefix_projection=bool(d.get("prefix_projection", False)), **kwargs)


PREFIX_TUNING = register_peft_method(
    PeftMethod(
        peft_type="PREFIX_TUNING",
        config_cls=PrefixTuningConfig,
        apply=apply_prefix_tuning,
        state_dict=prefix_tuning_state_dict,
        load_state_dict=load_prefix_tuning_state_dict,
        to_peft_dict=prefix_tuning_to_peft_dict,
        from_peft_dict=prefix_tuning_from_peft_dict,
    )
)
