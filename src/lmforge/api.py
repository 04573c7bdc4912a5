"""The LM facade: a model, its tokenizer and its config, loaded and saved in either
lmforge's format or Hugging Face's.

    lm = lmforge.load("runs/quickstart/model")        # lmforge or HF directory
    lm.save("out/hf", format="hf")                    # loads in transformers
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from torch import nn

from lmforge.files import atomic_dir, atomic_write_json
from lmforge.interop.hf import read_hf_model, write_hf_model
from lmforge.models import HeadSpec, ModelConfig, attach_head, build, config_from_dict, family_of
from lmforge.models.weights import load_weights, save_weights
from lmforge.tokenizer import Tokenizer

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "vocab.txt")
SPECIAL_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


class LM:
    """A model with what it needs around it.

    model: the nn.Module (a GPT, Bert or EncoderDecoder, or a task head wrapping one);
    tokenizer: a Tokenizer, or None when the checkpoint had no tokenizer files;
    head: the HeadSpec of a task head, or None;
    special: bos/eos/pad token ids known from the checkpoint (used when there is no tokenizer).
    """

    def __init__(self, model: nn.Module, tokenizer: Tokenizer | None = None, head: HeadSpec | None = None,
                 special: dict[str, int | None] | None = None) -> None:
        self.model, self.tokenizer, self.head = model, tokenizer, head
        self.special = dict(special or {})

    @property
    def backbone(self) -> nn.Module:
        return self.model.backbone if self.head is not None else self.model

    @property
    def config(self) -> ModelConfig:
        return self.backbone.config

    @property
    def family(self) -> str:
        return family_of(self.config)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def special_ids(self) -> dict[str, int | None]:
        """bos/eos/pad ids: the tokenizer's when there is one, else the checkpoint's."""
        ids = dict(self.special)
        if self.tokenizer is not None:
            for key, value in (("bos_token_id", self.tokenizer.bos_id), ("eos_token_id", self.tokenizer.eos_id),
                               ("pad_token_id", self.tokenizer.pad_id)):
                if value is not None:
                    ids[key] = value
        return ids

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> LM:
        self.model.to(device=device, dtype=dtype)
        return self

    def save(self, path: str | os.PathLike, format: str = "lmforge") -> Path:
        """Write the model (and tokenizer) to a directory, atomically.

        format="lmforge": config.json + model.safetensors in lmforge's names;
        format="hf": config.json + model.safetensors that transformers' Auto classes load.
        """
        if format not in ("lmforge", "hf"):
            raise ValueError(f"format must be 'lmforge' or 'hf', got {format!r}")
        path = Path(path)
        with atomic_dir(path) as tmp:
            if format == "hf":
                write_hf_model(self.model, self.head, tmp, self.special_ids())
            else:
                atomic_write_json(tmp / "config.json", {
                    "format": "lmforge", "format_version": FORMAT_VERSION, "family": self.family,
                    "model": self.config.to_dict(), "head": self.head.to_dict() if self.head else None,
                    "special": self.special_ids()})
                save_weights(self.model, tmp / "model.safetensors")
            if self.tokenizer is not None:
                self.tokenizer.save(tmp)
        return path


def load(path: str | os.PathLike, device: str | torch.device | None = None,
         dtype: torch.dtype | str | None = None) -> LM:
    """Load an lmforge checkpoint directory or a Hugging Face model directory
    (model_type gpt2, llama, bert or bart) into an LM."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path}: not a model directory (no config.json)")
    try:
        cfg = json.loads(config_file.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{config_file}: not valid JSON ({e})") from None
    if cfg.get("format") == "lmforge":
        model, head, special = _load_lmforge(path, cfg)
    elif "model_type" in cfg:
        model, head, fresh, cfg = read_hf_model(path)
        if fresh:
            log.warning("%s: freshly initialised (not in the checkpoint): %s", path, ", ".join(fresh))
        special = {k: cfg.get(k) for k in SPECIAL_KEYS}
    else:
        raise ValueError(f"{config_file}: neither an lmforge config (format: lmforge) nor a Hugging Face one "
                         "(model_type)")
    tokenizer = Tokenizer.from_pretrained(path) if any((path / f).exists() for f in TOKENIZER_FILES) else None
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return LM(model.eval(), tokenizer, head, special).to(device, dtype)


def _load_lmforge(path: Path, cfg: dict) -> tuple[nn.Module, HeadSpec | None, dict]:
    version = cfg.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{path / 'config.json'}: format_version {version!r} unsupported (expected {FORMAT_VERSION})")
    try:
        config = config_from_dict(cfg["family"], cfg["model"])
        head = HeadSpec(**cfg["head"]) if cfg.get("head") else None
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path / 'config.json'}: invalid model config ({e})") from None
    model = attach_head(build(config), head)
    load_weights(model, path / "model.safetensors")
    return model, head, cfg.get("special") or {}


def convert(src: str | os.PathLike, dst: str | os.PathLike, to: str) -> Path:
    """Re-save a model directory in the other format: to="hf" or to="lmforge"."""
    return load(src).save(dst, format=to)
