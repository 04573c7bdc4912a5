"""The three model families, their presets, and the task heads.

    family    config                 model            presets
    gpt       GPTConfig              GPT              gpt2-124m, gpt2-355m, gpt-tiny, llama-small, llama-tiny
    bert      BertConfig             Bert             bert-base, bert-large, bert-tiny, bert-mini,
                                                      roberta-base, distilbert-base (the later encoders' layouts)
    encdec    EncoderDecoderConfig   EncoderDecoder   bart-base, bart-large, bart-tiny, transformer-base, ...
    t5        T5Config               T5               t5-small, t5-base, flan-t5-small, flan-t5-base, mt5-small, t5-tiny

EncoderDecoder and T5 are both encoder-decoders (EncoderDecoderBase: what generation and the
seq2seq tasks call); `ENCODER_DECODERS` names their families.
"""

from __future__ import annotations

import copy

from torch import nn

from lmforge.models import bert, encdec, gpt, t5
from lmforge.models.bert import Bert, BertConfig
from lmforge.models.encdec import EncoderDecoder, EncoderDecoderBase, EncoderDecoderConfig
from lmforge.models.gpt import GPT, GPTConfig
from lmforge.models.heads import HeadSpec, SequenceClassifier, SpanExtractor, TokenClassifier, attach_head
from lmforge.models.t5 import T5, T5Config

ModelConfig = GPTConfig | BertConfig | EncoderDecoderConfig | T5Config

FAMILIES: dict[str, tuple[type, type[nn.Module]]] = {
    "gpt": (GPTConfig, GPT),
    "bert": (BertConfig, Bert),
    "encdec": (EncoderDecoderConfig, EncoderDecoder),
    "t5": (T5Config, T5),
}
ENCODER_DECODERS = ("encdec", "t5")  # the families whose models are EncoderDecoderBase

# preset name -> (config class, the fields it sets)
PRESETS: dict[str, tuple[type, dict]] = {
    **{name: (GPTConfig, kw) for name, kw in gpt.PRESETS.items()},
    **{name: (BertConfig, kw) for name, kw in bert.PRESETS.items()},
    **{name: (EncoderDecoderConfig, kw) for name, kw in encdec.PRESETS.items()},
    **{name: (T5Config, kw) for name, kw in t5.PRESETS.items()},
}


def family_of(config: ModelConfig) -> str:
    for name, (config_cls, _) in FAMILIES.items():
        if isinstance(config, config_cls):
            return name
    raise TypeError(f"not a model config: {type(config).__name__}")


def preset(name: str, **overrides) -> ModelConfig:
    """A preset's config with fields overridden (e.g. vocab_size=...). Fields derived
    from others (head_dim, hidden_dim, n_kv_heads) follow the overrides unless set."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(sorted(PRESETS))}")
    config_cls, fields = PRESETS[name]
    return config_cls.from_dict({**copy.deepcopy(fields), **overrides})


def config_from_dict(family: str, d: dict) -> ModelConfig:
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; families: {', '.join(FAMILIES)}")
    return FAMILIES[family][0].from_dict(d)


def build(config: ModelConfig) -> nn.Module:
    """A randomly initialised model of the config's family."""
    return FAMILIES[family_of(config)][1](config)


def count_params(model: nn.Module, *, trainable_only: bool = False, positions: bool = True) -> int:
    """Parameters, each shared tensor counted once. positions=False leaves out learned
    position tables (the N of the 6N FLOPs-per-token rule)."""
    total = 0
    for name, p in model.named_parameters():
        if trainable_only and not p.requires_grad:
            continue
        if not positions and "pos_emb" in name:
            continue
        total += p.numel()
    return total


__all__ = [
    "Bert", "BertConfig", "ENCODER_DECODERS", "EncoderDecoder", "EncoderDecoderBase", "EncoderDecoderConfig",
    "FAMILIES", "GPT", "GPTConfig", "HeadSpec", "ModelConfig", "PRESETS", "SequenceClassifier", "SpanExtractor",
    "T5", "T5Config", "TokenClassifier", "attach_head",
    "build", "config_from_dict", "count_params", "family_of", "preset",
]
