"""The Hugging Face model types lmforge reads and writes, one `Family` each (see base.py).

    gpt2                           GPT-2
    llama, mistral, qwen2, qwen3   Llama's layout (RMSNorm, RoPE, SwiGLU, GQA) and its variants
    bert                           BERT
    roberta, xlm-roberta           RoBERTa (positions past the padding, its own heads), XLM-RoBERTa
    distilbert                     DistilBERT (no segments, no pooler; learned or sinusoidal positions)
    bart                           BART
    t5, mt5                        T5 v1.0, v1.1, Flan-T5; mT5 (read; written as t5)

The first family whose `matches` accepts an lmforge config is the model_type it exports as,
so the specific variants come before the general ones; a model read as one of several
types sharing an architecture (roberta, xlm-roberta) is written back as that type.
"""

from __future__ import annotations

from lmforge.interop.convert import ConversionError
from lmforge.interop.families import bart, bert, distilbert, gpt2, llama, roberta, t5
from lmforge.interop.families.base import Family

FAMILIES: dict[str, Family] = {f.model_type: f for f in (gpt2.GPT2, *llama.FAMILIES, bert.BERT, roberta.ROBERTA,
                                                          roberta.XLM_ROBERTA, distilbert.DISTILBERT, bart.BART,
                                                          *t5.FAMILIES)}


def family(model_type: str | None) -> Family:
    """The Family of a model_type; ConversionError naming the supported ones otherwise."""
    if model_type not in FAMILIES:
        raise ConversionError(f"unsupported model_type {model_type!r}; supported: {', '.join(FAMILIES)}")
    return FAMILIES[model_type]
