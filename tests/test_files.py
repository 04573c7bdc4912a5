"""What lmforge writes: model directories replace only lmforge's own files, a directory it
did not write is refused, and new files follow the umask."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest
import torch

import lmforge
from lmforge.files import MARKER, Ownership, OwnershipError, atomic_write_text, owned_dir
from lmforge.interop.model_dir import save_model_dir
from lmforge.models import GPTConfig, build


@pytest.fixture
def tiny(tmp_path):
    torch.manual_seed(0)
    model = build(GPTConfig(vocab_size=64, max_seq_len=16, dim=32, n_layers=1, n_heads=2))
    return save_model_dir(tmp_path / "src", model, format="hf")


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmforge", *args], capture_output=True, text=True, timeout=120)


def test_convert_refuses_a_directory_holding_other_files_and_leaves_them(tiny, tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "notes.txt").write_text("mine")
    (project / "checkpoints").mkdir()
    (project / "checkpoints" / "keep.bin").write_bytes(b"x")
    done = _cli("convert", str(tiny), str(project), "--to", "lmforge")
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "not empty and not a model directory" in lines[0] and str(project) in lines[0]
    assert sorted(p.name for p in project.iterdir()) == ["checkpoints", "notes.txt"]
    assert (project / "notes.txt").read_text() == "mine"

    # Asked to overwrite: the model is written beside the user's files, nothing is deleted.
    done = _cli("convert", str(tiny), str(project), "--to", "lmforge", "--overwrite")
    assert done.returncode == 0, done.stderr
    assert (project / "notes.txt").read_text() == "mine" and (project / "checkpoints" / "keep.bin").is_file()
    assert lmforge.load(project).family == "gpt"


def test_save_into_a_run_directory_is_refused(tiny, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "step_00000002").mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(OwnershipError, match="not empty and not a model directory"):
        lmforge.load(tiny).save(run)
    assert (run / "metrics.jsonl").read_text() == '{"step": 1}\n'


def test_replacing_a_model_directory_replaces_its_model_files_and_nothing_else(tiny, tmp_path):
    lm = lmforge.load(tiny)
    dst = lm.save(tmp_path / "dst", format="hf")
    (dst / "README.md").write_text("my notes")
    (dst / "eval").mkdir()
    (dst / "eval" / "scores.csv").write_text("1,2")
    marker = json.loads((dst / MARKER).read_text())
    assert marker["complete"] and "model.safetensors" in marker["files"] and "README.md" not in marker["files"]
    with torch.no_grad():
        lm.model.tok_emb.weight.add_(1.0)
    lm.save(dst, format="hf")
    assert (dst / "README.md").read_text() == "my notes" and (dst / "eval" / "scores.csv").read_text() == "1,2"
    assert torch.equal(lmforge.load(dst).model.tok_emb.weight[:64], lm.model.tok_emb.weight[:64])


def test_lmforges_own_stale_files_go_and_others_stay(tmp_path):
    path = tmp_path / "d"
    with owned_dir(path) as tmp:
        (tmp / "a.txt").write_text("1")
        (tmp / "b.txt").write_text("1")
    (path / "user.txt").write_text("u")
    with owned_dir(path) as tmp:
        (tmp / "a.txt").write_text("2")
    assert sorted(p.name for p in path.iterdir()) == [MARKER, "a.txt", "user.txt"]
    assert (path / "a.txt").read_text() == "2"


def test_a_directory_holding_only_lmforges_files_is_swapped_whole(tmp_path):
    path = tmp_path / "d"
    with owned_dir(path) as tmp:
        (tmp / "old.txt").write_text("1")
    with owned_dir(path) as tmp:
        (tmp / "new.txt").write_text("2")
    assert sorted(p.name for p in path.iterdir()) == [MARKER, "new.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_a_hugging_face_directory_is_adopted_without_deleting_its_other_files(tiny, tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    for name in ("config.json", "model.safetensors"):
        (hf / name).write_bytes((tiny / name).read_bytes())
    (hf / "pytorch_model.bin").write_bytes(b"their weights")
    (tiny / MARKER).unlink()
    lmforge.load(tiny).save(hf, format="hf")
    assert (hf / "pytorch_model.bin").read_bytes() == b"their weights"
    assert set(json.loads((hf / MARKER).read_text())["files"]) >= {"config.json", "model.safetensors"}


def test_a_failed_write_leaves_the_directory_as_it_was(tmp_path):
    path = tmp_path / "d"
    with owned_dir(path) as tmp:
        (tmp / "a.txt").write_text("1")
    with pytest.raises(RuntimeError), owned_dir(path) as tmp:
        (tmp / "a.txt").write_text("2")
        raise RuntimeError("disk on fire")
    assert (path / "a.txt").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_a_model_directory_left_half_written_is_refused_on_load(tiny):
    record = json.loads((tiny / MARKER).read_text())
    (tiny / MARKER).write_text(json.dumps({**record, "complete": False}))
    with pytest.raises(ValueError, match="stopped while writing this model directory"):
        lmforge.load(tiny)


def test_a_foreign_directory_is_refused_by_a_kind_with_its_own_manifest(tmp_path):
    manifest_kind = Ownership(written=lambda p: {"m.json"} if (p / "m.json").is_file() else None, seal=None,
                              what="checkpoint")
    path = tmp_path / "step_00000004"
    path.mkdir()
    (path / "weights.bin").write_bytes(b"someone else's")
    with pytest.raises(OwnershipError, match="not a checkpoint lmforge wrote"), owned_dir(path, manifest_kind) as tmp:
        (tmp / "m.json").write_text("{}")
    assert (path / "weights.bin").read_bytes() == b"someone else's"


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_new_files_and_directories_follow_the_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        atomic_write_text(tmp_path / "f.txt", "x")
        with owned_dir(tmp_path / "d") as tmp:
            (tmp / "g.txt").write_text("y")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "f.txt").stat().st_mode) == 0o666 & ~mask
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o777 & ~mask
    assert stat.S_IMODE((tmp_path / "d" / MARKER).stat().st_mode) == 0o666 & ~mask
