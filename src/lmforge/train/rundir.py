"""A run directory: one run at a time in it, and never another run's files touched.

    out_dir/
      run.json           {"run_id", "created", "command", "files": [...], "history": [...]}
      .lmforge.lock      locked (flock) for the life of the run; names the holder
      previous/RUN_ID/   earlier runs, moved aside whole by a fresh run
      config.yaml, metrics.jsonl, tb/, checkpoints/, model/, ...   what this run wrote

Rules:
- Lock: a second run into a directory that a live run holds exits at once (RunDirError,
  exit 2), naming the holder (pid, host, command, since when). The kernel drops the lock
  when the holder dies, SIGKILL included, so a killed run never blocks its own resume.
- Fresh run over an old one: the old run's files (those its run.json lists; for a run
  written before run.json existed, the names lmforge writes) move to previous/RUN_ID/,
  nothing is deleted, so `resume auto` can never continue the old run by mistake and no
  pruning ever reaches its checkpoints. Files lmforge did not write stay where they are.
- Resume: the same run continues (its run_id), and run.json's history records it.

Under torchrun rank 0 holds the lock and writes; the other ranks learn the outcome from it.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import secrets
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.dist import parallel
from lmforge.files import atomic_write_json

RUN_FILE = "run.json"
LOCK_FILE = ".lmforge.lock"
PREVIOUS = "previous"
# What runs wrote into their directory before run.json listed it (moved aside the same way).
LEGACY_FILES = ("config.yaml", "metrics.jsonl", "tb", "loss.png", "checkpoints", "model", "metrics.json",
                "predictions.jsonl", "report.md", "finetune.yaml", "confusion_matrix.png", "data", "tokenizer")


class RunDirError(ValueError):
    """The run directory is held by another live run, or cannot be used; the message names it."""


@dataclass
class RunDir:
    """An open run directory (see the module docstring). Only rank 0's has a lock."""

    path: Path
    run_id: str
    main: bool
    lock_fd: int | None = None
    depth: int = 1

    def record(self, *names: str) -> None:
        """Note top-level entries this run wrote (a fresh run moves exactly these aside)."""
        if not self.main:
            return
        info = _read(self.path)
        new = sorted(set(info.get("files", [])) | set(names))
        if new != info.get("files"):
            atomic_write_json(self.path / RUN_FILE, {**info, "files": new})

    def event(self, event: str, **details: Any) -> None:
        """Append to run.json's history (start, resume, config changes, ...)."""
        if self.main:
            info = _read(self.path)
            history = [*info.get("history", []), {"event": event, "time": _now(), **details}]
            atomic_write_json(self.path / RUN_FILE, {**info, "history": history})


_OPEN: dict[str, RunDir] = {}  # resolved path -> the run this process has open there


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def _read(path: Path) -> dict[str, Any]:
    try:
        info = json.loads((path / RUN_FILE).read_text())
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}


def _lock(path: Path) -> int:
    """Take the run lock (exclusive, not waiting); RunDirError naming the holder when taken."""
    path.mkdir(parents=True, exist_ok=True)
    fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
        except ValueError:
            holder = {}
        os.close(fd)
        raise RunDirError(
            f"{path}: another lmforge run is using this directory (pid {holder.get('pid', '?')} on "
            f"{holder.get('host', '?')}, `{holder.get('command', '?')}`, since {holder.get('since', '?')}); "
            "wait for it to finish or choose another output directory") from None
    holder = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": _now(),
                         "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:500]}).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, holder, 0)
    return fd


def holds_run(path: Path) -> bool:
    """Does `path` hold files of an earlier run: run.json, or (written before run.json existed)
    metrics.jsonl or a checkpoint with lmforge's manifest?"""
    return ((path / RUN_FILE).is_file() or (path / "metrics.jsonl").is_file()
            or any((path / "checkpoints").glob("step_*/manifest.json")))


def move_aside(path: Path) -> Path | None:
    """Move the earlier run's files in `path` into previous/RUN_ID/; returns where (None: nothing to move)."""
    info = _read(path)
    names = info.get("files", []) + [RUN_FILE] if info else list(LEGACY_FILES)
    present = [n for n in dict.fromkeys(names) if n and "/" not in n and n not in (PREVIOUS, LOCK_FILE)
               and (path / n).exists()]
    if not present:
        return None
    old_id = info.get("run_id") or "run-" + datetime.datetime.fromtimestamp(
        min((path / n).stat().st_mtime for n in present)).strftime("%Y%m%d-%H%M%S")
    target = path / PREVIOUS / old_id
    while target.exists():
        target = target.with_name(f"{old_id}-{secrets.token_hex(2)}")
    target.mkdir(parents=True)
    for name in present:
        os.replace(path / name, target / name)
    return target


@contextlib.contextmanager
def open_run(out_dir: str | os.PathLike, *, fresh: bool, main: bool = True) -> Iterator[RunDir]:
    """Hold `out_dir` for a run (see the module docstring). fresh: start a new run (an earlier
    one there is moved aside), else continue the one there. Opening a directory this process
    already holds joins that run (quickstart -> pretrain -> train)."""
    path = Path(out_dir)
    key = str(path.resolve())
    if key in _OPEN:
        run = _OPEN[key]
        run.depth += 1
        try:
            yield run
        finally:
            run.depth -= 1
        return
    run, error = None, None
    if main:
        try:
            run = _start(path, fresh)
        except (RunDirError, OSError) as e:
            error = f"{path}: {e}" if isinstance(e, OSError) else str(e)
    outcome = parallel.gather_objects((error, run.run_id if run else None))[0]  # rank 0's decision for all
    if outcome[0] is not None:
        raise RunDirError(outcome[0])
    run = run or RunDir(path, outcome[1], main=False)
    _OPEN[key] = run
    try:
        yield run
    finally:
        del _OPEN[key]
        if run.lock_fd is not None:
            os.close(run.lock_fd)  # releases the lock


def _start(path: Path, fresh: bool) -> RunDir:
    fd = _lock(path)
    try:
        info = _read(path)
        moved = move_aside(path) if fresh and holds_run(path) else None
        if fresh or not info.get("run_id"):
            info = {"run_id": datetime.datetime.now().strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(2),
                    "created": _now(), "files": [], "history": []}
            if moved is not None:
                info["history"].append({"event": "moved_previous_run", "to": str(moved.relative_to(path)),
                                        "time": _now()})
            atomic_write_json(path / RUN_FILE, info)
        return RunDir(path, info["run_id"], main=True, lock_fd=fd)
    except BaseException:
        os.close(fd)
        raise


def current(out_dir: str | os.PathLike) -> RunDir | None:
    """The run this process holds in `out_dir`, if any."""
    return _OPEN.get(str(Path(out_dir).resolve()))


def record(out_dir: str | os.PathLike, *names: str) -> None:
    """Note entries written into `out_dir` by the run this process holds there (no-op otherwise)."""
    run = current(out_dir)
    if run is not None:
        run.record(*names)


def starts_fresh(resume: str, out_dir: str | os.PathLike) -> bool:
    """Will `resume` start a new run in out_dir? none: yes; auto: when out_dir/checkpoints holds
    no sealed checkpoint; a checkpoint path: when it is not one of out_dir's own."""
    out = Path(out_dir)
    if resume == "none":
        return True
    root = out / "checkpoints"
    if resume == "auto":
        return not (root.is_dir() and any((p / "manifest.json").is_file() for p in root.glob("step_*")))
    return Path(resume).resolve().parent != root.resolve()
