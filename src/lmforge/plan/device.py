"""What a device can do: memory, peak matmul FLOP/s per precision, memory bandwidth, and
the fraction of peak a training step achieves — from a datasheet, or measured here.

Named GPUs use dense (no sparsity) datasheet peaks of the SXM parts and an assumed
model-FLOPs utilisation (MFU) of 0.45: the range eager PyTorch with fused attention and
fused AdamW reaches for GPT-2-small-sized models in bf16; fp32 assumes TF32 off
(PyTorch's default). "measured" (and "cpu") benchmarks this machine on the plan's own work — its GEMM
shapes (forward and both backward products) in its compute dtype, its elementwise ops
at its tensor sizes, a fused AdamW step — and predicts a step as GEMM FLOPs at the
measured GEMM rate + bytes of non-matmul ops at the measured elementwise rate +
optimizer bytes at the measured optimizer rate. Small-tensor ops on a CPU run far below
copy bandwidth, which is why they are measured at the plan's sizes.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace

import torch

GiB = 2**30


@dataclass(frozen=True)
class Device:
    """peak: matmul FLOP/s by precision; bandwidth: bytes/s; mfu: achieved fraction of
    peak for a whole training step (time = FLOPs / (peak * mfu)), or None to time the
    step as matmul FLOPs / peak + traffic / bandwidth with measured numbers."""

    name: str
    kind: str  # "cuda" | "cpu"
    memory: int
    peak: dict[str, float]
    bandwidth: float
    mfu: float | None
    note: str = ""
    optimizer_bandwidth: float | None = None  # measured bytes/s of the optimizer update


DEVICES: dict[str, Device] = {
    "h100": Device("NVIDIA H100 SXM5 80GB (datasheet)", "cuda", 80 * GiB,
                   {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}, 3.35e12, 0.45),
    "a100": Device("NVIDIA A100 SXM4 80GB (datasheet)", "cuda", 80 * GiB,
                   {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12}, 2.039e12, 0.45),
}

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


def _elementwise_rate(tokens: int, dim: int, hidden: int, dev: torch.device) -> float:
    """Bytes/s of a block's non-matmul ops at the plan's sizes (LayerNorm, GELU, residual add,
    forward and backward), counting bytes as trace.py's `Walk.move` does."""
    tokens = min(tokens, 4096)
    x = torch.randn(tokens, dim, device=dev, requires_grad=True)
    h = torch.randn(tokens, hidden, device=dev, requires_grad=True)
    norm = torch.nn.LayerNorm(dim).to(dev)

    def run() -> None:
        y = norm(x) + x
        z = torch.nn.functional.gelu(h, approximate="tanh")
        (y.sum() + z.sum()).backward()

    work = tokens * dim * 48 + tokens * hidden * 16  # norm 24 + add 24 bytes per element, GELU 16
    return _rate(run, float(work), dev, min_time=0.1)


def _optimizer_rate(dev: torch.device) -> float:
    """Bytes/s of a fused AdamW step (28 bytes read and written per parameter)."""
    p = torch.nn.Parameter(torch.randn(16 * 2**20, device=dev))
    p.grad = torch.randn_like(p)
    opt = torch.optim.AdamW([p], fused=True)
    return _rate(opt.step, 28.0 * p.numel(), dev, min_time=0.1)


def measure(precision: str, gemms: list[tuple[int, int, int]], sizes: tuple[int, int, int],
            kind: str | None = None) -> Device:
    """Benchmark this machine's accelerator (or CPU) on the plan's own work: its GEMM
    shapes in the compute dtype, its elementwise ops at its tensor sizes (tokens, dim,
    hidden), a fused AdamW step and a large copy. Cached per workload for the process."""
    kind = kind or ("cuda" if torch.cuda.is_available() else "cpu")
    key = (kind, precision, tuple(gemms), sizes)
    if key in _measured:
        return _measured[key]
    dev = torch.device(kind)
    dtype = _DTYPES[precision]
    if kind == "cpu" and precision == "fp16":
        dtype = torch.bfloat16  # CPU autocast fp16 matmuls run like bf16 ones on the same units
    gemm = _gemm_rate(gemms, dtype, dev)
    elementwise = _elementwise_rate(*sizes, dev)
    optimizer = _optimizer_rate(dev)
    x = torch.empty(64 * 2**20, dtype=torch.float32, device=dev)
    y = torch.empty_like(x)
    copy = _rate(lambda: y.copy_(x), 2.0 * x.numel() * 4, dev)
    if kind == "cuda":
        memory, name = torch.cuda.get_device_properties(dev).total_memory, torch.cuda.get_device_name(dev)
    else:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        name = f"this machine's CPU ({torch.get_num_threads()} threads)"
    note = (f"measured on the plan's work: GEMMs {gemm / 1e9:.1f} GFLOP/s ({dtype}), elementwise ops "
            f"{elementwise / 1e9:.1f} GB/s, fused AdamW {optimizer / 1e9:.1f} GB/s, copy {copy / 1e9:.1f} GB/s")
    device = Device(name + " (measured)", kind, memory, {precision: gemm}, elementwise, None, note,
                    optimizer_bandwidth=optimizer)
    _measured[key] = device
    return device


def get_device(name: str, precision: str, gemms: list[tuple[int, int, int]], sizes: tuple[int, int, int],
               mfu: float | None = None) -> Device:
    """A named device, "cpu" (measured on this CPU) or "measured" (this machine's GPU if
    any, else its CPU). `gemms` and `sizes` describe the plan's work for measuring;
    `mfu` overrides the utilisation (and makes a measured device use it)."""
    if name in DEVICES:
        device = DEVICES[name]
    elif name in ("cpu", "measured"):
        device = measure(precision, gemms, sizes, "cpu" if name == "cpu" else None)
    else:
        raise ValueError(f"device: unknown {name!r}; choose from {sorted(DEVICES) + ['cpu', 'measured']}")
    return replace(device, mfu=mfu) if mfu is not None else device
