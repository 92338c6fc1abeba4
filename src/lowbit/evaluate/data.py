"""Evaluation text that every Python installation already has on disk.

The Python reference topics (``pydoc_data.topics``, the text behind ``help("with")`` and friends) are several
hundred thousand characters of real technical English prose from the Python documentation (PSF licence). They
ship with CPython itself, so lowbit needs no download and ships no data to evaluate perplexity offline.
"""

from __future__ import annotations


def reference_text(n_chars: int | None = None) -> str:
    """The Python reference topics joined in sorted-topic order, optionally cut to the first ``n_chars``.

    Deterministic for a given Python version; the documentation changes between Python releases, so compare
    perplexities measured on it only within one Python minor version.
    """
    from pydoc_data.topics import topics  # imported here: a 470 kB module nobody else needs

    text = "\n\n".join(topics[key].strip() for key in sorted(topics))
    if n_chars is None:
        return text
    if isinstance(n_chars, bool) or not isinstance(n_chars, int) or n_chars <= 0:
        raise ValueError(f"n_chars must be a positive int or None, got {n_chars!r}")
    if n_chars > len(text):
        raise ValueError(f"n_chars={n_chars} exceeds the {len(text)} characters of the reference text")
    return text[:n_chars]
