"""Where transformers versions differ in a way lowbit must follow: the name of a decoder's KV cache.

transformers 5.24 renamed the decoder's ``past_key_values`` argument and output field to ``cache`` (the old
keyword is still accepted, with a warning, until 5.40). lowbit passes the name the model's forward declares,
reads whichever field an output has, and in forward hooks looks under both names, since a caller may use either.
"""

from __future__ import annotations

import inspect
from typing import Any

CACHE_NAMES = ("cache", "past_key_values")  # newest first


def cache_kwarg(model) -> str | None:
    """The keyword ``type(model).forward`` takes its KV cache by (None: the model takes no cache).

    The class's forward, not the instance's: lowbit may replace an instance's forward with a ``**kwargs`` wrapper.
    """
    params = inspect.signature(type(model).forward).parameters
    return next((name for name in CACHE_NAMES if name in params), None)


def cache_key(model, kwargs: dict) -> str:
    """The key of ``kwargs`` that holds the cache: the one the caller used, else the model's own name."""
    given = next((name for name in CACHE_NAMES if kwargs.get(name) is not None), None)
    return given or cache_kwarg(model) or CACHE_NAMES[-1]


def output_cache(output) -> Any:
    """The KV cache a model output carries (None when it has none)."""
    for name in CACHE_NAMES:
        if getattr(output, name, None) is not None:
            return getattr(output, name)
    return None


def output_fields(cls, cache) -> dict:
    """``{field: cache}`` for building a transformers output dataclass ``cls`` under either version."""
    fields = getattr(cls, "__dataclass_fields__", {})
    return {next((name for name in CACHE_NAMES if name in fields), CACHE_NAMES[-1]): cache}
