"""lowbit's one way to autotune a Triton kernel (imported only by modules that already import Triton)."""

from __future__ import annotations

import functools

import triton


def autotune(configs: list[triton.Config], key: list[str], **kwargs):
    """`triton.autotune` with short benchmarks (5 warm-up runs, 20 ms) whose results Triton also keeps on disk
    (its cache directory, keyed by kernel source, GPU target and configs), so that only the first process
    on a machine pays for tuning a shape: a decode at a new batch size otherwise tunes ~10 launches for
    each of a model's linear shapes before its first token."""
    return triton.autotune(configs=configs, key=key, cache_results=True,
                           do_bench=functools.partial(triton.testing.do_bench, warmup=5, rep=20), **kwargs)  # fmt: skip
