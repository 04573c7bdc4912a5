"""A model directory on disk, in lmforge's format or Hugging Face's.

lmforge format: config.json {"format": "lmforge", "family", "model", "head", "special",
"untrained", "read_as" (the Hugging Face model_type it was read as, if any)}
plus model.safetensors in lmforge's tensor names. Hugging Face format: what
transformers' Auto classes load. Either may hold tokenizer files beside the weights.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge import hub
from lmforge.files import Ownership, atomic_write_json, marker_complete, owned_dir
from lmforge.interop.hf import MAX_SHARD_SIZE, load_dtype, read_as, read_hf_model, set_read_as, write_hf_model
from lmforge.models import ENCODER_DECODERS, HeadSpec, ModelConfig, attach_head, build, config_from_dict, family_of
from lmforge.models.arch import check_fits
from lmforge.models.provenance import set_untrained, untrained
from lmforge.models.weights import TensorFiles, init_only, load_weights, save_weights
from lmforge.tokenizer import Tokenizer

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "vocab.txt")
SPECIAL_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def is_model_dir(path: Path) -> bool:
    """A directory holding a model's config.json (lmforge's, Hugging Face's, or someone else's)."""
    return (path / "config.json").is_file()


# A model directory lmforge did not write (one transformers saved) may have its model files
# replaced; anything else there (a README, pytorch_model.bin) stays.
MODEL_DIR = Ownership(adopt=is_model_dir, what="model directory")


def special_ids(tokenizer: Tokenizer | None, known: dict[str, int | None] | None = None) -> dict[str, int | None]:
    """bos/eos/pad ids: the tokenizer's when there is one, else the ones already known."""
    ids = dict(known or {})
    if tokenizer is not None:
        for key, value in (("bos_token_id", tokenizer.bos_id), ("eos_token_id", tokenizer.eos_id),
                           ("pad_token_id", tokenizer.pad_id)):
            if value is not None:
                ids[key] = value
    return ids


@dataclass(eq=False)  # identity, as for the module it holds
class LoadedModel:
    """A model with what came with it in its directory: what `lmforge.load` gives (the LM
    facade adds generation and saving) and what a fine-tuning task starts from.

    model: the nn.Module (a GPT, Bert or EncoderDecoder, or a task head wrapping one);
    tokenizer: a Tokenizer, or None when the directory had no tokenizer files;
    head: the HeadSpec of a task head, or None;
    special: bos/eos/pad token ids known from the checkpoint (used when there is no tokenizer);
    path: where it was loaded from (None for a model built in memory);
    name: what the user named it (a directory, or a Hub id: then path is its cached snapshot);
    generation: the settings of its generation_config.json (GENERATION_KEYS; Hugging Face's
        names): several eos ids, default sampling. Written back on save.
    """

    model: nn.Module
    tokenizer: Tokenizer | None = None
    head: HeadSpec | None = None
    special: dict[str, int | None] = field(default_factory=dict)
    path: Path | None = None
    generation: dict[str, Any] = field(default_factory=dict)  # generation_config.json's settings
    name: str | None = None  # what it was loaded as: a directory, or a Hub id ("org/name[@revision]")

    @property
    def backbone(self) -> nn.Module:
        return self.model.backbone if self.head is not None else self.model

    @property
    def config(self) -> ModelConfig:
        return self.backbone.config

    @property
    def family(self) -> str:
        return family_of(self.config)

    def special_ids(self) -> dict[str, int | None]:
        """bos/eos/pad ids: the tokenizer's when there is one, else the checkpoint's."""
        return special_ids(self.tokenizer, self.special)

    @property
    def pad_id(self) -> int:
        """Padding id: the tokenizer's pad, else its eos (GPT-2 has no pad; the attention mask
        hides it), else the checkpoint's, else 0."""
        tok = self.tokenizer
        for i in (tok.pad_id if tok else None, tok.eos_id if tok else None, self.special.get("pad_token_id")):
            if i is not None:
                return int(i)
        return 0


def local_dir(path: str | os.PathLike) -> Path:
    """The directory itself, or the cached snapshot of a Hub id (lmforge.hub.resolve) when no
    such directory exists."""
    path = Path(path)
    return hub.resolve(path) if not path.exists() and hub.is_hub_id(str(path)) else path


def load_model(path: str | os.PathLike, dtype: torch.dtype | str | None = None) -> LoadedModel:
    """`load_model_dir` (a directory or a Hub id), as a LoadedModel."""
    local = local_dir(path)
    model, head, tokenizer, special = load_model_dir(local, dtype)
    generation = read_generation_config(local)
    eos = generation.get("eos_token_id", special.get("eos_token_id"))
    if tokenizer is not None and isinstance(eos, list):  # e.g. end of text and end of turn
        tokenizer.end_ids = [int(i) for i in eos]
    return LoadedModel(model, tokenizer, head, dict(special), local, generation, name=str(path))


GENERATION_FILE = "generation_config.json"
# The settings of generation_config.json lmforge reads, keeps and writes back.
GENERATION_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id", "forced_bos_token_id",
                   "forced_eos_token_id", "do_sample", "temperature", "top_k", "top_p", "repetition_penalty",
                   "no_repeat_ngram_size", "max_new_tokens")


def read_generation_config(directory: Path) -> dict[str, Any]:
    """generation_config.json's settings (GENERATION_KEYS), {} when there is none."""
    file = directory / GENERATION_FILE
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file}: not a JSON object")
    eos = data.get("eos_token_id")
    if not (eos is None or isinstance(eos, int) or (isinstance(eos, list) and all(isinstance(i, int) for i in eos))):
        raise ValueError(f"{file}: eos_token_id must be an id or a list of ids, got {eos!r}")
    return {k: data[k] for k in GENERATION_KEYS if k in data}


def generation_file(model: nn.Module, tokenizer: Tokenizer | None, special: dict[str, int | None],
                    generation: dict[str, Any] | None) -> dict[str, Any] | None:
    """What generation_config.json says for a model that generates (None for an encoder):
    the settings it came with, its special ids, every end id of its tokenizer."""
    config = getattr(model, "backbone", model).config
    if family_of(config) == "bert":
        return None
    out = {**(generation or {}), **{k: v for k, v in special.items() if v is not None}}
    if tokenizer is not None and len(tokenizer.eos_ids) > 1:
        out["eos_token_id"] = tokenizer.eos_ids
    if family_of(config) in ENCODER_DECODERS:
        out.setdefault("decoder_start_token_id", config.decoder_start_token_id)
    return out


def save_model_dir(path: str | os.PathLike, model: nn.Module, *, head: HeadSpec | None = None,
                   tokenizer: Tokenizer | None = None, format: str = "lmforge",
                   special: dict[str, int | None] | None = None, overwrite: bool = False,
                   max_shard_size: int | str = MAX_SHARD_SIZE, generation: dict[str, Any] | None = None) -> Path:
    """Write a model directory (a crash leaves any previous one intact). Replacing a model
    directory replaces its model files and nothing else; a non-empty directory that is not a
    model directory is refused (OwnershipError) unless overwrite (see lmforge.files).
    format="hf" shards weights above max_shard_size ("5GB", "500MB") as transformers does.
    A model that generates gets generation_config.json (its `generation` settings, special
    ids and every end id of the tokenizer), which transformers' generate reads."""
    if format not in ("lmforge", "hf"):
        raise ValueError(f"format must be 'lmforge' or 'hf', got {format!r}")
    path = Path(path)
    backbone = model.backbone if head is not None else model
    special = special_ids(tokenizer, special)
    missing = untrained(backbone)
    with owned_dir(path, MODEL_DIR, overwrite=overwrite) as tmp:
        if format == "hf":
            arch = write_hf_model(model, head, tmp, special, max_shard_size)
            if head is None and missing:
                log.info("%s: written as %s, without the tensors never loaded nor trained: %s", path, arch,
                         ", ".join(sorted(missing)))
        else:
            atomic_write_json(tmp / "config.json", {
                "format": "lmforge", "format_version": FORMAT_VERSION, "family": family_of(backbone.config),
                "model": backbone.config.to_dict(), "head": head.to_dict() if head else None, "special": special,
                "untrained": sorted(missing), **({"read_as": read_as(backbone)} if read_as(backbone) else {})})
            save_weights(model, tmp / "model.safetensors")
        gen = generation_file(model if head is None else backbone, tokenizer, special, generation)
        if gen is not None:
            atomic_write_json(tmp / GENERATION_FILE, gen)
        if tokenizer is not None:
            tokenizer.save(tmp)
    return path


def load_model_dir(path: str | os.PathLike, dtype: torch.dtype | str | None = None
                   ) -> tuple[nn.Module, HeadSpec | None, Tokenizer | None, dict]:
    """Read an lmforge or Hugging Face model directory -> (model, head, tokenizer or None,
    special ids). Hugging Face tensors missing from the checkpoint (e.g. the heads of a
    plain BertModel) are logged as freshly initialised. `path` may be a Hugging Face Hub id
    ("gpt2", "Qwen/Qwen2.5-0.5B@main": lmforge.hub). dtype: None (float32), float32,
    bfloat16, float16, or "auto" (the checkpoint's own); the weights are read into a model
    of that dtype one tensor at a time (no second copy of the model is ever held)."""
    path = local_dir(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path}: not a model directory (no config.json)")
    if not marker_complete(path):
        raise ValueError(f"{path}: lmforge was stopped while writing this model directory; write it again")
    try:
        cfg = json.loads(config_file.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{config_file}: not valid JSON ({e})") from None
    if cfg.get("format") == "lmforge":
        model, head, special = _load_lmforge(path, cfg, dtype)
    elif "model_type" in cfg:
        model, head, fresh, cfg = read_hf_model(path, dtype)
        if fresh:
            log.warning("%s: freshly initialised (not in the checkpoint): %s", path, ", ".join(fresh))
        special = {k: cfg.get(k) for k in SPECIAL_KEYS}
    else:
        raise ValueError(f"{config_file}: neither an lmforge config (format: lmforge) nor a Hugging Face one "
                         "(model_type)")
    tokenizer = Tokenizer.from_pretrained(path) if any((path / f).exists() for f in TOKENIZER_FILES) else None
    if tokenizer is not None:
        check_vocab(tokenizer, model.backbone if head is not None else model, path)
    return model, head, tokenizer, special


def check_vocab(tokenizer: Tokenizer, backbone: nn.Module, where: Path) -> None:
    """A tokenizer may have fewer ids than the model has embedding rows (checkpoints pad the
    table to a round size), never more: an id past the table would index nothing. `where`:
    the tokenizer's directory (or file), named in the error."""
    rows = getattr(backbone.config, "vocab_size", None)
    if rows is not None and tokenizer.vocab_size > rows:
        files = where.name if where.is_file() else ", ".join(f for f in TOKENIZER_FILES if (where / f).exists())
        raise ValueError(f"{where}: the tokenizer ({files}) has {tokenizer.vocab_size} ids but the model's vocabulary "
                         f"has {rows} rows (config.json vocab_size): they come from different models")


def _load_lmforge(path: Path, cfg: dict, dtype: torch.dtype | str | None) -> tuple[nn.Module, HeadSpec | None, dict]:
    version = cfg.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{path / 'config.json'}: format_version {version!r} unsupported (expected {FORMAT_VERSION})")
    try:
        config = config_from_dict(cfg["family"], cfg["model"])
        head = HeadSpec(**cfg["head"]) if cfg.get("head") else None
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path / 'config.json'}: invalid model config ({e})") from None
    check_fits(config, where=f"{path / 'config.json'}: ")
    with init_only():  # every value comes from the file
        model = attach_head(build(config), head)
    dtype = load_dtype(dtype, {}, TensorFiles.of(path / "model.safetensors"))
    if dtype is not None:
        model.to(dtype)
    load_weights(model, path / "model.safetensors")
    backbone = model.backbone if head is not None else model
    set_untrained(backbone, cfg.get("untrained") or ())
    set_read_as(backbone, cfg.get("read_as"))
    return model, head, cfg.get("special") or {}
