"""The CPUs a process may use: its affinity mask capped by its cgroup's CPU quota (v2 cpu.max,
v1 cfs quota / period, the smallest along the cgroup's path), never os.cpu_count(); and the
thread-pool defaults lmforge derives from them, which a user's own settings override."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmforge import hardware


def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


@pytest.mark.parametrize(("files", "proc", "want"), [
    # cgroup v2 in a container (its own namespace: path "/"): docker --cpus 1.5
    ({"cgroup.controllers": "cpu io", "cpu.max": "150000 100000\n"}, "0::/\n", 1.5),
    # v2 without a quota
    ({"cgroup.controllers": "cpu", "cpu.max": "max 100000\n"}, "0::/\n", None),
    # v2 seen from the host: the quota of a parent slice caps its children
    ({"cgroup.controllers": "cpu", "cpu.max": "max 100000", "jobs/cpu.max": "200000 100000",
      "jobs/a/cpu.max": "max 100000"}, "0::/jobs/a\n", 2.0),
    # v1 (cpu,cpuacct) with a quota of 3 CPUs; the v2 line of a hybrid mount holds no cpu controller
    ({"cpu,cpuacct/cpu.cfs_quota_us": "300000", "cpu,cpuacct/cpu.cfs_period_us": "100000"},
     "4:cpu,cpuacct:/\n0::/\n", 3.0),
    # v1 without a quota (-1)
    ({"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}, "1:cpu:/\n", None),
    # unreadable / garbage
    ({"cgroup.controllers": "cpu", "cpu.max": "lots\n"}, "0::/\n", None),
    ({}, "", None),
])
def test_cgroup_cpu_quota(tmp_path, files, proc, want):
    root = _tree(tmp_path / "cg", files)
    (tmp_path / "cgroup").write_text(proc)
    assert hardware.cgroup_cpu_quota(root, tmp_path / "cgroup") == want


@pytest.mark.parametrize(("affinity", "quota", "want"), [(64, 2.0, 2), (64, 1.5, 1), (4, None, 4), (2, 8.0, 2),
                                                         (8, 0.5, 1)])
def test_usable_cpus_is_affinity_capped_by_the_quota(monkeypatch, affinity, quota, want):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(affinity)))
    monkeypatch.setattr(os, "cpu_count", lambda: 128)  # never what decides
    monkeypatch.setattr(hardware, "cgroup_cpu_quota", lambda: quota)
    assert hardware.usable_cpus() == want


def test_thread_env_defaults_leave_the_users_settings(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert hardware.cpu_thread_env(env, cpus=2) == {"OMP_NUM_THREADS": "2", "RAYON_NUM_THREADS": "2"}
    assert env["OMP_WAIT_POLICY"] == "ACTIVE"
    env = {}
    hardware.cpu_thread_env(env, cpus=1)
    assert env == {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1", "RAYON_NUM_THREADS": "1",
                   "TOKENIZERS_PARALLELISM": "false"}
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    env = {}
    hardware.cpu_thread_env(env, cpus=2)  # nothing to cap: OpenMP's own count (physical cores)
    assert "OMP_NUM_THREADS" not in env and env["OMP_WAIT_POLICY"] == "PASSIVE"


def test_importing_lmforge_sets_them_before_torch_loads():
    """A fresh interpreter pinned to one CPU: lmforge's import gives torch one thread and passive
    OpenMP waits; a user's OMP_NUM_THREADS wins."""
    if not hasattr(os, "sched_setaffinity"):
        pytest.skip("no affinity masks on this platform")
    code = ("import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); import lmforge, torch; "
            "print(torch.get_num_threads(), os.environ['OMP_WAIT_POLICY'], os.environ['TOKENIZERS_PARALLELISM'])")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY",
                                                            "TOKENIZERS_PARALLELISM", "RAYON_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["1", "PASSIVE", "false"]
    out = subprocess.run([sys.executable, "-c", code], env={**env, "OMP_NUM_THREADS": "2"}, capture_output=True,
                         text=True, check=True).stdout
    assert out.split()[0] == "2"  # more threads than CPUs: the user asked
