"""A model's and optimizer's state whatever the wrapping: gathered whole, or sharded
through torch.distributed.checkpoint (DCP).

    gathered   `full_model_state`: every tensor whole on the CPU of every process (one
               all-gather per FSDP2 tensor, so a device holds one gathered tensor at a time);
               `plain_copy` builds a plain single-device model from it (for exporting and
               evaluating after FSDP2 training).
    sharded    `sharded_state` / `save_sharded` / `load_sharded`: each process writes and
               reads only its own shards (FSDP2's DTensors; a DDP model's replicated tensors
               are written once, spread over the processes). DCP reshards on load, so a
               checkpoint of N processes loads into M, or into a single process.
    one file   `set_full_state`: a gathered state dict (the single-process checkpoint's
               safetensors) loaded into a plain, DDP-wrapped or FSDP2-sharded model.

`unsharded` holds an FSDP2 model's parameters gathered for the length of an evaluation,
so that processes may run different numbers of forward passes (generation) without
waiting on each other.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

# ----------------------------------------------------------------------------- gathered


def full_model_state(model: nn.Module) -> dict[str, Tensor]:
    """The whole state dict on the CPU of every process. Collective under FSDP2 (every
    process calls it, in the same order); a plain or DDP model's own tensors are copied."""
    out = {}
    for name, value in model.state_dict().items():
        if isinstance(value, DTensor):
            value = value.full_tensor()
        out[name] = value.detach().to("cpu", copy=True)
    return out


def meta_skeleton(model: nn.Module) -> nn.Module:
    """A copy of `model` whose parameters and persistent buffers live on the meta device
    (no memory); non-persistent buffers (RoPE tables) are copied. Take it before wrapping,
    and `plain_copy` fills it. Shared (tied) parameters stay shared."""
    memo: dict[int, Any] = {}
    for module in model.modules():
        for p in module._parameters.values():
            if p is not None and id(p) not in memo:
                q = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
                q.__dict__.update(copy.copy(p.__dict__))
                memo[id(p)] = q
        for name, b in module._buffers.items():
            if b is not None and name not in module._non_persistent_buffers_set:
                memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(model, memo)


def plain_copy(skeleton: nn.Module, state: dict[str, Tensor]) -> nn.Module:
    """`skeleton` (from `meta_skeleton`) materialised on the CPU with `state`'s values:
    a plain single-device model, whatever wrapped the one that trained."""
    real: dict[int, Any] = {}
    for module in skeleton.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and p.is_meta:
                if id(p) not in real:
                    q = nn.Parameter(torch.empty_like(p, device="cpu"), requires_grad=p.requires_grad)
                    q.__dict__.update(p.__dict__)
                    real[id(p)] = q
                module._parameters[name] = real[id(p)]
        for name, b in list(module._buffers.items()):
            if b is not None and b.is_meta:
                module._buffers[name] = torch.empty_like(b, device="cpu")
    skeleton.load_state_dict(state, strict=True)
    return skeleton


@contextlib.contextmanager
def unsharded(model: nn.Module) -> Iterator[None]:
    """Gather an FSDP2 model's parameters once and keep them gathered inside the block
    (no collective per forward pass: processes may run different numbers of them); a
    model that FSDP2 does not shard is left as it is."""
    fsdp = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not fsdp:
        yield
        return
    # set_reshard_after_forward(False) is FSDP2's switch for evaluation; the previous
    # settings (the root's differs from the blocks') are put back as they were.
    states = [m._get_fsdp_state() for m in fsdp]
    saved = [(s._auto_reshard_after_forward, [g.post_forward_mesh_info for g in s._fsdp_param_groups])
             for s in states]
    for m in fsdp:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield
    finally:
        for m, s, (auto, infos) in zip(fsdp, states, saved):
            m.reshard()
            s._auto_reshard_after_forward = auto
            for g, info in zip(s._fsdp_param_groups, infos):
                g.post_forward_mesh_info = info


# ----------------------------------------------------------------------------- one file


def set_full_state(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Load a whole state dict into a plain, DDP-wrapped or FSDP2-sharded model (every
    process passes the same dict; each keeps its shard)."""
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=True))


def full_optimizer_state(root: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer state keyed by parameter name (not position), whole, on the CPU
    (rank 0 gets the tensors under FSDP2; every process must call it)."""
    return get_optimizer_state_dict(root, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                               cpu_offload=True))


def set_full_optimizer_state(root: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    set_optimizer_state_dict(root, optimizer, state, options=StateDictOptions(full_state_dict=True))


# ----------------------------------------------------------------------------- sharded


def sharded_state(model: nn.Module, root: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """{"model": ..., "optimizer": ...}: this process's view of the state (DTensor shards
    under FSDP2, the replicated tensors under DDP), for `save_sharded` and `load_sharded`.
    The optimizer's state is created (a zero step) when it has none yet, so that a fresh
    optimizer can receive a checkpoint's."""
    return {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(root, optimizer)}


def save_sharded(state: dict[str, Any], directory: str | Path) -> None:
    """Write `state` as a DCP checkpoint in `directory` (collective: each process writes
    its own files, rank 0 the metadata last; every file is fsynced)."""
    dcp.save(state, storage_writer=FileSystemWriter(str(directory), sync_files=True))


def load_sharded(model: nn.Module, root: nn.Module, optimizer: torch.optim.Optimizer | None,
                 directory: str | Path) -> None:
    """Load a DCP checkpoint written by any number of processes into this run's model (and
    optimizer), whatever its wrapping and number of processes (collective under torchrun)."""
    state: dict[str, Any] = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(root, optimizer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # in one process DCP notes that it reads alone
        dcp.load(state, storage_reader=FileSystemReader(str(directory)), no_dist=not dist.is_initialized())
    set_model_state_dict(model, state["model"])
    if optimizer is not None:
        set_optimizer_state_dict(root, optimizer, state["optimizer"])


def read_sharded_model(directory: str | Path) -> dict[str, Tensor]:
    """The model's whole tensors from a DCP checkpoint, read by this process alone onto the
    CPU (no process group needed): its names without the "model." prefix."""
    reader = FileSystemReader(str(directory))
    metadata = reader.read_metadata()
    state = {key: torch.empty(m.size, dtype=m.properties.dtype)
             for key, m in metadata.state_dict_metadata.items()
             if key.startswith("model.") and isinstance(m, TensorStorageMetadata)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP's note that it reads in one process: that is the point
        dcp.load(state, storage_reader=reader, no_dist=True)
    return {key.removeprefix("model."): value for key, value in state.items()}
