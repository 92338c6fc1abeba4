"""Fixtures shared by the whole suite."""

import os

import pytest
import torch

# Triton reads TRITON_INTERPRET when a @triton.jit kernel is defined, i.e. when lowbit.kernels is first
# imported — by whichever test module imports lowbit first — so it is set here, before any of them.
# Without a GPU the kernels then run in Triton's interpreter on the CPU (tests/kernels).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def smollm2():
    """``(model, tokenizer)`` of the real SmolLM2-135M-Instruct, loaded once per session.

    Read from the local cache (a few seconds); the very first run on a machine converts the packaged GGUF
    (~40 s). Shared by every test: do not modify the model in place — ``copy.deepcopy`` it first.
    """
    from lowbit.io import load_model

    return load_model("smollm2-135m")
