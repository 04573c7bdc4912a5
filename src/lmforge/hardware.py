"""Accelerators by their datasheets: dense peak matmul FLOP/s per precision (no sparsity),
memory and memory bandwidth, of the SXM parts. The one table behind the training log's MFU
and the planner's GPU devices. And the CPUs this process may use (affinity, cgroup quota),
which size lmforge's thread pools (below).

fp32 is plain fp32 (PyTorch leaves TF32 off by default, and so does lmforge).
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from dataclasses import dataclass
from pathlib import Path

GiB = 2**30


@dataclass(frozen=True)
class Accelerator:
    """name: as reports show it; match: a substring of torch.cuda.get_device_name();
    peak: FLOP/s by precision; memory: bytes; bandwidth: bytes/s."""

    name: str
    match: str
    peak: dict[str, float]
    memory: int
    bandwidth: float


ACCELERATORS: dict[str, Accelerator] = {
    "h100": Accelerator("NVIDIA H100 SXM5 80GB (datasheet)", "H100",
                        {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}, 80 * GiB, 3.35e12),
    "h200": Accelerator("NVIDIA H200 SXM 141GB (datasheet)", "H200",
                        {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}, 141 * GiB, 4.8e12),
    "a100": Accelerator("NVIDIA A100 SXM4 80GB (datasheet)", "A100",
                        {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12}, 80 * GiB, 2.039e12),
    "l4": Accelerator("NVIDIA L4 24GB (datasheet)", "L4",
                      {"bf16": 121e12, "fp16": 121e12, "fp32": 30.3e12}, 24 * GiB, 0.3e12),
}


def accelerator_named(cuda_name: str) -> Accelerator | None:
    """The table's entry for a CUDA device name ("NVIDIA H100 80GB HBM3" -> h100), or None."""
    return next((a for a in ACCELERATORS.values() if a.match in cuda_name), None)


# ---- the CPUs this process may use ----------------------------------------------------------------------------
# os.cpu_count() is the machine's; a process may be pinned to fewer (taskset, a scheduler's cpuset) or be given
# a CPU quota by its container's cgroup (docker --cpus 2 on a 64-core host: 64 visible, 2 usable). Threads past
# what the process may use only wait on each other. And OpenMP's idle threads spin by default: on a machine
# where another busy process holds a core, each parallel region then waits for a thread that the scheduler has
# put off, and a training step becomes several times slower (BENCHMARKS.md). lmforge sets these defaults when
# it is imported, before torch loads OpenMP; a variable the user set is left as it is.

CGROUP = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


def affinity_cpus() -> int:
    """The CPUs the scheduler may run this process on (its affinity mask)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _quota(text: str | None, period_text: str | None = None) -> float | None:
    """CPUs from a cgroup v2 cpu.max ("max 100000", "200000 100000") or a v1 quota and period."""
    if text is None:
        return None
    parts = text.split() if period_text is None else [text, period_text]
    try:
        quota, period = (int(parts[0]), int(parts[1])) if parts[0] != "max" else (-1, 1)
    except (IndexError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def _cgroup_paths(proc_cgroup: Path) -> tuple[str | None, str | None]:
    """This process's cgroup path in the v2 hierarchy and in v1's cpu controller (None: absent)."""
    v2 = v1 = None
    for line in (_read(proc_cgroup) or "").splitlines():
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        if fields[0] == "0" and fields[1] == "":
            v2 = fields[2]
        elif "cpu" in fields[1].split(","):
            v1 = fields[2]
    return v2, v1


def cgroup_cpu_quota(root: Path = CGROUP, proc_cgroup: Path = PROC_CGROUP) -> float | None:
    """The CPU quota of this process's cgroup in CPUs (1.5: 150 ms of CPU per 100 ms), the smallest
    along its path up to the root: cgroup v2's cpu.max, or v1's cpu.cfs_quota_us / cpu.cfs_period_us;
    None when there is none or nothing can be read."""
    v2, v1 = _cgroup_paths(proc_cgroup)
    found = []
    if (root / "cgroup.controllers").is_file():  # the unified (v2) hierarchy is mounted here
        found += [_quota(_read(d / "cpu.max")) for d in _ancestors(root, v2 or "/")]
    for base in (root / "cpu", root / "cpu,cpuacct"):
        if base.is_dir():
            found += [_quota(_read(d / "cpu.cfs_quota_us"), _read(d / "cpu.cfs_period_us"))
                      for d in _ancestors(base, v1 or "/")]
    quotas = [q for q in found if q is not None]
    return min(quotas) if quotas else None


def _ancestors(base: Path, path: str) -> list[Path]:
    """base/a/b, base/a, base for a cgroup path "/a/b" (in a container, often just base)."""
    parts = [p for p in path.split("/") if p]
    return [base.joinpath(*parts[:i]) for i in range(len(parts), -1, -1)]


def usable_cpus() -> int:
    """How many CPUs this process may keep busy at once: its affinity mask, capped by its cgroup's
    CPU quota (rounded down, as Go's automaxprocs does: 1.5 CPUs run one thread unthrottled); at
    least 1. What lmforge sizes its threads and worker processes from, never os.cpu_count()."""
    quota = cgroup_cpu_quota()
    return max(1, min(affinity_cpus(), int(quota) if quota is not None else affinity_cpus()))


def cpu_thread_env(environ: MutableMapping[str, str] | None = None, cpus: int | None = None) -> dict[str, str]:
    """Set (where unset) the variables that size the thread pools of OpenMP (torch's intra-op
    threads, MKL), MKL and tokenizers' Rayon from usable_cpus(), and make idle OpenMP threads sleep
    rather than spin (OMP_WAIT_POLICY=PASSIVE); returns what it set. Read by those libraries when
    they load: before torch is imported."""
    environ = os.environ if environ is None else environ
    cpus = usable_cpus() if cpus is None else cpus
    wanted = {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": str(cpus), "RAYON_NUM_THREADS": str(cpus)}
    if cpus == 1:
        wanted["TOKENIZERS_PARALLELISM"] = "false"
    if affinity_cpus() <= cpus:  # nothing to cap: leave OpenMP's own choice (physical cores, not hyperthreads)
        del wanted["OMP_NUM_THREADS"]
    set_here = {k: v for k, v in wanted.items() if k not in environ}
    environ.update(set_here)
    return set_here


def set_torch_threads(cpus: int | None = None) -> int:
    """Cap torch's intra-op threads at usable_cpus() (torch may already have been imported, with
    OpenMP's count of the machine's cores) unless OMP_NUM_THREADS says otherwise; returns the count."""
    import torch

    cpus = usable_cpus() if cpus is None else cpus
    if "OMP_NUM_THREADS" not in os.environ or os.environ.get("OMP_NUM_THREADS") == str(cpus):
        if torch.get_num_threads() > cpus:
            torch.set_num_threads(cpus)
    return torch.get_num_threads()
