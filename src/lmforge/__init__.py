"""lmforge: from raw text to trained Transformer language models."""

__version__ = "0.1.0"
