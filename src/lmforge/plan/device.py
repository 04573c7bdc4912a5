"""What a device can do: memory, peak matmul FLOP/s per precision, memory bandwidth, and
the fraction of peak a training step achieves — from a datasheet, or measured here.

Named GPUs use dense (no sparsity) datasheet peaks of the SXM parts and an assumed
model-FLOPs utilisation (MFU) of 0.45: the range eager PyTorch with fused attention and
fused AdamW reaches for GPT-2-small-sized models in bf16; fp32 assumes TF32 off
(PyTorch's default). "measured" (and "cpu") benchmarks this machine: the plan's GEMM shapes (forward and both
backward products) in its compute dtype give the matmul peak; the step time then comes
from timing the step's parts on this machine (calibrate.py), and the achieved fraction
of that peak is reported as the MFU.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace

import torch

from lmforge.hardware import ACCELERATORS


@dataclass(frozen=True)
class Device:
    """peak: matmul FLOP/s by precision; bandwidth: bytes/s; mfu: achieved fraction of
    peak for a whole training step (time = FLOPs / (peak * mfu)), or None for a measured
    device, whose step time comes from timing the step's parts (calibrate.py)."""

    name: str
    kind: str  # "cuda" | "cpu"
    memory: int
    peak: dict[str, float]
    bandwidth: float
    mfu: float | None
    note: str = ""


ASSUMED_MFU = 0.45
DEVICES: dict[str, Device] = {key: Device(a.name, "cuda", a.memory, dict(a.peak), a.bandwidth, ASSUMED_MFU)
                              for key, a in ACCELERATORS.items()}

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_measured: dict[tuple, Device] = {}


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _rate(fn, work: float, dev: torch.device, min_time: float = 0.2) -> float:
    """work / seconds of the fastest call of fn, over calls for at least min_time after a
    warm-up: the fastest call is the one least disturbed by whatever else runs here."""
    fn()
    _sync(dev)
    best, start = float("inf"), time.perf_counter()
    calls = 0
    while calls < 3 or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        best = min(best, time.perf_counter() - t0)
        calls += 1
    return work / best


def _gemm_rate(gemms: list[tuple[int, int, int]], dtype: torch.dtype, dev: torch.device) -> float:
    """FLOP/s over the training GEMMs of each (m, k, n): forward x @ W^T, input gradient
    g @ W and weight gradient g^T @ x (m capped at 512 and n at 4096 to stay short)."""
    flops = seconds = 0.0
    for m, k, n in gemms:
        m, n = min(m, 512), min(n, 4096)
        x, w, g = (torch.randn(*shape, dtype=dtype, device=dev) for shape in ((m, k), (n, k), (m, n)))
        for a, b in ((x, w.t()), (g, w), (g.t(), x)):
            rate = _rate(lambda a=a, b=b: a @ b, 2.0 * m * k * n, dev, min_time=0.05)
            flops += 2.0 * m * k * n
            seconds += 2.0 * m * k * n / rate
    return flops / seconds


def measure(precision: str, gemms: list[tuple[int, int, int]], kind: str | None = None) -> Device:
    """Benchmark this machine's accelerator (or CPU): the plan's GEMM shapes in its compute
    dtype (the matmul peak this workload can reach) and a large copy. Cached per workload."""
    kind = kind or ("cuda" if torch.cuda.is_available() else "cpu")
    key = (kind, precision, tuple(gemms))
    if key in _measured:
        return _measured[key]
    dev = torch.device(kind)
    dtype = _DTYPES[precision]
    if kind == "cpu" and precision == "fp16":
        dtype = torch.bfloat16  # CPU autocast fp16 matmuls run like bf16 ones on the same units
    gemm = _gemm_rate(gemms, dtype, dev)
    x = torch.empty(64 * 2**20, dtype=torch.float32, device=dev)
    y = torch.empty_like(x)
    copy = _rate(lambda: y.copy_(x), 2.0 * x.numel() * 4, dev)
    if kind == "cuda":
        memory, name = torch.cuda.get_device_properties(dev).total_memory, torch.cuda.get_device_name(dev)
    else:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        name = f"this machine's CPU ({torch.get_num_threads()} threads)"
    note = f"measured: the plan's GEMMs at {gemm / 1e9:.1f} GFLOP/s ({dtype}), copy {copy / 1e9:.1f} GB/s"
    device = Device(name + " (measured)", kind, memory, {precision: gemm}, copy, None, note)
    _measured[key] = device
    return device


def get_device(name: str, precision: str, gemms: list[tuple[int, int, int]], mfu: float | None = None) -> Device:
    """A named device, "cpu" (measured on this CPU) or "measured" (this machine's GPU if
    any, else its CPU). `gemms` are the plan's matmul shapes to measure on; `mfu`
    overrides the utilisation (and makes a measured device use FLOPs / (peak x mfu))."""
    if name in DEVICES:
        device = DEVICES[name]
    elif name in ("cpu", "measured"):
        device = measure(precision, gemms, "cpu" if name == "cpu" else None)
    else:
        raise ValueError(f"device: unknown {name!r}; choose from {sorted(DEVICES) + ['cpu', 'measured']}")
    return replace(device, mfu=mfu) if mfu is not None else device
