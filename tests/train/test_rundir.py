"""Run directories: one run at a time, a fresh run never touches an earlier one's files,
resuming checks the configuration, and pruning never reaches what another run (or the
user) put there."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lmforge.cli import main
from lmforge.config import load_config
from lmforge.pretrain import pretrain
from lmforge.train.checkpoint import CheckpointError
from lmforge.train.logging import read_records

TINY = {"dim": 32, "n_layers": 2, "n_heads": 2, "vocab_size": 96}


def _config(out: Path, **overrides):
    base = {"train.out_dir": str(out), "train.device": "cpu", "train.precision": "fp32", "train.max_steps": 4,
            "train.micro_batch_size": 2, "train.resume": "auto", "data.seq_len": 16, "data.synthetic": True,
            "model.preset": "gpt-tiny", "model.overrides": TINY, "log.every": 1, "log.progress": False,
            "log.tensorboard": False, "log.plot": False, "log.peak_flops": 1e12, "eval.every": 0,
            "checkpoint.every": 2, "checkpoint.keep_last": 2, "checkpoint.keep_best": False,
            "optim.warmup_steps": 0}
    return load_config(None, {**base, **overrides})


def _steps(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("step_"))


def test_a_fresh_run_moves_an_older_longer_run_aside_and_keeps_its_own_checkpoints(tmp_path):
    out = tmp_path / "run"
    old = pretrain(_config(out, **{"train.max_steps": 8}))
    assert _steps(out / "checkpoints") == ["step_00000006", "step_00000008"]
    old_id = json.loads((out / "run.json").read_text())["run_id"]

    new = pretrain(_config(out, **{"train.max_steps": 4, "train.resume": "none"}))
    assert _steps(out / "checkpoints") == ["step_00000002", "step_00000004"]  # pruning kept the new run's
    assert Path(new["checkpoint"]).is_dir() and new["checkpoint"].endswith("step_00000004")
    moved = out / "previous" / old_id
    assert _steps(moved / "checkpoints") == ["step_00000006", "step_00000008"]
    assert Path(old["checkpoint"].replace(str(out), str(moved))).is_dir()
    assert [r["step"] for r in read_records(moved / "metrics.jsonl")][-1] == 8
    assert [r["step"] for r in read_records(out / "metrics.jsonl") if "train_loss" in r] == [1, 2, 3, 4]
    info = json.loads((out / "run.json").read_text())
    assert info["run_id"] != old_id and info["history"][0]["event"] == "moved_previous_run"
    assert {"config.yaml", "checkpoints", "metrics.jsonl", "model"} <= set(info["files"])

    # `resume auto` now continues the new run, never the old one, and re-exports the new run's model.
    more = pretrain(_config(out, **{"train.max_steps": 6}))
    assert more["step"] == 6 and [e["event"] for e in json.loads((out / "run.json").read_text())["history"]][-1] \
        == "resume"
    assert json.loads((out / "run.json").read_text())["history"][-1]["step"] == 4
    assert _steps(moved / "checkpoints") == ["step_00000006", "step_00000008"]  # untouched


def test_pruning_and_export_leave_what_lmforge_did_not_write(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints" / "step_00000001").mkdir(parents=True)
    (out / "checkpoints" / "step_00000001" / "mine.pt").write_bytes(b"user's")
    (out / "model").mkdir()
    (out / "model" / "config.json").write_text("{}")  # a model directory the user keeps here
    (out / "model" / "NOTES.md").write_text("keep me")
    result = pretrain(_config(out, **{"train.max_steps": 6, "checkpoint.keep_last": 1, "train.resume": "none"}))
    assert _steps(out / "checkpoints") == ["step_00000001", "step_00000006"]
    assert (out / "checkpoints" / "step_00000001" / "mine.pt").read_bytes() == b"user's"
    assert (out / "model" / "NOTES.md").read_text() == "keep me" and result["step"] == 6
    assert json.loads((out / "model" / "config.json").read_text())["model_type"] == "gpt2"


def test_a_checkpoint_is_never_written_over_a_directory_lmforge_did_not_write(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints" / "step_00000002").mkdir(parents=True)
    (out / "checkpoints" / "step_00000002" / "x").write_text("user's")
    with pytest.raises(ValueError, match="step_00000002: not empty and not a checkpoint lmforge wrote"):
        pretrain(_config(out, **{"train.resume": "none"}))
    assert (out / "checkpoints" / "step_00000002" / "x").read_text() == "user's"


HOLDER = """
import sys, time
from lmforge.train import rundir
with rundir.open_run(sys.argv[1], fresh=True):
    print("holding", flush=True)
    time.sleep(60)
"""


def test_a_second_run_into_a_held_directory_exits_2_naming_the_holder(tmp_path, capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        config = tmp_path / "run.yaml"
        config.write_text(yaml.safe_dump(_config(out).to_dict()))
        with pytest.raises(SystemExit) as exit_:
            main(["pretrain", "--config", str(config)])
        assert exit_.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "another lmforge run is using this directory" in err[0]
        assert f"pid {holder.pid}" in err[0]
        assert not (out / "checkpoints").exists()
    finally:
        holder.kill()
        holder.wait()
    # The lock went with its holder (killed, not closed): the directory is usable at once.
    assert pretrain(_config(out))["step"] == 4


def test_resume_with_changed_training_settings_is_refused_naming_both_values(tmp_path):
    out = tmp_path / "run"
    pretrain(_config(out, **{"optim.lr": 1e-3}))
    with pytest.raises(CheckpointError, match=r"data\.seq_len 16 -> 8; optim\.lr 0\.001 -> 0\.002"):
        pretrain(_config(out, **{"optim.lr": 2e-3, "data.seq_len": 8, "train.max_steps": 6}))
    assert _steps(out / "checkpoints") == ["step_00000002", "step_00000004"]  # nothing trained, nothing written


def test_accepted_changes_apply_and_are_recorded(tmp_path):
    out = tmp_path / "run"
    pretrain(_config(out, **{"optim.lr": 1e-3, "optim.schedule": "constant"}))
    pretrain(_config(out, **{"optim.lr": 5e-3, "optim.schedule": "constant", "train.max_steps": 6,
                             "train.accept_changes": True}))
    lrs = {r["step"]: r["lr"] for r in read_records(out / "metrics.jsonl") if "lr" in r}
    assert lrs[4] == pytest.approx(1e-3) and lrs[5] == pytest.approx(5e-3) and lrs[6] == pytest.approx(5e-3)
    event = json.loads((out / "run.json").read_text())["history"][-1]
    assert event["event"] == "resume" and event["step"] == 4 and event["changes"] == {"optim.lr": [1e-3, 5e-3]}
    assert yaml.safe_load((out / "config.yaml").read_text())["optim"]["lr"] == 5e-3  # says what ran


def test_extending_a_run_needs_no_ceremony_and_the_schedule_is_recomputed(tmp_path):
    out = tmp_path / "run"
    pretrain(_config(out, **{"optim.schedule": "linear", "optim.min_lr_ratio": 0.0}))
    pretrain(_config(out, **{"optim.schedule": "linear", "optim.min_lr_ratio": 0.0, "train.max_steps": 8}))
    lrs = {r["step"]: r["lr"] for r in read_records(out / "metrics.jsonl") if "lr" in r}
    assert lrs[4] == pytest.approx(3e-4 * 0.0)  # the 4-step schedule ended at 0
    assert lrs[5] == pytest.approx(3e-4 * (1 - 4 / 7))  # the 8-step one, from step 5 on


def test_resume_with_another_architecture_is_one_line_exit_2(tmp_path, capsys):
    out = tmp_path / "run"
    pretrain(_config(out))
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(_config(out, **{"model.overrides": {**TINY, "dim": 64},
                                                     "train.accept_changes": True}).to_dict()))
    with pytest.raises(SystemExit) as exit_:
        main(["pretrain", "--config", str(config)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot continue with another architecture" in err[0]
    assert "model.overrides.dim" in err[0]


def test_changed_fields_compare_against_the_checkpoint():
    from lmforge.config import config_changes

    old = _config(Path("a")).to_dict()
    new = _config(Path("b"), **{"train.max_steps": 9, "log.every": 5, "model.overrides": {**TINY, "dropout": 0.1},
                                "train.seed": 3})
    assert config_changes(old, new) == {"model.overrides.dropout": (None, 0.1), "train.seed": (1337, 3)}
    shorter = _config(Path("a"), **{"train.max_steps": 2})
    assert config_changes(old, shorter) == {"train.max_steps": (4, 2)}
