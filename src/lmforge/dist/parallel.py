"""Parallelism applied from outside the model, in a fixed order: compile, activation
checkpointing, then DDP or FSDP2. Model code stays single-device.

Under torchrun each process reads RANK, WORLD_SIZE and LOCAL_RANK from the environment
(multi-node works the same way: torchrun's rendezvous sets them), joins the process
group (nccl on CUDA, gloo on CPU) and drives one device.

    DDP   every process holds the whole model; gradients are averaged by all-reduce.
    FSDP2 `fully_shard` per Transformer block, then the root: each process holds 1/world
          of every parameter, gradient and optimizer state; a block's parameters are
          all-gathered just before it runs and its gradients reduce-scattered after.

DDP looks for parameters a step leaves unused only when a probe found some (the search
is an extra pass over the autograd graph every step). FSDP2 gathers parameters in the
training precision (MixedPrecisionPolicy: bf16 all-gathers, fp32 gradient reduction).

State dicts (gathered, sharded, torch.distributed.checkpoint) live in dist/state.py.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import logging
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
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


def main_process() -> bool:
    """Is this rank 0 (or the only process)? The one that prints a command's summary."""
    return _env_int("RANK", 0) == 0


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """"auto" -> cuda:LOCAL_RANK when CUDA is available, else cpu; "cuda" -> cuda:LOCAL_RANK."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        device = f"cuda:{local_rank}"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"train.device is {device!r} but CUDA is not available")
    return torch.device(device)


def init_distributed(strategy: str = "ddp", backend: str = "auto", device: str = "auto",
                     timeout_minutes: float = 30.0) -> DistEnv:
    """Join the torchrun process group (once; later calls return the same env) and pick this
    process's device. A single process (no WORLD_SIZE, or 1) needs no process group.
    timeout_minutes: how long a collective waits for the other processes before it fails."""
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
            dist.init_process_group(backend, device_id=dev if backend == "nccl" else None, store=_attempt_store(),
                                    rank=rank, world_size=world, timeout=datetime.timedelta(minutes=timeout_minutes))
        if rank != 0:
            quiet()
    return DistEnv(rank, world, local, dev)


def _attempt_store() -> dist.Store:
    """torchrun's store (MASTER_ADDR:MASTER_PORT), its keys prefixed by the restart count.

    After `torchrun --max-restarts` restarts the workers, they meet in the same store as the
    workers that died; without a prefix of their own a new process may read a dead one's
    address and fail to connect ("Connection refused"), which makes restarts fail at random."""
    store, _, _ = next(dist.rendezvous("env://", _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)))
    return dist.PrefixStore(f"lmforge/attempt_{_env_int('TORCHELASTIC_RESTART_COUNT', 0)}", store)


def quiet() -> None:
    """Warnings and lmforge's log lines once, not once per process: a process other than
    rank 0 keeps its errors only (the warnings of rank 0 are the same ones)."""
    for name in (None, "lmforge", "absl"):  # absl: rouge-score's notes
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


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
                activation_checkpointing: bool = False, reshard_after_forward: bool = True,
                param_dtype: torch.dtype | None = None, find_unused_parameters: bool = False) -> nn.Module:
    """Apply compile, activation checkpointing, then DDP or FSDP2 (when env is distributed)
    to `root`, a module whose forward runs `model` (the objective's LossModule). Returns
    the module to call: `root` itself or its DDP wrapper. `model` is changed in place.

    param_dtype: FSDP gathers parameters in this dtype (bf16/fp16 training: half the
        all-gather traffic) and reduces gradients in fp32; the sharded master weights stay fp32.
    find_unused_parameters: DDP searches each step's graph for parameters it left unused
        (`unused_parameters` tells whether any are)."""
    if compile:
        apply_compile(model)
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if not env.distributed:
        return root
    if strategy == "fsdp":
        policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
        for block in transformer_blocks(model):
            fully_shard(block, reshard_after_forward=reshard_after_forward, mp_policy=policy)
        fully_shard(root, reshard_after_forward=reshard_after_forward, mp_policy=policy)
        return root
    if strategy == "ddp":
        device_ids = [env.device.index] if env.device.type == "cuda" else None
        return DistributedDataParallel(root, device_ids=device_ids, find_unused_parameters=find_unused_parameters)
    raise ValueError(f"dist.strategy must be ddp or fsdp under torchrun, got {strategy!r}")


def unused_parameters(root: nn.Module, batch: dict[str, Any]) -> list[str]:
    """Names of the trainable parameters that one forward + backward of `root` (not yet
    wrapped) on `batch` leaves without a gradient: DDP must look for them every step
    (BERT's NSP head under plain masked LM), or its gradient reduction waits forever."""
    root.zero_grad(set_to_none=True)
    out = root(batch)
    if out.loss.requires_grad:
        out.loss.backward()
    unused = [name for name, p in root.named_parameters() if p.requires_grad and p.grad is None]
    root.zero_grad(set_to_none=True)
    return unused


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


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every process (`obj` itself in one process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class RankFailed(RuntimeError):
    """Another process (rank 0) failed at a step every process waits on; it reports the cause."""


def raise_if_failed(failure: BaseException | None, what: str) -> None:
    """After a step only rank 0 does (writing the final model): every process learns whether
    it failed, so none waits forever and none exits as if all was well. Rank 0 (or a single
    process) raises its own exception; the others RankFailed."""
    report = broadcast_object(None if failure is None else f"{type(failure).__name__}: {failure}")
    if failure is not None:
        raise failure
    if report is not None:
        raise RankFailed(f"rank 0 failed {what}: {report}")


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
