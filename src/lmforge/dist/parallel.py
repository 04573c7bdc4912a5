"""Parallelism applied from outside the model, in a fixed order: compile, activation
checkpointing, then DDP or FSDP2. Model code stays single-device.

Under torchrun each process reads RANK, WORLD_SIZE and LOCAL_RANK from the environment
(multi-node works the same way: torchrun's rendezvous sets them), joins the process
group (nccl on CUDA, gloo on CPU) and drives one device.

    DDP   every process holds the whole model; gradients are averaged by all-reduce.
    FSDP2 `fully_shard` per Transformer block, then the root: each process holds 1/world
          of every parameter, gradient and optimizer state; a block's parameters are
          all-gathered just before it runs and its gradients reduce-scattered after.

Checkpoints go through `torch.distributed.checkpoint.state_dict` helpers with
full_state_dict=True, which gather a plain (unsharded) state dict whatever the wrapping,
so one safetensors file comes out and any world size can read it.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands: rank among world_size processes, its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Rank 0 writes files and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """"auto" -> cuda:LOCAL_RANK when CUDA is available, else cpu; "cuda" -> cuda:LOCAL_RANK."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        device = f"cuda:{local_rank}"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"train.device is {device!r} but CUDA is not available")
    return torch.device(device)


def init_distributed(strategy: str = "ddp", backend: str = "auto", device: str = "auto") -> DistEnv:
    """Join the torchrun process group (once; later calls return the same env) and pick this
    process's device. A single process (no WORLD_SIZE, or 1) needs no process group."""
    rank, world, local = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0)
    dev = resolve_device(device, local)
    if world > 1:
        if strategy == "none":
            raise ValueError(f"dist.strategy is 'none' but {world} processes were started; use ddp or fsdp")
        if not dist.is_initialized():
            if backend == "auto":
                backend = "nccl" if dev.type == "cuda" else "gloo"
            if dev.type == "cuda":
                torch.cuda.set_device(dev)
            dist.init_process_group(backend, device_id=dev if backend == "nccl" else None)
    return DistEnv(rank, world, local, dev)


def shutdown() -> None:
    """Leave the process group (if this process joined one)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- wrapping


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks: the children of every ModuleList named `blocks` (GPT.blocks,
    Bert.blocks, EncoderDecoder.encoder.blocks and .decoder.blocks, a task head's backbone)."""
    return [block for name, module in model.named_modules()
            if name.split(".")[-1] == "blocks" and isinstance(module, nn.ModuleList) for block in module]


def apply_compile(model: nn.Module) -> None:
    """torch.compile each block's forward in place: small graphs compiled once and reused
    by every layer; module hooks (FSDP's) stay outside the compiled code; parameter
    names do not change."""
    for block in transformer_blocks(model):
        block.forward = torch.compile(block.forward)


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Keep only each block's input in forward and recompute the rest in backward."""
    for block in transformer_blocks(model):
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def parallelize(root: nn.Module, model: nn.Module, env: DistEnv, *, strategy: str = "ddp", compile: bool = False,
                activation_checkpointing: bool = False, reshard_after_forward: bool = True) -> nn.Module:
    """Apply compile, activation checkpointing, then DDP or FSDP2 (when env is distributed)
    to `root`, a module whose forward runs `model` (the objective's LossModule). Returns
    the module to call: `root` itself or its DDP wrapper. `model` is changed in place."""
    if compile:
        apply_compile(model)
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if not env.distributed:
        return root
    if strategy == "fsdp":
        for block in transformer_blocks(model):
            fully_shard(block, reshard_after_forward=reshard_after_forward)
        fully_shard(root, reshard_after_forward=reshard_after_forward)
        return root
    if strategy == "ddp":
        # static_graph: the same parameters take part every step, and some never do (BERT's
        # NSP head under plain MLM), which DDP accepts without a per-step graph search.
        device_ids = [env.device.index] if env.device.type == "cuda" else None
        return DistributedDataParallel(root, device_ids=device_ids, find_unused_parameters=True)
    raise ValueError(f"dist.strategy must be ddp or fsdp under torchrun, got {strategy!r}")


@contextlib.contextmanager
def gradient_sync(module: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip gradient communication for the micro-batches before the last one of a step
    (DDP's no_sync, FSDP2's set_requires_gradient_sync)."""
    if enabled:
        yield
    elif isinstance(module, DistributedDataParallel):
        with module.no_sync():
            yield
    elif hasattr(module, "set_requires_gradient_sync"):  # an FSDP2 module
        module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)
    else:
        yield


def local_tensors(tensors: list[Tensor]) -> list[Tensor]:
    """This process's shards of FSDP2's DTensors (plain tensors unchanged): element-wise
    ops on them act on the whole distributed tensor."""
    return [t.to_local() if isinstance(t, DTensor) else t for t in tensors]


def full_tensor(t: Tensor) -> Tensor:
    """A DTensor's global value (FSDP2's grad norm is one); a plain tensor unchanged."""
    return t.full_tensor() if isinstance(t, DTensor) else t


# ----------------------------------------------------------------------------- collectives


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum over processes, in place, on the device (no host sync). No-op in one process."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def gather_objects(obj: Any) -> list[Any]:
    """Every process's `obj`, in rank order (a one-element list in one process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


# ----------------------------------------------------------------------------- state dicts

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(model: nn.Module) -> dict[str, Tensor]:
    """The unsharded model state dict on CPU. Collective under FSDP (every process must
    call it); with cpu_offload only rank 0 gets the tensors, other ranks an empty dict."""
    return get_model_state_dict(model, options=_FULL)


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The unsharded optimizer state, keyed by parameter name (not position), on CPU."""
    return get_optimizer_state_dict(model, optimizer, options=_FULL)


def load_model_state(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Load a full state dict into a plain, DDP-wrapped or FSDP2-sharded model (every
    process passes the same dict; each keeps its shard)."""
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=True))


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
