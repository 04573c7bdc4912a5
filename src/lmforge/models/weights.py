"""Model weights on disk: safetensors, each shared (tied) tensor stored once, loaded strictly.

Loading never holds two copies of a model: the model is built without drawing random
values (`init_only`), and each tensor is read from its file when its turn comes and
copied into place (`TensorFiles`), so the peak is the model plus one tensor.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
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
    """Load a file written by `save_weights` into `module` (in the module's dtype), one
    tensor at a time; every tensor must match by name and shape (tied tensors may appear
    once), else ValueError naming the tensor."""
    load_tensors(module, TensorFiles.of(Path(path)), path)


def load_tensors(module: nn.Module, tensors: Mapping[str, Tensor], source: str | os.PathLike) -> None:
    """Load a state dict (or a `TensorFiles`, read one tensor at a time) into `module` as
    `load_weights` does; errors name `source`."""
    expected = module.state_dict()
    tied = set(expected) - set(unique_state_dict(module))
    missing = sorted(set(expected) - set(tensors) - tied)
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{source}: weights do not match the model: missing {missing[:8]}, "
                         f"unexpected {unexpected[:8]}")
    for name in tensors:
        shape = tensors.shape(name) if isinstance(tensors, TensorFiles) else tuple(tensors[name].shape)
        if shape != tuple(expected[name].shape):
            raise ValueError(f"{source}: tensor {name} has shape {shape}, "
                             f"the model needs {tuple(expected[name].shape)}")
    with torch.no_grad():
        for name in tensors:
            expected[name].copy_(tensors[name])


# ----------------------------------------------------------------------------- loading without a second copy

INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
                  "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_",
                  "sparse_")


@contextlib.contextmanager
def init_only(tensors: Iterable[Tensor] = ()) -> Iterator[None]:
    """While inside, torch.nn.init's functions act only on `tensors` (by default on none):
    a model built here has uninitialised memory where a checkpoint's values will go, which
    costs nothing (drawing 0.5B normal numbers takes ~15 s on a laptop core). Values set
    directly (RoPE tables, RMSNorm's ones) are computed as usual."""
    keep = {id(t) for t in tensors}
    saved = {name: getattr(nn.init, name) for name in INIT_FUNCTIONS}

    def only(fn):
        def init(tensor, *args, **kwargs):
            return fn(tensor, *args, **kwargs) if id(tensor) in keep else tensor
        return init

    for name, fn in saved.items():
        setattr(nn.init, name, only(fn))
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)


def initialise(model: nn.Module, names: Iterable[str]) -> None:
    """Give the parameters `names` of a model built under `init_only()` the values its own
    initialisation gives them: each module's reset_parameters (what its constructor did),
    then every init_weights (the model's and the heads' schemes), acting on those alone."""
    params = dict(model.named_parameters())
    targets = [params[n] for n in names if n in params]
    if not targets:
        return
    ids = {id(t) for t in targets}
    with init_only(targets), torch.no_grad():
        for m in model.modules():
            if hasattr(m, "reset_parameters") and any(id(p) in ids for p in m.parameters(recurse=False)):
                m.reset_parameters()
        for m in model.modules():
            if callable(getattr(m, "init_weights", None)):
                m.init_weights()


class TensorFiles(Mapping[str, Tensor]):
    """The tensors of one or more safetensors files by name, each read from its file when
    asked for (the file is opened, the tensor copied out, the file closed): a mapping over a
    checkpoint that never holds it all in memory. shapes/dtypes come from the headers."""

    def __init__(self, files: Mapping[str, Path]) -> None:
        self.files = dict(files)  # tensor name -> the file holding it

    @classmethod
    def of(cls, *paths: Path) -> TensorFiles:
        files: dict[str, Path] = {}
        for path in paths:
            for name in _header(path):
                files[name] = path
        return cls(files)

    def __getitem__(self, name: str) -> Tensor:
        path = self.files[name]
        try:
            with safe_open(path, framework="pt") as f:
                return f.get_tensor(name)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise ValueError(f"{path}: corrupt or truncated safetensors file ({e})") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self.files)

    def __len__(self) -> int:
        return len(self.files)

    def shape(self, name: str) -> tuple[int, ...]:
        with safe_open(self.files[name], framework="pt") as f:
            return tuple(f.get_slice(name).get_shape())


def _header(path: Path) -> list[str]:
    """The tensor names of a safetensors file (its header only)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such weights file")
    try:
        with safe_open(path, framework="pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ValueError(f"{path}: corrupt or truncated safetensors file ({e})") from None


def checkpoint_dtype(tensors: Mapping[str, Tensor]) -> torch.dtype:
    """The floating-point dtype of most of a checkpoint's values (float32 if none)."""
    counts: dict[torch.dtype, int] = {}
    if isinstance(tensors, TensorFiles):
        for path in set(tensors.files.values()):
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    sl = f.get_slice(name)
                    dtype = SAFETENSORS_DTYPES.get(sl.get_dtype())
                    if dtype is not None:
                        counts[dtype] = counts.get(dtype, 0) + math.prod(sl.get_shape())
    else:
        for value in tensors.values():
            if value.is_floating_point():
                counts[value.dtype] = counts.get(value.dtype, 0) + value.numel()
    return max(counts, key=counts.get) if counts else torch.float32


SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


# ----------------------------------------------------------------------------- shards

def parse_size(size: int | str) -> int:
    """Bytes from 5000000, "5GB", "500MB", "2GiB" (transformers' max_shard_size spellings)."""
    if isinstance(size, int):
        return size
    text = str(size).strip().upper()
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    for unit, factor in units.items():
        if text.endswith(unit):
            try:
                return int(float(text[: -len(unit)]) * factor)
            except ValueError:
                break
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"max_shard_size: expected a size like 5GB or 500MB, got {size!r}") from None


def shard(tensors: Mapping[str, Tensor], max_bytes: int) -> list[dict[str, Tensor]]:
    """Split tensors, in order, into shards of at most max_bytes each (a bigger tensor alone)."""
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for name, value in tensors.items():
        n = value.numel() * value.element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = value
        size += n
    return shards
