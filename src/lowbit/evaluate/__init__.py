"""Evaluation: perplexity over long texts, and offline reference text to measure it on."""

from lowbit.evaluate.data import reference_text
from lowbit.evaluate.perplexity import perplexity

__all__ = ["perplexity", "reference_text"]
