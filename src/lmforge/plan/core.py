"""`make_plan`: parameters, FLOPs, memory per device and time for one training setup."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from lmforge.models import ModelConfig, family_of
from lmforge.models.arch import check_lora_targets
from lmforge.plan import estimate as est
from lmforge.plan.arch import describe, resolve_config
from lmforge.plan.device import get_device
from lmforge.train.objectives import CHUNK_ELEMENTS

OPTIMIZERS = ("adamw", "sgd")
STRATEGIES = ("ddp", "fsdp")


def engine_chunk_rows(vocab_size: int) -> int:
    """Rows per chunk of the training engine's chunked cross-entropy
    (train.objectives.linear_cross_entropy's default): about CHUNK_ELEMENTS logits."""
    return max(64, CHUNK_ELEMENTS // vocab_size)


@dataclass
class Plan:
    """The planner's answer. Bytes are per device; FLOPs per device. `to_dict()` is the
    JSON form; `settings` holds every input, so `verify_plan` can rerun the setup."""

    model: str
    family: str
    settings: dict[str, Any]
    params: dict[str, int]
    flops: dict[str, Any]
    memory: dict[str, Any]
    time: dict[str, Any]
    device: dict[str, Any]
    max_micro_batch: int
    generation: dict[str, int]
    notes: list[str] = field(default_factory=list)
    communication: dict[str, Any] = field(default_factory=dict)  # bytes per step (estimate.communication)
    config: ModelConfig | None = None

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "config"}
        d["config"] = self.config.to_dict() if self.config is not None else None
        return d


def _check(name: str, value: Any, ok: bool, expected: str) -> None:
    if not ok:
        raise ValueError(f"plan: {name} must be {expected}, got {value!r}")


def _positive(name: str, value: Any) -> None:
    _check(name, value, isinstance(value, int) and not isinstance(value, bool) and value >= 1, "a positive integer")


NOTES = [
    "weights stay fp32 under bf16/fp16 autocast (no separate master copy); autocast keeps a low-precision copy "
    "of each weight from its forward use to its backward, counted with the activations",
    "activations: the tensors autograd saves, derived op by op from lmforge's blocks and checked against "
    "saved_tensors_hooks; attention through SDPA's fused kernels (no T x T scores) except where PyTorch "
    "falls back to the math kernel (CPU with attention dropout, CUDA fp32 with grouped-query attention)",
    "FLOPs: backward = 2x forward for trained weights; fused attention kernels on CUDA recompute QK^T in "
    "backward (+0.5x attention forward) that the model FLOPs leave out",
]


def _check_settings(limit: int, *, seq_len: int, target_len: int, batch_size: int, grad_accum: int, devices: int,
                    precision: str, optimizer: str, strategy: str, lora_rank: int, ce_chunk: int | None,
                    mlm_fraction: float, mfu: float | None, backend: str | None) -> None:
    """ValueError naming the first bad setting of `make_plan` (limit: the model's max_seq_len)."""
    for name, value in (("seq_len", seq_len), ("target_len", target_len), ("batch_size", batch_size),
                        ("grad_accum", grad_accum), ("devices", devices)):
        _positive(name, value)
    _check("seq_len", seq_len, seq_len <= limit, f"at most the model's max_seq_len ({limit})")
    _check("target_len", target_len, target_len <= limit, f"at most the model's max_seq_len ({limit})")
    _check("precision", precision, precision in est.PRECISIONS, f"one of {tuple(est.PRECISIONS)}")
    _check("optimizer", optimizer, optimizer in OPTIMIZERS, f"one of {OPTIMIZERS}")
    _check("strategy", strategy, strategy in STRATEGIES, f"one of {STRATEGIES}")
    _check("lora_rank", lora_rank, isinstance(lora_rank, int) and lora_rank >= 0, "a non-negative integer")
    _check("ce_chunk", ce_chunk, ce_chunk is None or (isinstance(ce_chunk, int) and ce_chunk >= 0),
           "a non-negative integer or None")
    _check("mlm_fraction", mlm_fraction, 0.0 < mlm_fraction <= 1.0, "in (0, 1]")
    _check("mfu", mfu, mfu is None or 0.0 < mfu <= 1.0, "in (0, 1]")
    _check("backend", backend, backend in (None, "cuda", "cpu"), "'cuda', 'cpu' or None")


def make_plan(
    model: str | os.PathLike | ModelConfig,
    *,
    seq_len: int | None = None,
    target_len: int | None = None,
    batch_size: int = 1,
    grad_accum: int = 1,
    precision: str = "bf16",
    optimizer: str = "adamw",
    activation_checkpointing: bool = False,
    lora_rank: int = 0,
    lora_targets: tuple[str, ...] | list[str] = ("wqkv", "wo"),
    devices: int = 1,
    strategy: str = "ddp",
    device: str = "h100",
    mfu: float | None = None,
    ce_chunk: int | None = None,
    mlm_fraction: float = 0.15,
    backend: str | None = None,
) -> Plan:
    """Plan training `model` (a preset name, a model directory or config.json, or a config)
    with these settings.

    seq_len: tokens per sequence (the source length for encoder-decoder; default the
    model's max_seq_len); target_len: decoder tokens (default seq_len); batch_size: the
    micro-batch per device; precision: "fp32", "bf16" or "fp16" autocast; device: "h100",
    "a100", "cpu" or "measured" (benchmarks this machine); mfu: override the device's
    assumed utilisation; ce_chunk: rows per cross-entropy chunk (None: the training
    engine's default, about 2^26 logits per chunk; 0: plain unchunked cross-entropy);
    mlm_fraction: Bert's masked share of positions; backend: "cuda" or "cpu" kernels
    (default: the device's). Raises ValueError naming a bad setting.
    """
    config = resolve_config(model)
    arch = describe(config)
    seq_len = seq_len or config.max_seq_len
    target_len = (target_len or seq_len) if arch.encoder_decoder else seq_len
    _check_settings(config.max_seq_len, seq_len=seq_len, target_len=target_len, batch_size=batch_size,
                    grad_accum=grad_accum, devices=devices, precision=precision, optimizer=optimizer,
                    strategy=strategy, lora_rank=lora_rank, ce_chunk=ce_chunk, mlm_fraction=mlm_fraction, mfu=mfu,
                    backend=backend)
    if lora_rank:
        check_lora_targets(tuple(lora_targets))
    s = dict(seq_len=seq_len, target_len=target_len, batch_size=batch_size, grad_accum=grad_accum,
             precision=precision, optimizer=optimizer, activation_checkpointing=bool(activation_checkpointing),
             lora_rank=lora_rank, lora_targets=list(lora_targets), devices=devices, strategy=strategy,
             device=device, mfu=mfu, ce_chunk=engine_chunk_rows(arch.vocab_size) if ce_chunk is None else ce_chunk,
             mlm_fraction=mlm_fraction)
    shape = est.make_shape(arch, s)
    dev = get_device(device, precision, est.gemm_shapes(arch, shape), mfu)
    s["backend"] = backend or dev.kind
    segs = est.segments(arch, shape, s, s["backend"])
    fl = est.flops(arch, shape, s, segs)
    mem = est.memory_per_device(arch, shape, s, s["backend"], segs)
    mem["reserved_estimate"] = est.reserved(mem["peak"], dev.kind)
    mem["device_memory"] = dev.memory
    mem["fits"] = mem["reserved_estimate"] <= dev.memory
    return Plan(
        model=str(model) if isinstance(model, (str, os.PathLike)) else f"custom {family_of(config)}",
        family=arch.family,
        settings=s,
        params=est.parameters(arch, s),
        flops=fl,
        memory=mem,
        time=est.step_time(arch, shape, s, dev, fl),
        device={"name": dev.name, "kind": dev.kind, "memory": dev.memory, "peak_flops": dev.peak,
                "bandwidth": dev.bandwidth, "mfu": dev.mfu, "note": dev.note},
        max_micro_batch=est.max_micro_batch(arch, s, dev),
        generation=est.kv_cache(arch, shape, s),
        notes=list(NOTES),
        communication=est.communication(arch, s),
        config=config,
    )
