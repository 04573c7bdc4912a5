"""Model weights on disk: safetensors, each shared (tied) tensor stored once, loaded strictly."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import Tensor, nn

from lmforge.files import atomic_write_bytes


def unique_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """The state dict with each tied tensor kept once (under its first name)."""
    seen: set[tuple] = set()
    out: dict[str, Tensor] = {}
    for name, value in module.state_dict().items():
        key = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape))
        if value.numel() and key in seen:
            continue
        seen.add(key)
        out[name] = value.detach().contiguous()
    return out


def save_weights(module: nn.Module, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Write the module's tensors to a safetensors file, atomically."""
    tensors = {k: v.cpu() for k, v in unique_state_dict(module).items()}
    atomic_write_bytes(path, save(tensors, metadata={"format": "pt", **(metadata or {})}))


def read_safetensors(path: str | os.PathLike) -> dict[str, Tensor]:
    """All tensors of a safetensors file; a truncated or corrupt file raises ValueError naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such weights file")
    try:
        return load_file(path)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ValueError(f"{path}: corrupt or truncated safetensors file ({e})") from None


def load_weights(module: nn.Module, path: str | os.PathLike) -> None:
    """Load a file written by `save_weights` into `module`; every tensor must match by
    name and shape (tied tensors may appear once), else ValueError naming the tensor."""
    tensors = read_safetensors(path)
    expected = module.state_dict()
    tied = set(expected) - set(unique_state_dict(module))
    missing = sorted(set(expected) - set(tensors) - tied)
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match the model: missing {missing[:8]}, unexpected {unexpected[:8]}")
    for name, value in tensors.items():
        if value.shape != expected[name].shape:
            raise ValueError(f"{path}: tensor {name} has shape {tuple(value.shape)}, "
                             f"the model needs {tuple(expected[name].shape)}")
    with torch.no_grad():
        module.load_state_dict(tensors, strict=False)
