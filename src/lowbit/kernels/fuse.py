"""`fuse_for_training(model)`: route a transformers Llama / Qwen2 / Mistral causal LM through the fused ops.

What it changes, each by replacing a module (the state dict, parameter objects and so optimizer state and
PEFT files stay the same):

- every `LlamaRMSNorm` / `Qwen2RMSNorm` / `MistralRMSNorm` → `norms.FusedRMSNorm` (same weight);
- every `LlamaMLP` / `Qwen2MLP` / `Qwen3MLP` / `MistralMLP` with a SiLU activation, and every `GemmaMLP` /
  `Gemma2MLP` / `Gemma3MLP` with GELU's tanh approximation (GeGLU) → `swiglu.SwiGLUMLP` (same projections;
  Gemma's norms, attention and soft-capped head stay as they are);
- every `LoraLinear` over a `QuantLinear` → `lora_fused.FusedLoraLinear` (same adapters);
- every `LlamaAttention` / `Qwen2Attention` / `MistralAttention` runs its RoPE through `rope.apply_rope`:
  transformers calls `apply_rotary_pos_emb` as a module global, so the instance gets its class's own
  forward (the same code object) bound to a copy of those globals in which that name is the fused op.
  transformers itself is not patched; a call with a KV cache runs the class's forward unchanged;
- the loss: when called with `labels`, the model computes the shifted causal-LM loss with
  `cross_entropy.causal_lm_loss` from the last hidden states and `lm_head.weight`, and returns
  `logits=None` — the (tokens, vocab) logits are never built. Without labels it runs as before.

The last item sets `forward` on this model instance (not its class): transformers computes the loss inside
`XForCausalLM.forward` from full logits, so there is no module to swap for it. `unfuse_loss(model)` removes
it.
"""

from __future__ import annotations

import functools
import inspect
import types

from torch import nn

from lowbit.hf_compat import output_cache, output_fields
from lowbit.kernels.cross_entropy import causal_lm_loss
from lowbit.kernels.lora_fused import FusedLoraLinear
from lowbit.kernels.norms import FusedRMSNorm
from lowbit.kernels.rope import apply_rope
from lowbit.kernels.swiglu import SwiGLUMLP
from lowbit.nn.quant_linear import QuantLinear
from lowbit.peft.lora import LoraLinear

RMS_NORMS = ("LlamaRMSNorm", "Qwen2RMSNorm", "MistralRMSNorm")  # x·rsqrt(mean x² + ε)·w; not Gemma's (1 + w)
GATED_MLPS = ("LlamaMLP", "Qwen2MLP", "Qwen3MLP", "MistralMLP", "GemmaMLP", "Gemma2MLP", "Gemma3MLP")
# transformers' activation modules → the fused op's activation
MLP_ACTIVATIONS = {"SiLU": "silu", "SiLUActivation": "silu", "GELUTanh": "gelu_tanh", "PytorchGELUTanh": "gelu_tanh"}
ROPE_ATTENTIONS = ("LlamaAttention", "Qwen2Attention", "MistralAttention")  # full-width rotary, (B, H, T, D)
ROPE_NAME = "apply_rotary_pos_emb"
CACHE_ARGS = ("cache", "past_key_values", "past_key_value")


def _mlp_activation(mlp: nn.Module) -> str | None:
    return MLP_ACTIVATIONS.get(type(getattr(mlp, "act_fn", None)).__name__)


def _replacement(module: nn.Module, backend: str, norms: bool, mlp: bool, lora: bool) -> nn.Module | None:
    kind = type(module).__name__
    if norms and kind in RMS_NORMS:
        return FusedRMSNorm.from_module(module, backend)
    if mlp and kind in GATED_MLPS and _mlp_activation(module) is not None:
        return SwiGLUMLP.from_module(module, backend, _mlp_activation(module))
    if lora and type(module) is LoraLinear and isinstance(module.base_layer, QuantLinear):
        return FusedLoraLinear.from_lora(module)
    return None


def route_rope(attention: nn.Module, backend: str = "auto") -> bool:
    """Run this attention module's RoPE through the fused `apply_rope` (see the module docstring); False when
    its forward does not call `apply_rotary_pos_emb` or is already routed."""
    if "forward" in attention.__dict__:
        return False
    original = type(attention).forward
    code = inspect.unwrap(original)  # past decorators (transformers' kwarg renaming), which a cache call keeps
    if ROPE_NAME not in code.__code__.co_names:
        return False
    scope = {**code.__globals__, ROPE_NAME: functools.partial(apply_rope, backend=backend)}
    routed = types.FunctionType(code.__code__, scope, code.__name__, code.__defaults__, code.__closure__)
    routed.__kwdefaults__ = code.__kwdefaults__

    def forward(self, *args, **kwargs):
        if len(args) > 3 or any(kwargs.get(name) is not None for name in CACHE_ARGS):
            return original(self, *args, **kwargs)  # generation: the class's forward, untouched
        return routed(self, *args, **kwargs)

    attention.forward = types.MethodType(forward, attention)
    return True


def _chunked_loss_forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None,
                          labels=None, use_cache=None, logits_to_keep=0, **kwargs):  # fmt: skip
    """`XForCausalLM.forward` with the loss from hidden states (chunked cross-entropy) when labels are given.

    A KV cache travels in ``kwargs`` under whichever name the caller used (`lowbit.hf_compat`)."""
    model_forward = type(self).forward
    if labels is None:
        return model_forward(self, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             inputs_embeds=inputs_embeds, use_cache=use_cache, logits_to_keep=logits_to_keep,
                             **kwargs)  # fmt: skip
    from transformers.modeling_outputs import CausalLMOutputWithPast

    num_items = kwargs.pop("num_items_in_batch", None)
    out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                     inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)  # fmt: skip
    loss = causal_lm_loss(out.last_hidden_state, self.lm_head.weight, labels, num_items_in_batch=num_items,
                          chunk_size=self._lowbit_loss_chunk, backend=self._lowbit_loss_backend)  # fmt: skip
    return CausalLMOutputWithPast(loss=loss, logits=None, hidden_states=out.hidden_states, attentions=out.attentions,
                                  **output_fields(CausalLMOutputWithPast, output_cache(out)))  # fmt: skip


# causal LMs whose logits are exactly lm_head(final hidden states): Gemma 2 soft-caps them, Cohere and
# Granite scale them, so their loss must come from their own forward
PLAIN_HEAD_MODELS = ("llama", "mistral", "qwen2", "qwen3")


def fuse_loss(model: nn.Module, chunk_size: int | None = None, backend: str = "auto") -> bool:
    """Compute this causal LM's loss with the chunked cross-entropy; False when the model does not fit
    (a model type outside PLAIN_HEAD_MODELS, no `.model`, or not a plain bias-free `nn.Linear` `lm_head`,
    e.g. a LoRA-wrapped head)."""
    head = getattr(model, "lm_head", None)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in PLAIN_HEAD_MODELS:
        return False
    if not (hasattr(model, "model") and type(head) is nn.Linear and head.bias is None):
        return False
    model._lowbit_loss_chunk, model._lowbit_loss_backend = chunk_size, backend
    model.forward = types.MethodType(_chunked_loss_forward, model)
    return True


def has_fused_loss(model: nn.Module) -> bool:
    """Whether `fuse_loss` routed this model's loss through the chunked cross-entropy."""
    forward = model.__dict__.get("forward")
    return getattr(forward, "__func__", None) is _chunked_loss_forward


def unfuse_loss(model: nn.Module) -> None:
    model.__dict__.pop("forward", None)


def fuse_for_training(model: nn.Module, *, norms: bool = True, mlp: bool = True, lora: bool = True,
                      rope: bool = True, loss: bool = True, backend: str = "auto",
                      loss_chunk_size: int | None = None) -> dict:  # fmt: skip
    """Swap the fused training ops into `model` in place; returns {what: how many} it replaced.

    backend: "auto" (Triton on CUDA, the torch references elsewhere), "torch" or "triton"
    (see `dispatch.use_triton`). Call it after quantizing and `apply_lora`, before building the optimizer
    or not — the parameters are the same objects.
    """
    counts = {"rms_norm": 0, "swiglu_mlp": 0, "geglu_mlp": 0, "qlora_linear": 0, "rope": 0, "loss": 0}
    names = {FusedRMSNorm: "rms_norm", FusedLoraLinear: "qlora_linear"}

    def visit(parent: nn.Module) -> None:  # depth-first, into the replacements (a SwiGLUMLP's LoRA projections)
        for child_name, child in list(parent.named_children()):
            new = _replacement(child, backend, norms, mlp, lora)
            if new is not None:
                setattr(parent, child_name, new)
                if isinstance(new, SwiGLUMLP):
                    counts["swiglu_mlp" if new.activation == "silu" else "geglu_mlp"] += 1
                else:
                    counts[names[type(new)]] += 1
            visit(new if new is not None else child)

    visit(model)
    if rope:
        counts["rope"] = sum(route_rope(m, backend) for m in model.modules() if type(m).__name__ in ROPE_ATTENTIONS)
    if loss:
        counts["loss"] = int(fuse_loss(model, loss_chunk_size, backend))
    return counts
