"""What the planner is asked about: a preset name, a model directory or a config.json, or a
config object, resolved to an architecture and its description (lmforge.models.arch)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from lmforge import hub
from lmforge.interop.hf import config_from_hf
from lmforge.models import PRESETS, ModelConfig, config_from_dict, family_of, preset
from lmforge.models.arch import Arch, arch_of


def resolve_config(model: str | os.PathLike | ModelConfig) -> ModelConfig:
    """A preset name, a model directory or its config.json (lmforge or Hugging Face
    format; weights are not read), or a config object -> the architecture config.
    Raises ValueError / FileNotFoundError naming the preset or the file."""
    if not isinstance(model, (str, os.PathLike)):
        family_of(model)  # TypeError for anything that is not a model config
        return model
    if str(model) in PRESETS:
        return preset(str(model))
    path = Path(model)
    if not path.exists():
        if not (isinstance(model, str) and hub.is_hub_id(model)):
            raise FileNotFoundError(f"{path}: no such model directory or config file")
        try:
            path = hub.resolve(model, files=hub.CONFIG_FILES)
        except hub.HubError as e:
            raise ValueError(f"unknown preset {model!r} (presets: {', '.join(sorted(PRESETS))}), and {e}") from None
    file = path / "config.json" if path.is_dir() else path
    try:
        cfg = json.loads(file.read_text())
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{file}: not a readable JSON config ({e})") from None
    try:
        if cfg.get("format") == "lmforge":
            return config_from_dict(cfg["family"], cfg["model"])
        if "model_type" in cfg:
            return config_from_hf(cfg)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{file}: invalid model config ({e})") from None
    raise ValueError(f"{file}: neither an lmforge config (format: lmforge) nor a Hugging Face one (model_type)")


def describe(model: str | os.PathLike | ModelConfig) -> Arch:
    """The planner's view of a model (anything `resolve_config` accepts)."""
    return arch_of(resolve_config(model))
