"""The KV cache under either of transformers' names (`past_key_values` before 5.24, `cache` from 5.24)."""

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from lowbit.hf_compat import CACHE_NAMES, cache_key, cache_kwarg, output_cache, output_fields
from tests.tiny_models import tiny_llama


class OldDecoder(nn.Module):
    def forward(self, input_ids=None, past_key_values=None, use_cache=None):
        return input_ids


class NewDecoder(nn.Module):
    def forward(self, input_ids=None, cache=None, use_cache=None):
        return input_ids


def test_the_name_the_forward_declares_is_used():
    assert cache_kwarg(OldDecoder()) == "past_key_values"
    assert cache_kwarg(NewDecoder()) == "cache"
    assert cache_kwarg(nn.Linear(2, 2)) is None
    assert cache_kwarg(tiny_llama()) in CACHE_NAMES  # whichever the installed transformers uses
    model = NewDecoder()
    model.forward = lambda **kw: None  # an instance-level wrapper does not hide the class's name
    assert cache_kwarg(model) == "cache"


def test_a_callers_name_wins_in_hooks_and_outputs_are_read_under_either_name():
    assert cache_key(NewDecoder(), {"past_key_values": object()}) == "past_key_values"
    assert cache_key(NewDecoder(), {"past_key_values": None}) == "cache"
    assert cache_key(OldDecoder(), {}) == "past_key_values"
    marker = object()
    out = CausalLMOutputWithPast(logits=torch.zeros(1), **output_fields(CausalLMOutputWithPast, marker))
    assert output_cache(out) is marker
    model = tiny_llama()
    with torch.no_grad():
        real = model(input_ids=torch.tensor([[1, 2, 3]]), use_cache=True)
    assert output_cache(real).get_seq_length() == 3
