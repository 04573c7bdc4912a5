"""Checkpoints that resume a run exactly and survive being killed while written.

    out_dir/checkpoints/step_00001000/          written by one process
        model.safetensors   weights; each tied tensor stored once (metadata "tied" lists the aliases)
        optimizer.pt        AdamW state (keyed by parameter name), scheduler, grad scaler
        trainer.pt          step, tokens seen, best metric, and per process: RNG states
                            (python, numpy, torch, CUDA) and the data loader's position
        config.yaml         the resolved RunConfig
        manifest.json       written last: step, metrics, world_size, and the size and sha256 of every file

    out_dir/checkpoints/step_00001000/          written by several processes (torchrun)
        dcp/                torch.distributed.checkpoint: model and AdamW state, each process
                            writing its own shards (.metadata last, by rank 0)
        optimizer.pt        scheduler, grad scaler
        trainer.pt, config.yaml, manifest.json   as above (rank 0), the manifest listing every shard

Either kind resumes on any number of processes: DCP reshards on load, and a single file is
loaded whole by each process (see lmforge.train.loop for the data position and RNG).

The directory is assembled under a temporary name, every file fsynced, then renamed
into place: a SIGKILL leaves either the whole checkpoint or none. Under torchrun rank 0
owns the temporary directory, the other processes write their shards into it, and only
when every process has finished (and sent the sha256 of its shards) does rank 0 write the
manifest and rename. The manifest catches the rest (a truncated copy, a flipped bit):
`verify` names the bad file, and `latest_good` steps back to the previous checkpoint.

.pt files hold only tensors and plain Python values and load with weights_only=True.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from lmforge.config import RunConfig, save_config
from lmforge.dist import parallel
from lmforge.dist import state as dist_state
from lmforge.files import Ownership, atomic_write_json, owned_dir

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SHARDS = "dcp"  # the torch.distributed.checkpoint directory of a checkpoint written by several processes
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete or corrupt; the message names the file."""


@dataclass
class Checkpoint:
    """What `load` returns: everything `save` wrote."""

    path: Path
    step: int
    model: dict[str, Tensor]
    optimizer: dict[str, Any]
    trainer: dict[str, Any]
    manifest: dict[str, Any]


def _written(path: Path) -> set[str] | None:
    """The files of a checkpoint lmforge wrote (its manifest lists them); None: not one of lmforge's."""
    try:
        return {MANIFEST, *json.loads((path / MANIFEST).read_text())["files"]}
    except (OSError, ValueError, KeyError, TypeError):
        return None


CHECKPOINT = Ownership(written=_written, seal=None, what="checkpoint")


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


# ----------------------------------------------------------------------------- RNG


def rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """Every random generator a step may draw from: python, numpy, torch CPU, and this
    process's CUDA device."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                    gauss], "torch": torch.get_rng_state()}
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device | None = None) -> None:
    random.setstate(_tuples(state["python"]))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if device is not None and device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _tuples(obj: Any) -> Any:
    """random.setstate needs tuples where a round trip may have produced lists."""
    return tuple(_tuples(x) for x in obj) if isinstance(obj, (list, tuple)) else obj


def _saveable(obj: Any) -> Any:
    """numpy values (which weights_only loading refuses) as tensors / Python scalars."""
    if isinstance(obj, dict):
        return {k: _saveable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_saveable(v) for v in obj)
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


# ----------------------------------------------------------------------------- weights


def tied_aliases(model: nn.Module) -> dict[str, str]:
    """{alias: canonical} for parameters shared under several names (a tied LM head):
    the first name in registration order is canonical (lmforge.models.weights agrees)."""
    first: dict[int, str] = {}
    aliases = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            aliases[name] = first[id(p)]
        else:
            first[id(p)] = name
    return aliases


def save_weights(state: dict[str, Tensor], path: Path, aliases: dict[str, str]) -> None:
    """A state dict as safetensors, each alias left out (stored once, under its canonical name)."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items() if k not in aliases}
    try:
        save_file(tensors, str(path), metadata={"format": "pt", "tied": json.dumps(aliases)})
    except SafetensorError as e:  # safetensors reports a full disk as its own error type
        if "No space left" in str(e) or "os error 28" in str(e):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from None
        raise


def load_weights(path: str | Path) -> dict[str, Tensor]:
    """A state dict from `save_weights`, aliases restored (pointing at the same tensor)."""
    path = Path(path)
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            aliases = json.loads((f.metadata() or {}).get("tied", "{}"))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({e})") from None
    for alias, canonical in aliases.items():
        tensors[alias] = tensors[canonical]
    return tensors


# ----------------------------------------------------------------------------- save / verify / load


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def save(root: str | Path, step: int, *, model_state: dict[str, Tensor], aliases: dict[str, str],
         optimizer_state: dict[str, Any], trainer_state: dict[str, Any], config: RunConfig | None = None,
         metrics: dict[str, float] | None = None, extra: Callable[[Path], None] | None = None,
         run_id: str | None = None) -> Path:
    """Write checkpoint `step` under root atomically; returns its directory.

    metrics: validation metrics measured at this step (they rank checkpoints for keep_best).
    extra: writes more files into the directory before it is sealed (a tokenizer, an export).
    run_id: the run writing it (lmforge.train.rundir); pruning only ever touches its own run's.
    A step directory there that lmforge did not write is refused, not replaced.
    """
    path = step_dir(root, step)
    with owned_dir(path, CHECKPOINT) as tmp:
        save_weights(model_state, tmp / "model.safetensors", aliases)
        _finish(tmp, step, optimizer_state, trainer_state, config, metrics, extra, run_id, {})
    return path


def _finish(tmp: Path, step: int, optimizer_state: dict[str, Any], trainer_state: dict[str, Any],
            config: RunConfig | None, metrics: dict[str, float] | None, extra: Callable[[Path], None] | None,
            run_id: str | None, hashed: dict[str, dict[str, Any]]) -> None:
    """Everything but the weights, then the manifest (files already in `hashed` are not read again)."""
    torch.save(_saveable(optimizer_state), tmp / "optimizer.pt")
    torch.save(_saveable(trainer_state), tmp / "trainer.pt")
    if config is not None:
        save_config(config, tmp / "config.yaml")
    if extra is not None:
        extra(tmp)
    files = {}
    for f in sorted(tmp.rglob("*")):
        name = f.relative_to(tmp).as_posix()
        if f.is_file():
            files[name] = hashed.get(name) or _describe(f)
    atomic_write_json(tmp / MANIFEST, {"format_version": FORMAT_VERSION, "step": step, "run_id": run_id,
                                       "world_size": trainer_state.get("world_size", 1), "metrics": metrics or {},
                                       "files": files})


def _describe(f: Path) -> dict[str, Any]:
    return {"bytes": f.stat().st_size, "sha256": _sha256(f)}


def save_sharded(root: str | Path, step: int, *, state: dict[str, Any], optimizer_state: dict[str, Any],
                 trainer_state: dict[str, Any], config: RunConfig | None = None,
                 metrics: dict[str, float] | None = None, extra: Callable[[Path], None] | None = None,
                 run_id: str | None = None) -> Path:
    """`save` for a run of several processes (collective: every process calls it).

    state: `lmforge.dist.state.sharded_state` (model and AdamW state, this process's shards);
    optimizer_state: the scheduler's and grad scaler's (rank 0's is written); the rest as in
    `save`. Rank 0 owns the temporary directory; each process writes and hashes its shards;
    rank 0 writes the rest and the manifest, then renames. A failure on any process raises on
    every process (an OSError keeps its errno: a full disk is still ENOSPC), and leaves the
    previous checkpoints as they were."""
    path = step_dir(root, step)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    with contextlib.ExitStack() as stack:
        tmp, failure = None, None
        if rank == 0:
            try:
                tmp = stack.enter_context(owned_dir(path, CHECKPOINT))
            except Exception as e:  # noqa: BLE001 (every process must learn of it)
                failure = e
        where = parallel.broadcast_object(None if tmp is None else str(tmp))
        if where is None:
            raise failure or CheckpointError(f"{path}: rank 0 could not start writing the checkpoint")
        tmp = Path(where)
        try:
            dist_state.save_sharded(state, tmp / SHARDS)  # raises on every process when one fails
        except Exception as e:  # noqa: BLE001
            code = _errno_of(e)
            if code is not None and not isinstance(e, OSError):
                raise OSError(code, os.strerror(code), f"{tmp / SHARDS}: {e}") from e
            raise
        mine, failure = {}, None
        try:
            shards = sorted(f for f in (tmp / SHARDS).rglob("*") if f.is_file())
            mine = {f.relative_to(tmp).as_posix(): _describe(f) for f in shards[rank::world]}
        except OSError as e:
            failure = e
        reports = parallel.gather_objects((mine, _report(failure)))
        _raise_reported([r for _, r in reports], failure)
        if rank == 0:
            try:
                with stack.pop_all():  # sealed and renamed into place when this block ends without an error
                    hashed = {k: v for part, _ in reports for k, v in part.items()}
                    _finish(tmp, step, optimizer_state, trainer_state, config, metrics, extra, run_id, hashed)
            except Exception as e:  # noqa: BLE001
                failure = e
        _raise_reported([parallel.broadcast_object(_report(failure))], failure)
    return path


def _report(e: BaseException | None) -> tuple[int | None, str] | None:
    return None if e is None else (_errno_of(e), f"{type(e).__name__}: {e}")


def _raise_reported(reports: list[tuple[int | None, str] | None], own: BaseException | None) -> None:
    """Raise this process's own failure, else the first reported one (an OSError keeps its
    errno: a full disk is ENOSPC on every process)."""
    if own is not None:
        raise own
    for report in reports:
        if report is not None:
            code, text = report
            if code is not None:
                raise OSError(code, os.strerror(code), text)
            raise CheckpointError(f"writing the checkpoint failed on another process: {text}")


def _errno_of(e: BaseException | None, depth: int = 0) -> int | None:
    """The errno of an OSError, also of one DCP wrapped in its CheckpointException."""
    if e is None or depth > 4:
        return None
    if isinstance(e, OSError) and e.errno is not None:
        return e.errno
    for inner in getattr(e, "failures", {}).values():  # DCP: {rank: WrappedException(exc, traceback)}
        code = _errno_of(getattr(inner, "exc", inner), depth + 1)
        if code is not None:
            return code
    return _errno_of(e.__cause__ or e.__context__, depth + 1)


def verify(path: str | Path) -> dict[str, Any]:
    """The manifest of a complete, intact checkpoint; CheckpointError naming the first
    missing, truncated or altered file otherwise."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    manifest_path = path / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except FileNotFoundError:
        raise CheckpointError(f"{manifest_path}: missing (the checkpoint was not completely written)") from None
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{manifest_path}: unreadable manifest ({e})") from None
    for name, meta in files.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{f}: missing from the checkpoint")
        if f.stat().st_size != meta["bytes"]:
            raise CheckpointError(f"{f}: truncated or altered ({f.stat().st_size} bytes, expected {meta['bytes']})")
        if _sha256(f) != meta["sha256"]:
            raise CheckpointError(f"{f}: corrupt (sha256 does not match the manifest)")
    return manifest


def _load_pt(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (pickle raises many types; each means "unreadable")
        raise CheckpointError(f"{path}: unreadable ({type(e).__name__}: {e})") from None


def is_sharded(path: str | Path) -> bool:
    """Was the checkpoint written by several processes (torch.distributed.checkpoint shards)?"""
    return (Path(path) / SHARDS / ".metadata").is_file()


def world_size(path: str | Path) -> int:
    """How many processes wrote the checkpoint (its manifest says; older ones: trainer.pt)."""
    manifest = _manifest(Path(path)) or {}
    if "world_size" in manifest:
        return int(manifest["world_size"])
    return int(_load_pt(Path(path) / "trainer.pt").get("world_size", 1))


def model_weights(path: str | Path) -> dict[str, Tensor]:
    """The whole model state dict of a (verified) checkpoint of either kind, on the CPU."""
    path = Path(path)
    if is_sharded(path):
        try:
            return dist_state.read_sharded_model(path / SHARDS)
        except Exception as e:  # noqa: BLE001 (DCP's reader raises many types; each means "unreadable")
            raise CheckpointError(f"{path / SHARDS}: unreadable shards ({type(e).__name__}: {e})") from None
    return load_weights(path / "model.safetensors")


def load(path: str | Path) -> Checkpoint:
    """Verify, then read every part of a checkpoint onto the CPU (a sharded one's model
    gathered whole; its AdamW state stays in the shards: `lmforge.dist.state.load_sharded`)."""
    path = Path(path)
    manifest = verify(path)
    return Checkpoint(path, int(manifest["step"]), model_weights(path), _load_pt(path / "optimizer.pt"),
                      _load_pt(path / "trainer.pt"), manifest)


def load_state(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(trainer state, optimizer.pt) of a verified checkpoint, without its weights."""
    return _load_pt(Path(path) / "trainer.pt"), _load_pt(Path(path) / "optimizer.pt")


def list_checkpoints(root: str | Path) -> list[Path]:
    """Sealed checkpoint directories under root, oldest first (temporary ones are ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_good(root: str | Path) -> Path | None:
    """The newest checkpoint that verifies; a bad one is reported and skipped."""
    for path in reversed(list_checkpoints(root)):
        try:
            verify(path)
            return path
        except CheckpointError as e:
            log.warning("skipping checkpoint %s: %s", path.name, e)
    return None


def resolve_resume(resume: str, root: str | Path) -> Path | None:
    """train.resume -> the checkpoint to start from: "auto" the latest good one under root
    (None when there is none), "none" None, else that directory, which must verify."""
    if resume == "none":
        return None
    if resume == "auto":
        return latest_good(root)
    verify(resume)
    return Path(resume)


def _manifest(path: Path) -> dict[str, Any] | None:
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        return manifest if isinstance(manifest, dict) else None
    except (OSError, ValueError):
        return None


def run_checkpoints(root: str | Path, run_id: str | None) -> list[Path]:
    """The checkpoints under root that lmforge wrote for run `run_id` (or, for checkpoints
    written before runs had ids, with no run id), oldest first. Anything else is not the
    run's to delete: another run's checkpoints, a directory lmforge did not write."""
    found = []
    for p in list_checkpoints(root):
        manifest = _manifest(p)
        if manifest is not None and manifest.get("run_id") in (run_id, None):
            found.append(p)
    return found


def _delete(path: Path) -> None:
    doomed = path.with_name(f".{path.name}.deleting")  # renamed first: never a half-deleted step_ dir
    path.rename(doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def prune(root: str | Path, keep_last: int, *, keep_best: bool = False, metric: str = "val_loss",
          mode: str = "min", run_id: str | None = None) -> list[Path]:
    """Delete all but the `keep_last` newest of run `run_id`'s checkpoints and (keep_best) the
    one whose manifest has the best `metric`. Returns the deleted directories."""
    paths = run_checkpoints(root, run_id)
    keep = set(paths[-keep_last:])
    if keep_best:
        scored = []
        for p in paths:
            value = ((_manifest(p) or {}).get("metrics") or {}).get(metric)
            if isinstance(value, int | float):
                scored.append((value if mode == "min" else -value, p))
        if scored:
            keep.add(min(scored, key=lambda x: x[0])[1])
    removed = [p for p in paths if p not in keep]
    for p in removed:
        _delete(p)
    return removed


def remove_run_checkpoints(root: str | Path, run_id: str | None) -> None:
    """Delete run `run_id`'s checkpoints (a finished fine-tuning run that keeps none), and root
    when nothing else is left in it."""
    for p in run_checkpoints(root, run_id):
        _delete(p)
    with contextlib.suppress(OSError):
        Path(root).rmdir()  # only when empty


def remove_stale_temporaries(root: str | Path) -> None:
    """Remove what a killed writer left: .step_*.tmp, .step_*.old-PID and .step_*.deleting directories."""
    root = Path(root)
    if root.is_dir():
        for p in root.iterdir():
            leftover = p.name.endswith((".tmp", ".deleting")) or ".old-" in p.name
            if p.is_dir() and p.name.startswith(".step_") and leftover:
                shutil.rmtree(p, ignore_errors=True)
