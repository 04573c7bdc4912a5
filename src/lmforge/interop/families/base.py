"""What a Hugging Face model type is to lmforge (`Family`), and the helpers its rules use.

A family says, for one transformers model_type: how its config.json maps to an lmforge
config and back, which lmforge configs it exports, which tensor of the checkpoint each
lmforge tensor is made of (`Rule`s), and which transformers classes hold it (with or
without a task head). lmforge.interop.hf runs them; these modules are the only place,
with hf.py, where Hugging Face's names appear.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from torch import Tensor

from lmforge.interop.convert import ConversionError, Rule
from lmforge.models import HeadSpec, ModelConfig

HF_ACT = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu",
          "silu": "silu", "swish": "silu", "relu2": "relu2"}
LM_ACT = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu", "silu": "silu", "relu2": "relu2"}


@dataclass(frozen=True)
class Family:
    """One transformers model_type.

    read_config / write_config: config.json (a dict) <-> the lmforge config;
    matches: does this lmforge config export as this model_type (the first family that
        matches wins, so the specific ones come before the general);
    rules: (config, prefix) -> the backbone's rules (and its LM / pretraining heads);
    classes: head kind (None: the language-model / pretraining class) -> transformers class;
    base_class: the backbone-only class; head_tensors: class -> its head's last linear layer;
    prefixes: backbone prefixes, tried in order against a checkpoint's names; probe: a tensor
        every checkpoint of the type has (after the prefix); pooling: how transformers'
        sequence classifier pools; tied_copies: checkpoint names (with {p} for the prefix)
        that repeat a tied tensor; class_rules: per-class adjustments of the rules
        (rules, config, head, class) -> rules; export_class: (head, untrained tensor names)
        -> the class to write, when a family has more than the plain choice; also_reads:
        further classes read as backbone + pretraining heads; from_tensors: (config, the
        checkpoint's tensors) -> the config, for what only the tensors tell (T5: a tied head);
    hidden: the hidden layer of transformers' sequence classifier (lmforge.models.heads.
        HIDDEN_LAYERS: RoBERTa's tanh, DistilBERT's relu), hidden_tensors: class -> its name;
    also_loads: (config, prefix, class) -> rules for tensors the class's checkpoints may carry
        beyond the class itself (the pooler RoBERTa's masked-LM checkpoints keep): read when
        present, never written;
    fixed: (config, prefix) -> tensors checkpoints carry that lmforge computes instead of
        storing (DistilBERT's sinusoidal position table): checked on load, written on export.
    """

    model_type: str
    read_config: Callable[[dict], ModelConfig]
    write_config: Callable[[ModelConfig], dict]
    matches: Callable[[ModelConfig], bool]
    rules: Callable[[ModelConfig, str], list[Rule]]
    classes: dict[str | None, str]
    base_class: str
    head_tensors: dict[str, str]
    prefixes: tuple[str, ...]
    probe: str
    pooling: str = "pooler"
    tied_copies: tuple[str, ...] = ()
    class_rules: Callable[[list[Rule], ModelConfig, HeadSpec | None, str], list[Rule]] | None = None
    export_class: Callable[[HeadSpec | None, frozenset[str]], str | None] | None = None
    also_reads: tuple[str, ...] = field(default=())
    from_tensors: Callable[[ModelConfig, Mapping[str, Tensor]], ModelConfig] | None = None
    hidden: str | None = None
    hidden_tensors: dict[str, str] = field(default_factory=dict)
    also_loads: Callable[[ModelConfig, str, str], list[Rule]] | None = None
    fixed: Callable[[ModelConfig, str], dict[str, Tensor]] | None = None


def hf_arg(cfg: dict, *names: str, default=None):
    """The first of config keys `names` that is set (not None), else `default`."""
    for name in names:
        if cfg.get(name) is not None:
            return cfg[name]
    return default


def act(name: str) -> str:
    """transformers' activation name -> lmforge's."""
    if name not in HF_ACT:
        raise ConversionError(f"unsupported activation {name!r}")
    return HF_ACT[name]


def linear(ours: str, theirs: tuple[str, ...], bias: bool, split: tuple[int, ...] | None = None) -> list[Rule]:
    """A linear layer's weight (and bias) from one or more transformers linears stacked on rows."""
    rules = [Rule(f"{ours}.weight", tuple(f"{t}.weight" for t in theirs), split=split)]
    return rules + [Rule(f"{ours}.bias", tuple(f"{t}.bias" for t in theirs), split=split)] if bias else rules


def without_lm_head(base_class: str) -> Callable[[HeadSpec | None, frozenset[str]], str | None]:
    """A decoder's export_class: the backbone-only class when the (untied) LM head was never
    loaded nor trained."""
    return lambda head, missing: base_class if head is None and "lm_head.weight" in missing else None


def without_mlm_head(base_class: str) -> Callable[[HeadSpec | None, frozenset[str]], str | None]:
    """An encoder's export_class: the backbone-only class when the MLM head was never loaded nor trained."""
    return lambda head, missing: base_class if head is None and "lm_head.dense.weight" in missing else None


def optional(rules: list[Rule]) -> list[Rule]:
    """The same rules, each for a tensor a checkpoint may lack."""
    return [Rule(r.ours, r.theirs, r.transpose, r.vocab, r.split, optional=True) for r in rules]


def layer_norm(ours: str, theirs: str) -> list[Rule]:
    return [Rule(f"{ours}.weight", (f"{theirs}.weight",)), Rule(f"{ours}.bias", (f"{theirs}.bias",))]
