"""P-tuning: the virtual tokens come out of a small prompt encoder over trainable pseudo-token embeddings.

Liu et al., "GPT Understands, Too" (2021), §3: instead of training the prompt embeddings P directly, train
pseudo-token embeddings h_0..h_{N-1} and a prompt encoder f, and feed the model f(h) ∈ R^{N×C} in front of
the input. The encoder couples the virtual tokens (they are no longer independent vectors), which the
paper found optimises better. f is either
  - "lstm": a bidirectional LSTM over h followed by a 2-layer ReLU MLP (eq. 2 of the paper):
        f(h) = MLP([LSTM→(h); LSTM←(h)]),  MLP: 2H → 2H → C
  - "mlp":  a 3-layer ReLU MLP applied to each h_i:  C → H → H → C   (PEFT's recommended default)
with the layer shapes of PEFT's `PromptEncoder` so that weights can be moved between the two.

Once trained, f(h) is a constant: `drop_prompt_encoder` computes it once, keeps only the (N, C) result and
deletes h and f. That result is also what is saved — PEFT's P_TUNING adapter file stores the encoder's
output under `prompt_embeddings` — so a loaded P-tuning adapter is the fixed prompt, with no encoder.
The prompt reaches the model through prompt_tuning.py's forward pre-hook (see there for why a hook).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from lowbit.peft.prompt_tuning import (
    VIRTUAL_TOKENS_ATTR,
    attach_virtual_tokens,
    check_no_prompt_adapter,
    check_prompt_learning_fields,
    detach_prompt_source,
    freeze_parameters,
    prompt_learning_kwargs,
    prompt_learning_peft_fields,
    prompt_source,
    resolve_dims,
)
from lowbit.peft.registry import PeftMethod, record_adapter, register_peft_method
from lowbit.peft.state_check import check_adapter_state, check_new_adapter_name

CONFIG_VERSION = 1
ENCODERS = ("mlp", "lstm")


@dataclass(frozen=True)
class PTuningConfig:
    """num_virtual_tokens: N. encoder: "mlp" or "lstm". encoder_hidden_size: H (None = the model's
    hidden size C, as PEFT). encoder_num_layers / encoder_dropout: of the LSTM (the MLP always has 3 layers;
    its encoder_num_layers stays 2, PEFT's default).
    token_dim, num_layers, num_attention_heads: filled from the model by apply.
    """

    num_virtual_tokens: int = 20
    encoder: str = "mlp"
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0
    task_type: str = "CAUSAL_LM"
    token_dim: int | None = None
    num_layers: int | None = None
    num_attention_heads: int | None = None
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        check_prompt_learning_fields(self, "PTuningConfig")
        if self.encoder not in ENCODERS:
            raise ValueError(f"encoder must be one of {ENCODERS}, got {self.encoder!r}")
        if self.encoder_hidden_size is not None and (
            not isinstance(self.encoder_hidden_size, int) or self.encoder_hidden_size < 1
        ):
            raise ValueError(f"encoder_hidden_size must be a positive int or None, got {self.encoder_hidden_size!r}")
        if not isinstance(self.encoder_num_layers, int) or self.encoder_num_layers < 1:
            raise ValueError(f"encoder_num_layers must be a positive int, got {self.encoder_num_layers!r}")
        if self.encoder == "mlp" and self.encoder_num_layers != 2:
            raise ValueError("encoder_num_layers sets the LSTM's depth; the MLP encoder always has its 3 layers "
                             "(leave encoder_num_layers at 2)")  # fmt: skip
        if not 0.0 <= self.encoder_dropout < 1.0:
            raise ValueError(f"encoder_dropout must be in [0, 1), got {self.encoder_dropout}")


class PromptEncoder(nn.Module):
    """f(h): pseudo-token embeddings `embedding` (N, C) → prompt (N, C); or, once dropped, a fixed `prompt`."""

    def __init__(self, config: PTuningConfig) -> None:
        super().__init__()
        n, c, h = config.num_virtual_tokens, config.token_dim, config.encoder_hidden_size
        self.encoder = config.encoder
        self.embedding = nn.Embedding(n, c)  # h_0..h_{N-1}, N(0, 1) like PEFT's
        if config.encoder == "lstm":
            self.lstm_head = nn.LSTM(c, h, num_layers=config.encoder_num_layers, dropout=config.encoder_dropout,
                                     bidirectional=True, batch_first=True)  # fmt: skip
            self.mlp_head = nn.Sequential(nn.Linear(2 * h, 2 * h), nn.ReLU(), nn.Linear(2 * h, c))
        else:
            self.mlp_head = nn.Sequential(nn.Linear(c, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, c))
        self.register_parameter("prompt", None)  # set by drop_encoder
        self._n = n

    @property
    def num_virtual_tokens(self) -> int:
        return self._n

    @property
    def has_encoder(self) -> bool:
        return self.prompt is None

    def forward(self) -> torch.Tensor:
        if self.prompt is not None:
            return self.prompt  # (N, C)
        h = self.embedding.weight.unsqueeze(0)  # (1, N, C): one sequence, the same for every batch row
        if self.encoder == "lstm":
            h = self.lstm_head(h)[0]  # (1, N, 2H)
        return self.mlp_head(h)[0]  # (N, C)

    def drop_encoder(self, prompt: torch.Tensor | None = None) -> None:
        """Keep only the prompt (the encoder's output now, or `prompt`), as a frozen parameter."""
        with torch.no_grad():
            value = self().detach().clone() if prompt is None else prompt.detach().clone()
        for name in ("embedding", "lstm_head", "mlp_head"):
            if hasattr(self, name):
                delattr(self, name)
        self.prompt = nn.Parameter(value, requires_grad=False)


def _resolve(model: nn.Module, config: PTuningConfig) -> PTuningConfig:
    config = resolve_dims(model, config)
    return replace(config, encoder_hidden_size=config.encoder_hidden_size or config.token_dim)


def apply_p_tuning(model: nn.Module, config: PTuningConfig, adapter_name: str = "default") -> nn.Module:
    """Freeze the model and prepend the prompt encoder's N virtual tokens to every input (in place)."""
    config = _resolve(model, config)
    check_new_adapter_name(model, adapter_name)
    check_no_prompt_adapter(model)
    freeze_parameters(model)
    device = model.get_input_embeddings().weight.device
    attach_virtual_tokens(model, adapter_name, PromptEncoder(config).to(device))
    record_adapter(model, adapter_name, config)
    return model


def drop_prompt_encoder(model: nn.Module, adapter_name: str = "default") -> nn.Module:
    """After training: replace pseudo tokens + encoder by their output (the model's logits do not change)."""
    source = prompt_source(model, adapter_name)
    if not isinstance(source, PromptEncoder):
        raise ValueError(f"adapter {adapter_name!r} is not a P-tuning adapter")
    if source.has_encoder:
        source.drop_encoder()
    return model


def remove_p_tuning(model: nn.Module, adapter_name: str = "default") -> nn.Module:
    detach_prompt_source(model, adapter_name, VIRTUAL_TOKENS_ATTR, PTuningConfig)
    return model


def p_tuning_state_dict(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """PEFT's layout: the encoder's output, (N, C), under `prompt_embeddings`."""
    with torch.no_grad():
        return {"prompt_embeddings": prompt_source(model, adapter_name)().detach().clone()}


def load_p_tuning_state_dict(model: nn.Module, state: dict[str, torch.Tensor], adapter_name: str) -> None:
    """Loading gives the fixed prompt: the file has no encoder, so the encoder (if any) is dropped."""
    source = prompt_source(model, adapter_name)
    if not isinstance(source, PromptEncoder):
        raise ValueError(f"adapter {adapter_name!r} is not a P-tuning adapter")
    check_adapter_state({"prompt_embeddings": (source.num_virtual_tokens, model.get_input_embeddings().embedding_dim)},
                        state, "P_TUNING")  # fmt: skip
    source.drop_encoder(state["prompt_embeddings"].to(model.get_input_embeddings().weight.device).float())


def p_tuning_to_peft_dict(config: PTuningConfig) -> dict:
    d = prompt_learning_peft_fields(config, "P_TUNING")
    d.update(encoder_reparameterization_type=config.encoder.upper(), encoder_hidden_size=config.encoder_hidden_size,
             encoder_num_layers=config.encoder_num_layers, encoder_dropout=config.encoder_dropout)  # fmt: skip
    return d


def p_tuning_from_peft_dict(d: dict) -> PTuningConfig:
    kwargs = prompt_learning_kwargs(d, "P_TUNING", ("encoder_hidden_size", "encoder_num_layers", "encoder_dropout"))
    encoder = str(d.get("encoder_reparameterization_type") or "MLP").lower()
    return PTuningConfig(encoder=encoder, **kwargs)


P_TUNING = register_peft_method(
    PeftMethod(
        peft_type="P_TUNING",
        config_cls=PTuningConfig,
        apply=apply_p_tuning,
        state_dict=p_tuning_state_dict,
        load_state_dict=load_p_tuning_state_dict,
        to_peft_dict=p_tuning_to_peft_dict,
        from_peft_dict=p_tuning_from_peft_dict,
    )
)
