"""Fixtures shared by the whole suite."""

import os

# The suite's numerically marginal checks (the PTQ orderings on 512 tokens of SmolLM2, calibration-based
# methods) depend on which CPU kernels torch dispatches to: measured on an AVX-512 machine, SpQR's and
# SmoothQuant's perplexity excess moved by up to 1.4 points against AVX2. Every machine runs the AVX2
# kernels, so results are the same on any x86 CI host. Set before torch picks its kernels.
os.environ.setdefault("ATEN_CPU_CAPABILITY", "avx2")

import pytest  # noqa: E402
import torch  # noqa: E402

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
