"""Writing to disk so that a crash never leaves a half-written file or directory, and
lmforge never deletes what it did not write.

Files: write beside the destination, flush to disk, then rename over it (atomic on POSIX).
New files and directories get the permissions the user's umask gives (0644 / 0755 under
the usual 022), not the 0600 / 0700 of temporary files.

Directories lmforge owns (a model directory, a checkpoint, prepared data) are written by
`owned_dir`: built under a temporary name, then put in place. What lmforge wrote there is
recorded (a marker file listing it, or the directory's own manifest), so that writing the
directory again replaces those files and nothing else:

    empty or absent              the new directory is renamed into place
    holds only lmforge's files   swapped whole: the old one is renamed away, then removed
    holds other files too        only lmforge's files are replaced (each by rename), the
                                 others are left as they are
    not lmforge's at all         refused (OwnershipError), unless the caller adopts it (a
                                 Hugging Face model directory: its same-named files may be
                                 replaced) or the user asks to overwrite (nothing is deleted)
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

MARKER = ".lmforge-files.json"  # {"files": [...], "complete": bool}: what lmforge wrote in this directory


class OwnershipError(ValueError):
    """Writing would replace or delete files lmforge did not write; the message names the directory."""


# ----------------------------------------------------------------------------- permissions


def current_umask() -> int:
    """The process's umask, read without changing it where Linux shows it (/proc), else by setting and restoring."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _follow_umask(path: str | os.PathLike, directory: bool = False) -> None:
    """mkstemp / mkdtemp create 0600 / 0700: give the permissions a plain open / mkdir would."""
    os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# ----------------------------------------------------------------------------- files


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path beside `path` for a writer that wants a path (e.g.
    matplotlib's savefig); on success it is flushed to disk and renamed onto `path`, on an
    exception deleted. Creates the parent directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        _follow_umask(tmp)
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: object) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


# ----------------------------------------------------------------------------- directories lmforge owns


def _listing(root: Path) -> set[str]:
    """Every file under root, as relative POSIX paths."""
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() or p.is_symlink()}


def marker_files(path: Path) -> set[str] | None:
    """The files lmforge's marker says it wrote in `path` (the marker included); None without one."""
    try:
        record = json.loads((path / MARKER).read_text())
        return {*record["files"], MARKER}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def marker_complete(path: str | os.PathLike) -> bool:
    """False only when a marker says lmforge was still writing the directory (it was stopped mid-way)."""
    try:
        return bool(json.loads((Path(path) / MARKER).read_text()).get("complete", True))
    except (OSError, ValueError, AttributeError):
        return True


def _write_marker(directory: Path, files: set[str], complete: bool) -> None:
    atomic_write_json(directory / MARKER, {"files": sorted(files - {MARKER}), "complete": complete})


@dataclass(frozen=True)
class Ownership:
    """How a kind of directory records what lmforge wrote in it.

    written: path -> the relative files lmforge wrote there, or None when it is not lmforge's.
    seal: records the new directory's files in it (the marker); None when the directory's own
        manifest already does (a checkpoint's manifest.json, prepared data's meta.json).
    adopt: path -> True when a directory lmforge did not write may still have its same-named
        files replaced (a Hugging Face model directory): nothing in it is deleted.
    what: how errors name the kind ("model directory").
    """

    written: Callable[[Path], set[str] | None] = marker_files
    seal: Callable[[Path, set[str], bool], None] | None = _write_marker
    adopt: Callable[[Path], bool] = lambda path: False
    what: str = "directory"


@contextlib.contextmanager
def owned_dir(path: str | os.PathLike, ownership: Ownership = Ownership(), *,
              overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside `path` to write into; on success put its files in
    place as the module docstring says. On an exception (or a refusal) the temporary directory
    is removed and `path` is untouched. overwrite: write into a directory that is not
    lmforge's, replacing same-named files (nothing else is touched)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OwnershipError(f"{path}: exists and is not a directory")
    check_writable(path, ownership, overwrite=overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        _follow_umask(tmp, directory=True)
        yield tmp
        new = _listing(tmp)
        if ownership.seal is not None:
            ownership.seal(tmp, new, True)
            new.add(MARKER)
        for name in new:
            with open(tmp / name, "rb") as fh:
                os.fsync(fh.fileno())
        check_writable(path, ownership, overwrite=overwrite)  # again: the directory may have changed meanwhile
        if not path.exists() or not any(path.iterdir()):
            with contextlib.suppress(FileNotFoundError):
                path.rmdir()
            os.replace(tmp, path)
        else:
            ours = ownership.written(path) or set()
            if not (_listing(path) - ours) and not _other_dirs(path, ours):
                _swap(tmp, path)
            else:
                _merge(tmp, path, new, ours, ownership)
        _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_writable(path: str | os.PathLike, ownership: Ownership = Ownership(), *, overwrite: bool = False) -> None:
    """Raise OwnershipError when `owned_dir(path)` would refuse: `path` holds files and is
    neither lmforge's nor adopted, and overwrite is off. Callers check early (before hours of
    training) as well as at the write."""
    path = Path(path)
    if overwrite or not path.is_dir() or not any(path.iterdir()):
        return
    if ownership.written(path) is not None or ownership.adopt(path):
        return
    shown = ", ".join(sorted(p.name for p in path.iterdir())[:4])
    raise OwnershipError(f"{path}: not empty and not a {ownership.what} lmforge wrote (holds {shown}, ...); "
                         "choose another directory, or ask to overwrite (same-named files are replaced, "
                         "nothing else is touched)")


def _other_dirs(path: Path, ours: set[str]) -> bool:
    """Empty directories lmforge does not know of (a file listing misses them)."""
    parents = {str(Path(f).parent) for f in ours}
    return any(d.is_dir() and not any(d.iterdir()) and d.relative_to(path).as_posix() not in parents
               for d in path.rglob("*"))


def _swap(tmp: Path, path: Path) -> None:
    """Replace a directory that holds only lmforge's files by the new one, whole."""
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def _merge(tmp: Path, path: Path, new: set[str], ours: set[str], ownership: Ownership) -> None:
    """Put the new files into a directory that also holds files lmforge did not write: each
    new file replaces its namesake by rename, lmforge's old files not written again are
    removed, nothing else is touched. The marker says "incomplete" while this goes on."""
    if ownership.seal is not None:
        ownership.seal(path, (ours | new) - {MARKER}, False)
    for name in sorted(new - {MARKER}):
        target = path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp / name, target)
    for name in sorted(ours - new):
        with contextlib.suppress(FileNotFoundError):
            (path / name).unlink()
    if ownership.seal is not None:
        os.replace(tmp / MARKER, path / MARKER)
    shutil.rmtree(tmp, ignore_errors=True)
