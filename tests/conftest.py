"""Fixtures shared by the whole suite."""

import pytest


@pytest.fixture(scope="session")
def smollm2():
    """``(model, tokenizer)`` of the real SmolLM2-135M-Instruct, loaded once per session.

    Read from the local cache (a few seconds); the very first run on a machine converts the packaged GGUF
    (~40 s). Shared by every test: do not modify the model in place — ``copy.deepcopy`` it first.
    """
    from lowbit.io import load_model

    return load_model("smollm2-135m")
