"""Measuring real training steps: peak tensor memory and step time, on CPU or CUDA.

Peak memory
- CUDA: `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats`, i.e. bytes
  held by live tensors (not the caching allocator's reserve).
- CPU: PyTorch's CPU allocator does not cache, and under `torch.profiler` with
  `profile_memory=True` it reports every allocation and free with its size. The steps
  run under the profiler; the running sum of those events, added to the bytes alive
  when profiling starts (parameters, buffers, optimizer states and the batch, each
  storage counted once), traces tensor memory over time, and its maximum is the peak.
  This counts exactly what `max_memory_allocated` counts on CUDA, including the
  temporaries inside an op, and nothing of the Python heap or freed pages the process
  still holds — which is why RSS (too coarse, and never shrinking) is not used.
Step time: wall-clock of the fastest of several steps after a warm-up, without the
profiler (whose per-op overhead would distort it), with `torch.cuda.synchronize` on CUDA.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

from lmforge.plan.calibrate import best_time


def live_bytes(tensors: Iterable[Tensor]) -> int:
    """Bytes of the distinct storages behind `tensors` (views and shared weights once)."""
    seen: dict[tuple[str, int], int] = {}
    for t in tensors:
        if t is None or t.device.type == "meta":
            continue
        s = t.untyped_storage()
        seen[(str(t.device), s.data_ptr())] = s.nbytes()
    return sum(seen.values())


def state_tensors(model: nn.Module, optimizer: torch.optim.Optimizer, extra: Iterable[Tensor] = ()) -> list[Tensor]:
    """Every tensor a training step keeps between steps."""
    out = [*model.parameters(), *model.buffers(), *extra]
    out += [p.grad for p in model.parameters() if p.grad is not None]
    for state in optimizer.state.values():
        out += [v for v in state.values() if isinstance(v, Tensor)]
    return out


def cpu_peak(run: Callable[[], None], baseline: int) -> tuple[int, dict[str, int]]:
    """Peak tensor bytes on CPU while `run()` executes, and the peak inside each
    `record_function` phase it marks ("forward", "backward", "optimizer")."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = prof.profiler.kineto_results.events()
    mem = sorted((e.start_ns(), e.nbytes()) for e in events
                 if e.name() == "[memory]" and e.device_type() == DeviceType.CPU)
    phases = [(e.start_ns(), e.end_ns(), e.name()) for e in events if e.name() in ("forward", "backward", "optimizer")]
    cur, peak, by_phase = baseline, baseline, {}
    for ts, nbytes in mem:
        cur += nbytes
        peak = max(peak, cur)
        for start, end, name in phases:
            if start <= ts <= end:
                by_phase[name] = max(by_phase.get(name, 0), cur)
    return peak, by_phase


def time_steps(step: Callable[[], None], steps: int, dev: torch.device, clock: str = "wall") -> float:
    """Seconds of the fastest of `steps` calls of `step` (calibrate.best_time without its
    warm-up: the caller has run one). The fastest, not the median: on a shared machine it
    is the call least disturbed by other work, like the part timings it is compared with."""
    return best_time(step, dev, calls=steps, clock=clock, warm_up=False)


def measure_peak(step: Callable[[], None], state: Callable[[], list[Tensor]], device: torch.device,
                 steps: int = 1) -> tuple[int, dict[str, int]]:
    """Steady-state peak tensor memory of `steps` calls of `step` (after one warm-up call
    that creates the optimizer states), and per phase on CPU."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(device), {}

    def run() -> None:
        for _ in range(steps):
            step()

    return cpu_peak(run, live_bytes(state()))


def phase(name: str):
    """A named range the CPU peak measurement reports separately."""
    return record_function(name)
