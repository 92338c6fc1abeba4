"""Decoding with a preallocated KV cache and a fixed-shape step, replayed as one CUDA graph on the GPU.

Decoding a small batch eagerly is bound by the host, not the GPU: each token launches some ten kernels per
layer from Python (bench/RESULTS.md: a 32-layer 8B shape at batch 1 decodes no faster in bf16 than in NF4,
which moves a quarter of the bytes). A CUDA graph launches the whole step at once, but it needs fixed
shapes, fixed addresses and no host synchronisation inside the step, which transformers' caches do not give.

`StaticDecoder` owns its cache: one (B, kv_heads, max_len, head_dim) key and value tensor per layer. The
step reads its cache slot and positions from device tensors and advances them itself, so one captured step
replays for every token. It runs the model's own modules (embedding, norms, q/k/v/o projections, MLP,
final norm, head), so 4-bit linears, LoRA and other adapters behave as in the model; only the attention is
its own: the model's rotary embedding (precomputed per position), then scaled dot-product attention of the
new queries over the cache slots written so far. Any Llama-layout decoder works (Llama, Mistral, Qwen2,
Qwen3's q/k norms, SmolLM2); `supports` says why another does not.

Cache slots are shared by the batch: a left-padded prompt of width T fills slots 0 … T-1 and step s writes
slot T + s. Padding slots are masked out of attention; positions count real tokens only, as in `KVDecoder`.

With ``fused_ops`` the step's small operations run as lowbit's fused kernels (`lowbit.kernels`: RMSNorm,
the rotation of q and k, SwiGLU; Triton on CUDA, the torch references elsewhere) instead of the modules'
own chains of elementwise kernels: at batch 1 those launches, not the weights, are about half of a step.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.nn import functional as F

from lowbit.kernels import ops
from lowbit.kernels.norms import rms_norm
from lowbit.kernels.rope import apply_rope, rope_reference
from lowbit.kernels.swiglu import swiglu

# Decoders whose forward is embed → layers (pre-norm attention + MLP) → norm → head, and nothing else. Others
# with the same module names differ in the glue (Gemma scales the embedding, SmolLM3 skips RoPE in some layers).
STATIC_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
# rope types whose angle depends on the position alone (not on the sequence length seen so far)
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def decoder_parts(model: nn.Module) -> tuple[nn.Module, nn.Module] | str:
    """(the decoder stack, the head), or the reason the model has no static decode path."""
    inner, head, config = (getattr(model, name, None) for name in ("model", "lm_head", "config"))
    if inner is None or head is None or config is None:
        return f"{type(model).__name__} is not a transformers causal LM with .model and .lm_head"
    if getattr(config, "model_type", None) not in STATIC_MODEL_TYPES:
        return f"model type {getattr(config, 'model_type', None)!r} is not one of {STATIC_MODEL_TYPES}"
    if any(m._forward_pre_hooks or m._forward_hooks for m in (model, inner)):
        return "the model has forward hooks (e.g. a prompt-learning adapter) that the static decoder would skip"
    rope_type = getattr(getattr(inner, "rotary_emb", None), "rope_type", "default")
    if rope_type not in STATIC_ROPE_TYPES:
        return f"rope type {rope_type!r} depends on the sequence length; supported: {STATIC_ROPE_TYPES}"
    return inner, head


def layer_windows(config) -> list[int | None]:
    """Each layer's sliding attention window (None: full attention), as transformers' masks apply them."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None) or ["sliding_attention"] * config.num_hidden_layers
    return [window if kind == "sliding_attention" else None for kind in types]


# modules whose forward the fused kernels compute exactly: x·rsqrt(mean x² + ε)·w, and down(silu(gate) ⊙ up)
RMS_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "FusedRMSNorm")
SWIGLU_MLPS = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP")


def supports(model: nn.Module) -> bool:
    return not isinstance(decoder_parts(model), str)


def graph_capturable(model: nn.Module) -> bool:
    """False when a module declares (``graph_capturable = False``) that its forward synchronises with the host."""
    return all(getattr(m, "graph_capturable", True) for m in model.modules())


class StaticDecoder:
    """Decodes ``batch`` rows of up to ``max_len`` tokens (prompt + new) of ``model`` with a fixed-shape step.

    The interface is `KVDecoder`'s: ``forward(input_ids)`` runs the prompt, ``advance(next_ids)`` one token a row;
    both return the last position's logits (B, V) in float32. With ``cuda_graph`` (default: on a CUDA device)
    the first ``advance`` captures the step and every later one replays it; the logits it returns are a buffer
    the next replay overwrites. The default is off for models with a module that synchronises with the host
    (``graph_capturable = False``, e.g. LLM.int8's outlier split), and a capture that fails falls back to
    eager steps with a warning. ``fused_ops`` computes the norms, the rotation and SwiGLU with lowbit's fused
    kernels (``backend`` as in `kernels.dispatch.use_triton`); modules of other kinds run as they are.
    """

    def __init__(self, model: nn.Module, input_ids: torch.Tensor, max_len: int,
                 attention_mask: torch.Tensor | None = None, cuda_graph: bool | None = None,
                 fused_ops: bool = False, backend: str = "auto") -> None:  # fmt: skip
        parts = decoder_parts(model)
        if isinstance(parts, str):
            raise ValueError(f"no static decode path: {parts}")
        self.inner, self.head = parts
        config = model.config
        batch, width = input_ids.shape
        self.max_len = max_len
        if width >= self.max_len:
            raise ValueError(f"the prompt ({width} tokens) leaves no room in max_len = {self.max_len}")
        device, dtype = input_ids.device, self.inner.embed_tokens.weight.dtype
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.windows = layer_windows(config)
        shape = (batch, self.kv_heads, self.max_len, self.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in self.inner.layers]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in self.inner.layers]
        with torch.no_grad():  # (max_len, D) each: the angles of every position, computed once
            probe = torch.zeros(1, dtype=dtype, device=device)
            cos, sin = self.inner.rotary_emb(probe, torch.arange(self.max_len, device=device)[None])
            self.cos, self.sin = cos[0], sin[0]
        real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        self.valid = torch.zeros(batch, self.max_len, dtype=torch.bool, device=device)  # slot holds a real token
        self.valid[:, :width] = real
        self.slot_ids = torch.arange(self.max_len, device=device)
        self.prompt_positions = real.long().cumsum(-1) - 1  # (B, T); padding's -1 is clamped, and masked anyway
        # the next step's input, cache slot (shared by the rows) and positions, all on the device: a graph
        # replay reads and advances them without the host
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.slot = torch.full((1,), width, dtype=torch.long, device=device)
        self.position = self.prompt_positions[:, -1:] + 1  # (B, 1)
        self.width, self.steps = width, 0
        self.fused_ops, self.backend = fused_ops, backend
        self.cuda_graph = device.type == "cuda" and graph_capturable(model) if cuda_graph is None else cuda_graph
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None

    def _run(self, ids: torch.Tensor, positions: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        """Tokens ids (B, n) at positions (B, n) into slots start … start + n - 1 (start: (1,)); last logits."""
        n = ids.shape[1]
        slots = start + torch.arange(n, device=ids.device)  # (n,)
        at = positions.clamp(min=0)
        cos, sin = self.cos[at], self.sin[at]  # (B, n, D)
        # query slot t sees the real keys at slots ≤ t; also itself, so that a padding query stays finite
        distance = slots[:, None] - self.slot_ids[None, :]  # (n, max_len)
        causal = ((distance >= 0) & self.valid[:, None, :]) | (distance == 0)  # (B, n, max_len)
        # grouped-query attention without repeating the cache: the g query heads of a key/value head become
        # g·n query rows of it (head h uses key/value head h // g); one mask per window, shared by the layers
        batch, group = ids.shape[0], self.heads // self.kv_heads
        masks = {w: (causal if w is None else causal & (distance < w))[:, None, None]
                 .expand(batch, 1, group, n, self.max_len).reshape(batch, 1, group * n, self.max_len)
                 for w in set(self.windows)}  # fmt: skip
        x = self.inner.embed_tokens(ids)
        for layer, keys, values, window in zip(self.inner.layers, self.keys, self.values, self.windows):
            h = self._norm(layer.input_layernorm, x)
            x = x + self._attention(layer.self_attn, h, cos, sin, masks[window], slots, keys, values)
            x = x + self._mlp(layer.mlp, self._norm(layer.post_attention_layernorm, x))
        return self.head(self._norm(self.inner.norm, x[:, -1:]))[:, 0].float()

    def _norm(self, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.fused_ops and type(norm).__name__ in RMS_NORMS:
            return rms_norm(x, norm.weight, norm.variance_epsilon, self.backend)
        return norm(x)

    def _mlp(self, mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.fused_ops and type(mlp).__name__ in SWIGLU_MLPS and getattr(mlp.config, "hidden_act", None) == "silu":
            return mlp.down_proj(swiglu(mlp.gate_proj(x), mlp.up_proj(x), self.backend))
        return mlp(x)

    def _attention(self, attn, h, cos, sin, mask, slots, keys, values) -> torch.Tensor:
        batch, n, _ = h.shape
        q = attn.q_proj(h).view(batch, n, -1, self.head_dim)
        k = attn.k_proj(h).view(batch, n, -1, self.head_dim)
        v = attn.v_proj(h).view(batch, n, -1, self.head_dim).transpose(1, 2)
        if hasattr(attn, "q_norm"):  # Qwen3: an RMSNorm over each head before the rotation
            q, k = self._norm(attn.q_norm, q), self._norm(attn.k_norm, k)
        if self.fused_ops:  # (B, n, H, D) in, (B, H, n, D) views out
            q, k = apply_rope(q, k, cos, sin, unsqueeze_dim=2, backend=self.backend)
            q, k = q.transpose(1, 2), k.transpose(1, 2)
        else:
            q, k = rope_reference(q.transpose(1, 2), cos, sin), rope_reference(k.transpose(1, 2), cos, sin)
        keys.index_copy_(2, slots, k.to(keys.dtype))
        values.index_copy_(2, slots, v.to(values.dtype))
        q = q.reshape(batch, self.kv_heads, -1, self.head_dim)  # (B, kv heads, g·n, D)
        out = F.scaled_dot_product_attention(q, keys.to(q.dtype), values.to(q.dtype), attn_mask=mask,
                                             scale=attn.scaling)  # fmt: skip
        out = out.view(batch, self.heads, n, self.head_dim).transpose(1, 2).reshape(batch, n, -1)
        return attn.o_proj(out)

    def _step(self) -> torch.Tensor:
        """One token a row from ``self.ids`` at ``self.slot``; advances the slot and positions in place."""
        self.valid.index_fill_(1, self.slot, True)
        logits = self._run(self.ids, self.position, self.slot)
        self.slot.add_(1)
        self.position.add_(1)
        return logits

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Run the prompt (B, T) given at construction; returns its last logits (B, V) in float32."""
        if tuple(input_ids.shape) != (self.ids.shape[0], self.width):
            raise ValueError(f"forward takes the prompt, of shape {(self.ids.shape[0], self.width)}; "
                             f"got {tuple(input_ids.shape)}")  # fmt: skip
        with torch.no_grad():
            return self._run(input_ids, self.prompt_positions, torch.zeros_like(self.slot))

    def advance(self, next_ids: torch.Tensor) -> torch.Tensor:
        """Append one token per row (B,) and return the logits for the following position (B, V)."""
        if self.width + self.steps >= self.max_len:
            raise ValueError(f"the static KV cache is full (max_len = {self.max_len} tokens)")
        self.steps += 1
        self.ids.copy_(next_ids.view(-1, 1))
        with torch.no_grad():
            if not self.cuda_graph:
                return self._step()
            if self.graph is None:
                try:
                    self._capture()
                except RuntimeError as e:  # a module synchronised with the host inside the step
                    warnings.warn(f"the decode step could not be captured as a CUDA graph, decoding without "
                                  f"one: {str(e).splitlines()[0]}", stacklevel=2)  # fmt: skip
                    self.cuda_graph, self.graph = False, None
                    return self._step()
            self.graph.replay()
            return self.logits

    def _capture(self) -> None:
        """Warm the step up eagerly (kernel autotuning, cuBLAS workspaces), then capture it as a CUDA graph.

        A warm-up step really runs, so the state it advanced is put back afterwards; its cache write lands in
        the slot the first replay writes again. Capturing runs nothing.
        """
        saved = (self.slot.clone(), self.position.clone(), self.valid.clone())
        stream = torch.cuda.Stream(self.ids.device)
        stream.wait_stream(torch.cuda.current_stream(self.ids.device))
        with ops.for_graph_replay():  # the kernels fastest on the GPU, not those cheapest to launch
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self._step()
                    for now, before in zip((self.slot, self.position, self.valid), saved):
                        now.copy_(before)
            torch.cuda.current_stream(self.ids.device).wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = self._step()
