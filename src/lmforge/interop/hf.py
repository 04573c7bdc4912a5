"""Hugging Face checkpoints in and out: config maps and state-dict maps.

Each supported model_type is a `Family` (lmforge.interop.families: gpt2, the Llama
variants, bert, roberta, xlm-roberta, distilbert, bart, t5): a config translation both
ways and a list of `Rule`s pairing an lmforge tensor with the Hugging Face tensor(s) it is
made of; this module runs them.
Hugging Face's names appear only here and in the families. Conversion is strict:
every tensor of the checkpoint must be used and every tensor of the model filled
(except heads that a checkpoint may lack, which are reported as freshly
initialised); a shape mismatch names the tensor and the file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save
from torch import Tensor, nn

from lmforge.files import atomic_write_bytes, atomic_write_json
from lmforge.interop.convert import ConversionError, Rule, gather, present, scatter
from lmforge.interop.families import FAMILIES, family
from lmforge.interop.families.base import linear
from lmforge.models import GPTConfig, HeadSpec, ModelConfig, attach_head, build
from lmforge.models.arch import check_fits
from lmforge.models.provenance import set_untrained, untrained
from lmforge.models.weights import (
    TensorFiles,
    checkpoint_dtype,
    init_only,
    initialise,
    parse_size,
    shard,
    unique_state_dict,
)

# Buffers some checkpoints carry that hold no learned state (causal masks, cached
# position ids, RoPE frequencies): skipped on load.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "embeddings.position_ids", "rotary_emb.inv_freq",
                    # and a parameter early T5 checkpoints carry that no T5 uses (cross-attention has no bias)
                    "EncDecAttention.relative_attention_bias.weight")

SUPPORTED = tuple(FAMILIES)
# (model_type, head kind) -> the transformers class that holds that model; the head's last
# linear layer in each class; the backbone prefixes each model_type's checkpoints use.
ARCHITECTURES = {(f.model_type, kind): arch for f in FAMILIES.values() for kind, arch in f.classes.items()}
HEAD_TENSOR = {arch: name for f in FAMILIES.values() for arch, name in f.head_tensors.items()}
HIDDEN_TENSOR = {arch: name for f in FAMILIES.values() for arch, name in f.hidden_tensors.items()}
PREFIXES = {f.model_type: f.prefixes for f in FAMILIES.values()}
# Every class read: the full ones, the backbone-only ones and a family's extra ones (as backbone + heads).
HEAD_OF_ARCH = {arch: head for (_, head), arch in ARCHITECTURES.items()}
HEAD_OF_ARCH.update({arch: None for f in FAMILIES.values() for arch in (f.base_class, *f.also_reads)})


# ----------------------------------------------------------------------------- configs


def config_from_hf(cfg: dict) -> ModelConfig:
    """A Hugging Face config.json (as a dict) -> the lmforge architecture config."""
    f = family(cfg.get("model_type"))
    try:
        return f.read_config(cfg)
    except KeyError as e:
        raise ConversionError(f"{f.model_type} config: the field {e.args[0]!r} is missing") from None


def model_type_of(config: ModelConfig, read_as: str | None = None) -> str:
    """Which Hugging Face model_type an lmforge config exports to: `read_as` (the type the
    model was read as, `read_as(backbone)`) when that family takes it, else the first family
    that does (roberta and xlm-roberta share an architecture)."""
    if read_as in FAMILIES and FAMILIES[read_as].matches(config):
        return read_as
    for f in FAMILIES.values():
        if f.matches(config):
            return f.model_type
    if isinstance(config, GPTConfig):
        switch = lmforge_only_switch(config)
        if switch:
            raise ConversionError(f"{switch}: transformers has no model type with it; keep the lmforge format "
                                  "(lmforge.load reads it)")
        raise ConversionError("this GPT mixes features of different model types (GPT-2's and Llama's); "
                              "transformers has no matching class")
    raise ConversionError("this encoder-decoder (e.g. the original Transformer) has no transformers equivalent")


def lmforge_only_switch(c: GPTConfig) -> str | None:
    """The first of a GPT's training-idea switches that no transformers model type of its layout
    has, named as its config field, or None. ReLU^2 (act=relu2) is GPT-2's activation_function
    "relu2", an untied head and zero_init_proj (an initialisation) export as they are, and QK-norm
    is Qwen3's on Llama's layout."""
    if c.logit_softcap is not None:
        return f"logit_softcap={c.logit_softcap} (only Gemma 2, another layout, soft-caps its logits)"
    if c.value_embeds:
        return f"value_embeds={c.value_embeds} (value embeddings)"
    if c.qk_norm and not (c.positions == "rope" and c.norm == "rmsnorm" and c.mlp == "swiglu"):
        return "qk_norm=true on a GPT-2-style layout (only Qwen3 normalises queries and keys: RoPE, RMSNorm, SwiGLU)"
    return None


def config_to_hf(config: ModelConfig, special: dict[str, int | None] | None = None,
                 read_as: str | None = None) -> dict:
    """The lmforge config -> a Hugging Face config.json dict (without `architectures`)."""
    special = {k: v for k, v in (special or {}).items() if v is not None}
    kind = model_type_of(config, read_as)
    d = family(kind).write_config(config)
    if d.get("is_encoder_decoder"):
        special.setdefault("forced_eos_token_id", special.get("eos_token_id"))
    pad = special.get("pad_token_id")
    if getattr(config, "positions", None) == "learned_skip_pad" and pad is not None and pad != config.pad_token_id:
        raise ConversionError(f"the tokenizer's pad id {pad} is not the model's pad_token_id {config.pad_token_id}, "
                              f"from which {kind} numbers positions")
    d.update({k: v for k, v in special.items() if v is not None})
    d["model_type"] = kind
    return d


_READ_AS = "lmforge_read_as"


def read_as(backbone: nn.Module) -> str | None:
    """The Hugging Face model_type a model was read as (None for one built by lmforge), so
    that it is written back as that type (xlm-roberta stays xlm-roberta, not roberta)."""
    return getattr(backbone, _READ_AS, None)


def set_read_as(backbone: nn.Module, model_type: str | None) -> None:
    object.__setattr__(backbone, _READ_AS, model_type)


def model_type_of_model(backbone: nn.Module) -> str:
    """`model_type_of` a backbone, preferring the type it was read as."""
    return model_type_of(backbone.config, read_as(backbone))


# ----------------------------------------------------------------------------- tensor maps and classes


def backbone_rules(config: ModelConfig, prefix: str) -> list[Rule]:
    """Rules for the backbone (and its LM/pretraining heads) of a `model_type_of(config)` model."""
    return family(model_type_of(config)).rules(config, prefix)


def head_from_hf(cfg: dict) -> HeadSpec | None:
    arch = (cfg.get("architectures") or [None])[0]
    if arch is not None and arch not in HEAD_OF_ARCH:
        raise ConversionError(f"unsupported architecture {arch!r}; supported: {', '.join(sorted(HEAD_OF_ARCH))}")
    kind = HEAD_OF_ARCH.get(arch)
    if kind is None:
        return None
    id2label = cfg.get("id2label") or {str(i): f"LABEL_{i}" for i in range(cfg.get("num_labels", 2))}
    labels = [id2label[k] for k in sorted(id2label, key=int)]
    f = family(cfg["model_type"])
    hidden = f.hidden if kind == "sequence-classification" else None
    return HeadSpec(kind, labels if kind != "span" else [], f.pooling,
                    cfg.get("problem_type") == "multi_label_classification", bias=HEAD_TENSOR[arch] != "score",
                    hidden=hidden)


def classifier_layout(kind: str) -> tuple[str, str | None] | None:
    """(pooling, hidden layer) of model_type `kind`'s transformers sequence classifier, or
    None when transformers has none for it."""
    f = family(kind)
    return (f.pooling, f.hidden) if "sequence-classification" in f.classes else None


def head_exportable(kind: str, head: HeadSpec | None) -> bool:
    """Does transformers' class for this head compute what it does? A sequence classifier
    must pool as the class pools, with its hidden layer and its bias (GPT-2's `score` has none)."""
    if head is None or head.kind != "sequence-classification":
        return True
    arch = ARCHITECTURES.get((kind, head.kind))
    return (arch is not None and (head.pooling, head.hidden) == classifier_layout(kind)
            and head.bias == (HEAD_TENSOR[arch] != "score"))


def _rules(config: ModelConfig, head: HeadSpec | None, arch: str, prefix: str, kind: str | None = None,
           loading: bool = False) -> list[Rule]:
    """Every rule of one architecture, with the lmforge names as seen from the (wrapped) model
    (loading: with the tensors its checkpoints may carry beyond the class, `Family.also_loads`)."""
    f = family(kind or model_type_of(config))
    rules = f.rules(config, prefix)
    if arch == f.base_class:  # a backbone-only class has no LM head of its own
        rules = [Rule(r.ours, r.theirs, r.transpose, r.vocab, optional=True) if r.ours == "lm_head.weight" else r
                 for r in rules]
    if f.class_rules is not None:
        rules = f.class_rules(rules, config, head, arch)
    if loading and f.also_loads is not None:
        rules = rules + f.also_loads(config, prefix, arch)
    if head is None:
        return rules
    rules = [Rule(f"backbone.{r.ours}", r.theirs, r.transpose, r.vocab, r.split, r.optional) for r in rules]
    if head.hidden is not None:
        rules += linear("hidden.dense", (HIDDEN_TENSOR[arch],), True)
    return rules + linear("head", (HEAD_TENSOR[arch],), head.bias)


def export_architecture(kind: str, head: HeadSpec | None, missing: frozenset[str] = frozenset()) -> str:
    """The transformers class to export as: the task head's, else the full pretraining class
    unless its heads were never loaded nor trained (`missing`, lmforge.models.provenance):
    then the class without them (BertModel, BertForMaskedLM, GPT2Model, LlamaModel)."""
    f = family(kind)
    chosen = f.export_class(head, missing) if f.export_class is not None else None
    if chosen is not None:
        return chosen
    return f.classes[head.kind if head is not None else None]


def export_prefix(kind: str, arch: str) -> str:
    """The prefix of the backbone's tensors in class `arch` ("" for the backbone-only classes)."""
    f = family(kind)
    return "" if arch == f.base_class else f.prefixes[0]


def _tied_duplicates(kind: str, prefix: str) -> set[str]:
    """Checkpoint tensors that are copies of tied ones and carry nothing new."""
    return {name.replace("{p}", prefix) for name in family(kind).tied_copies}


def _fixed(kind: str, config: ModelConfig, prefix: str) -> dict[str, Tensor]:
    f = family(kind)
    return f.fixed(config, prefix) if f.fixed is not None else {}


def _check_fixed(fixed: dict[str, Tensor], tensors: Mapping[str, Tensor], source: str) -> None:
    """A tensor lmforge computes must hold what it computes (DistilBERT's sinusoidal table;
    within float32 rounding of another way of computing it)."""
    for name, value in fixed.items():
        if name not in tensors:
            continue
        theirs = tensors[name]
        if tuple(theirs.shape) != tuple(value.shape):
            raise ConversionError(f"{source}: tensor {name} has shape {tuple(theirs.shape)}, lmforge computes "
                                  f"{tuple(value.shape)}")
        diff = (theirs.float() - value).abs().max().item()
        if diff > 1e-3:
            raise ConversionError(f"{source}: tensor {name} differs from the fixed table lmforge computes by "
                                  f"{diff:.3g} (trained since?); with sinusoidal_pos_embds false in config.json "
                                  "it reads as learned positions")


def from_hf(cfg: dict, tensors: Mapping[str, Tensor], source: str = "checkpoint",
            dtype: torch.dtype | None = None) -> tuple[nn.Module, HeadSpec | None, list[str]]:
    """Hugging Face config dict + state dict (or a lazy TensorFiles) -> (lmforge model, its
    head spec, freshly initialised tensor names), in `dtype` (default float32). Strict:
    unknown or missing tensors raise ConversionError. The model is built without random
    values where the checkpoint fills it and each tensor is copied in as it is read, so
    loading holds the model plus one tensor, not two models."""
    config = config_from_hf(cfg)
    head = head_from_hf(cfg)
    kind = cfg["model_type"]
    f = family(kind)
    arch = (cfg.get("architectures") or [f.classes[None]])[0]
    prefix = next((p for p in f.prefixes if f"{p}{f.probe}" in tensors), None)
    if prefix is None:
        raise ConversionError(f"{source}: no {f.probe} tensor found: not a {kind} checkpoint?")
    if f.from_tensors is not None:
        config = f.from_tensors(config, tensors)
    rules, _ = present(_rules(config, head, arch, prefix, kind, loading=True), tensors, source)
    used = {name for r in rules for name in r.theirs}
    fixed = _fixed(kind, config, prefix)
    _check_fixed(fixed, tensors, source)
    ignored = _tied_duplicates(kind, prefix) | set(fixed)
    unexpected = sorted(n for n in tensors if n not in used and n not in ignored and not n.endswith(IGNORED_SUFFIXES))
    if unexpected:
        shown = ", ".join(unexpected[:8]) + (" ..." if len(unexpected) > 8 else "")
        raise ConversionError(f"{source}: {len(unexpected)} unexpected tensor(s) for {arch}: {shown}")
    with init_only():
        model = attach_head(build(config), head)
    if dtype is not None:
        model.to(dtype)
    # Untrained: every tensor the checkpoint does not fill (optional heads, and those the class
    # lacks, e.g. the pooler of a BertForMaskedLM), tied copies aside; they get the model's own init.
    fresh = sorted(set(unique_state_dict(model)) - {r.ours for r in rules})
    initialise(model, fresh)
    target = model.state_dict()
    if "final_logits_bias" in tensors:
        tensors = _Reshaped(tensors, "final_logits_bias", (-1,))
    with torch.no_grad():
        for name, value in gather(rules, tensors, target, source, config.vocab_size):
            target[name].copy_(value)
    backbone = model.backbone if head is not None else model
    set_untrained(backbone, (n.removeprefix("backbone.") for n in fresh))
    set_read_as(backbone, kind)
    return model, head, fresh


class _Reshaped(Mapping[str, Tensor]):
    """A checkpoint mapping with one tensor reshaped on reading (BART's (1, V) logits bias)."""

    def __init__(self, tensors: Mapping[str, Tensor], name: str, shape: tuple[int, ...]) -> None:
        self.tensors, self.name, self.shape = tensors, name, shape

    def __getitem__(self, key: str) -> Tensor:
        value = self.tensors[key]
        return value.reshape(self.shape) if key == self.name else value

    def __iter__(self):
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)


def to_hf(model: nn.Module, head: HeadSpec | None = None,
          special: dict[str, int | None] | None = None) -> tuple[dict, dict[str, Tensor]]:
    """lmforge model (optionally wrapped in a head) -> (config.json dict, state dict) in
    transformers' names for the matching class."""
    backbone = model.backbone if head is not None else model
    config = backbone.config
    kind = model_type_of_model(backbone)
    if (kind, head.kind if head else None) not in ARCHITECTURES:
        raise ConversionError(f"transformers has no {kind} class for a {head.kind} head")
    if not head_exportable(kind, head):
        pooling, hidden = classifier_layout(kind)
        raise ConversionError(f"transformers' {kind} sequence classifier pools with {pooling!r}"
                              f"{f' through a {hidden} hidden layer' if hidden else ''}; this head pools with "
                              f"{head.pooling!r}{f' through a {head.hidden} hidden layer' if head.hidden else ''}"
                              f"{'' if head.bias else ', without a bias'}")
    missing = untrained(backbone) | absent_tensors(backbone, kind)
    arch = export_architecture(kind, head, missing)
    cfg = config_to_hf(config, special, kind)
    cfg["architectures"] = [arch]
    if head is not None and head.labels:
        cfg["id2label"] = {str(i): label for i, label in enumerate(head.labels)}
        cfg["label2id"] = {label: i for i, label in enumerate(head.labels)}
        cfg["num_labels"] = len(head.labels)
        if head.multi_label:
            cfg["problem_type"] = "multi_label_classification"
    state = {k: v.detach() for k, v in model.state_dict().items()}
    rules = _rules(config, head, arch, export_prefix(kind, arch), kind)
    # Export writes every tensor the class has, except pretraining heads that hold no learned
    # values (BART's logits bias of a BartModel checkpoint): transformers then says they are new.
    prefix = "backbone." if head is not None else ""
    rules = [Rule(r.ours, r.theirs, r.transpose, r.vocab, r.split) for r in rules
             if not (head is None and r.ours.removeprefix(prefix) in missing)]
    tensors = scatter(rules, state, config.vocab_size)
    tensors.update(_fixed(kind, config, export_prefix(kind, arch)))
    if "final_logits_bias" in tensors:
        tensors["final_logits_bias"] = tensors["final_logits_bias"][None]  # (1, V) in transformers
    return cfg, tensors


def absent_tensors(backbone: nn.Module, kind: str) -> frozenset[str]:
    """Tensors of the family's full class that this model does not have (a BERT built
    without an NSP head): for choosing the class to write, as good as untrained."""
    f = family(kind)
    state = backbone.state_dict()
    return frozenset(r.ours for r in _rules(backbone.config, None, f.classes[None], f.prefixes[0], kind)
                     if r.ours not in state)


def from_transformers(hf_model: nn.Module) -> nn.Module:
    """A live transformers model -> the equivalent lmforge model (used by parity tests)."""
    cfg = hf_model.config.to_dict()
    cfg.setdefault("architectures", [type(hf_model).__name__])
    cfg["architectures"] = [type(hf_model).__name__]
    model, _, _ = from_hf(cfg, dict(hf_model.state_dict()), source=type(hf_model).__name__)
    return model


# ----------------------------------------------------------------------------- files

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def read_hf_weights(directory: str | os.PathLike) -> tuple[Mapping[str, Tensor], str]:
    """The tensors of a Hugging Face model directory, by name: safetensors (one file, or the
    shards `model.safetensors.index.json` names) read lazily, one tensor at a time, as
    TensorFiles; .bin files only through torch.load(weights_only=True), so no pickled code
    runs. Returns (tensors, the file name for messages). A missing shard, or an index naming
    a tensor its shard does not hold, raises an error naming both."""
    directory = Path(directory)
    for name in WEIGHT_FILES:
        path = directory / name
        if not path.exists():
            continue
        if not name.endswith(".index.json"):
            return (TensorFiles.of(path) if path.suffix == ".safetensors" else _read_bin(path)), str(path)
        weight_map = _weight_map(path)
        if name.startswith("model.safetensors"):
            return _indexed_safetensors(path, weight_map), str(path)
        parts = {shard_name: _read_bin(_shard_path(path, shard_name)) for shard_name in set(weight_map.values())}
        _check_index(path, weight_map, parts)
        return {name: parts[shard_name][name] for name, shard_name in weight_map.items()}, str(path)
    raise FileNotFoundError(f"{directory}: no weights found (looked for {', '.join(WEIGHT_FILES)})")


def _weight_map(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as e:
        raise ConversionError(f"{index}: not a valid weight index ({e})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ConversionError(f"{index}: weight_map is not a mapping of tensor names to shard files")
    return weight_map


def _shard_path(index: Path, shard_name: str) -> Path:
    path = index.parent / shard_name
    if Path(shard_name).is_absolute() or ".." in Path(shard_name).parts:
        raise ConversionError(f"{index}: shard {shard_name!r} is not a file name beside the index")
    if not path.is_file():
        raise FileNotFoundError(f"{index}: shard {shard_name} is missing")
    return path


def _indexed_safetensors(index: Path, weight_map: dict[str, str]) -> TensorFiles:
    parts = {shard_name: TensorFiles.of(_shard_path(index, shard_name)) for shard_name in set(weight_map.values())}
    _check_index(index, weight_map, parts)
    return TensorFiles({name: index.parent / shard_name for name, shard_name in weight_map.items()})


def _check_index(index: Path, weight_map: dict[str, str], parts: dict[str, Mapping[str, Tensor]]) -> None:
    """Every tensor the index names is in the shard it names (parts: shard name -> its tensors)."""
    for name, shard_name in weight_map.items():
        if name not in parts[shard_name]:
            raise ConversionError(f"{index}: names tensor {name} in {shard_name}, which does not hold it")


def _read_bin(path: Path) -> dict[str, Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a bad file
        raise ConversionError(f"{path}: cannot be read as a weights-only PyTorch file ({e})") from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ConversionError(f"{path}: does not hold a flat dict of tensors")
    return state


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_dtype(dtype: torch.dtype | str | None, cfg: dict, tensors: Mapping[str, Tensor]) -> torch.dtype | None:
    """The dtype to load in: None (float32, lmforge's default), a dtype or its name, or "auto":
    the checkpoint's own (config.json's dtype / torch_dtype, else what its tensors hold)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        named = cfg.get("dtype") or cfg.get("torch_dtype")
        return DTYPES.get(named) if named in DTYPES else checkpoint_dtype(tensors)
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected auto, {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def read_hf_model(directory: str | os.PathLike, dtype: torch.dtype | str | None = None
                  ) -> tuple[nn.Module, HeadSpec | None, list[str], dict]:
    """Load a Hugging Face model directory -> (model, head, freshly initialised tensor names,
    the config dict); dtype as `load_dtype`."""
    directory = Path(directory)
    cfg = json.loads((directory / "config.json").read_text())
    # An unsupported model says so, and one too big for memory too, before its weights are read.
    check_fits(config_from_hf(cfg), where=f"{directory / 'config.json'}: ")
    tensors, source = read_hf_weights(directory)
    model, head, fresh = from_hf(cfg, tensors, source, load_dtype(dtype, cfg, tensors))
    return model, head, fresh, cfg


MAX_SHARD_SIZE = "5GB"


def write_hf_model(model: nn.Module, head: HeadSpec | None, directory: str | os.PathLike,
                   special: dict[str, int | None] | None = None, max_shard_size: int | str = MAX_SHARD_SIZE) -> str:
    """Write config.json and the weights that transformers' Auto classes load: one
    model.safetensors, or above max_shard_size (transformers' spelling: "5GB", "500MB")
    shards model-00001-of-0000N.safetensors with model.safetensors.index.json. Returns the
    architecture written."""
    directory = Path(directory)
    cfg, tensors = to_hf(model, head, special)
    cfg["torch_dtype"] = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    atomic_write_json(directory / "config.json", cfg)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    shards = shard(tensors, parse_size(max_shard_size))
    if len(shards) == 1:
        atomic_write_bytes(directory / "model.safetensors", save(tensors, metadata={"format": "pt"}))
        return cfg["architectures"][0]
    weight_map = {}
    for i, part in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        atomic_write_bytes(directory / name, save(part, metadata={"format": "pt"}))
        weight_map.update(dict.fromkeys(part, name))
    total = sum(v.numel() * v.element_size() for v in tensors.values())
    atomic_write_json(directory / "model.safetensors.index.json",
                      {"metadata": {"total_size": total}, "weight_map": weight_map})
    return cfg["architectures"][0]
