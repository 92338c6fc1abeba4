"""lowbit's one way to autotune a Triton kernel (imported only by modules that already import Triton)."""

from __future__ import annotations

import functools

import torch
import triton


def autotune(configs: list[triton.Config], key: list[str], **kwargs):
    """`triton.autotune` with short benchmarks (5 warm-up runs, 20 ms) whose results Triton also keeps on disk
    (its cache directory, keyed by kernel source, GPU target and configs), so that only the first process
    on a machine pays for tuning a shape: a decode at a new batch size otherwise tunes ~10 launches for
    each of a model's linear shapes before its first token."""
    return triton.autotune(configs=configs, key=key, cache_results=True,
                           do_bench=functools.partial(triton.testing.do_bench, warmup=5, rep=20), **kwargs)  # fmt: skip


_CHOSEN: dict[tuple, tuple[dict, tuple | None]] = {}  # tuning key → (the config's launch kwargs, its grid)


def launch_tuned(tuned, grid, *args, **kwargs) -> None:
    """``tuned[grid](*args, **kwargs)`` the first time per tuning key, then the kernel itself with the config the
    autotuner chose: its own dispatch costs ~30 µs of host time a launch (H100 host, bench/host_overhead.py),
    which an eager QLoRA step pays three times per linear layer. The tuning key arguments must come as keywords,
    and a callable ``grid`` may depend only on them and on the config's meta-parameters: it is evaluated once
    per key.
    """
    key = (id(tuned), *(kwargs[k] for k in tuned.keys), *(a.dtype for a in args if isinstance(a, torch.Tensor)))
    chosen = _CHOSEN.get(key)
    if chosen is None:
        tuned[grid](*args, **kwargs)
        config = tuned.best_config
        _CHOSEN[key] = (config.all_kwargs(), grid(config.kwargs) if callable(grid) else None)
        return
    launch, fixed_grid = chosen
    tuned.fn[fixed_grid or grid](*args, **kwargs, **launch)
