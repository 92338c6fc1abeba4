"""Model loading: lowbit's packaged default model, local transformers directories and GGUF files."""

from lowbit.io.loading import load_model

__all__ = ["load_model"]
