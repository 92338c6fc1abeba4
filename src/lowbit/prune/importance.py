"""Data-aware importance of attention heads and MLP channels, for structured pruning.

Weight norms alone ignore how large the inputs of a weight are. LLMs carry a few hidden dimensions with
activations hundreds of times larger than the rest ("massive activations", Sun et al. 2024), so a channel whose
weights look small can still carry a large signal — on SmolLM2-135M, removing the 256 channels per layer with the
smallest weight norms is far worse than removing 256 at random. Measuring the actual outputs on a little
calibration text fixes that (the same idea as Wanda, Sun et al. 2023, |W|·‖X‖, applied to whole structures):

    channel j of an MLP:   E_tokens |a_j| · ‖W_down[:, j]‖     a = silu(gate(x)) · up(x), the input of down_proj
    attention head h:      E_tokens ‖o_h‖ · ‖W_o[:, h]‖        o_h = head h's attention output, o_proj's input slice

i.e. the average size of what the structure writes into the residual stream.
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.prune.structured import _layers, _linear


def activation_importance(model: nn.Module, tokenizer, texts: list[str] | str, seq_len: int = 256,
                          max_sequences: int = 8) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:  # fmt: skip
    """(head scores, channel scores): layer index → (n_heads,) and (intermediate,) importance, higher = keep.

    ``texts`` are tokenized, concatenated and cut into at most ``max_sequences`` windows of ``seq_len`` tokens.
    """
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    ids = tokenizer("\n\n".join([texts] if isinstance(texts, str) else texts), return_tensors="pt",
                    verbose=False).input_ids[0]  # fmt: skip
    n = min(max_sequences, ids.numel() // seq_len)
    if n == 0:
        raise ValueError(f"the calibration text has {ids.numel()} tokens; need at least seq_len={seq_len}")
    batches = ids[: n * seq_len].view(n, seq_len)
    head_sums: dict[int, torch.Tensor] = {}
    channel_sums: dict[int, torch.Tensor] = {}
    hooks = []
    for i, block in enumerate(_layers(model)):
        def on_o_proj(module, args, i=i):  # args[0]: (B, T, n_heads · head_dim)
            x = args[0].detach().float()
            per_head = x.view(*x.shape[:-1], -1, head_dim).norm(dim=-1)  # (B, T, n_heads)
            head_sums[i] = head_sums.get(i, 0) + per_head.sum(dim=(0, 1))

        def on_down_proj(module, args, i=i):  # args[0]: (B, T, intermediate)
            channel_sums[i] = channel_sums.get(i, 0) + args[0].detach().float().abs().sum(dim=(0, 1))

        hooks.append(_linear(block.self_attn, "o_proj").register_forward_pre_hook(on_o_proj))
        hooks.append(_linear(block.mlp, "down_proj").register_forward_pre_hook(on_down_proj))
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for row in batches:
                model(input_ids=row[None].to(device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    heads, channels = {}, {}
    n_tokens = batches.numel()
    for i, block in enumerate(_layers(model)):  # mean size of the input × norm of the weights it meets
        o = block.self_attn.o_proj.weight.detach().float()
        heads[i] = head_sums[i].cpu() / n_tokens * o.view(o.shape[0], -1, head_dim).norm(dim=(0, 2)).cpu()
        down = block.mlp.down_proj.weight.detach().float()
        channels[i] = channel_sums[i].cpu() / n_tokens * down.norm(dim=0).cpu()
    return heads, channels
