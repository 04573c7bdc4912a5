import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from lmforge.models.weights import load_weights as load_lmforge_weights
from lmforge.train import checkpoint
from lmforge.train.checkpoint import CheckpointError
from lmforge.train.loop import train
from lmforge.train.objectives import clm

WORKER = Path(__file__).with_name("resume_worker.py")


def _losses(out_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["train_loss"] for r in records if "train_loss" in r}
    assert len(losses) == len(records)  # one record per step: the killed run's extra lines were dropped
    return losses


def _worker(out_dir: Path, *flags: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(WORKER), str(out_dir), *flags], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_run_killed_with_sigkill_resumes_bit_identically(tmp_path):
    reference = _worker(tmp_path / "ref")
    killed = _worker(tmp_path / "run", "--slow")
    target = tmp_path / "run" / "checkpoints" / "step_00000008" / "manifest.json"
    deadline = time.monotonic() + 120
    while not target.exists() and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    killed.kill()  # SIGKILL: no handler runs, nothing is flushed
    assert killed.wait() == -9, killed.stdout.read()
    ref_out, _ = reference.communicate(timeout=120)
    assert reference.returncode == 0, ref_out
    assert "step_00000016" not in os.listdir(tmp_path / "run" / "checkpoints")

    resumed = _worker(tmp_path / "run")
    out, _ = resumed.communicate(timeout=120)
    assert resumed.returncode == 0 and "max_steps 16" in out, out
    expected, got = _losses(tmp_path / "ref"), _losses(tmp_path / "run")
    assert sorted(got) == list(range(1, 17))
    assert got == expected  # float equality: bit-identical losses, before and after the kill
    a = checkpoint.load(tmp_path / "ref" / "checkpoints" / "step_00000016")
    b = checkpoint.load(tmp_path / "run" / "checkpoints" / "step_00000016")
    for name in a.model:
        assert torch.equal(a.model[name], b.model[name]), name


def _trained(tmp_path, gpt, batches_cls, make_clm_batch, run_config, **overrides):
    cfg = run_config(**{"train.max_steps": 6, "checkpoint.every": 2, "checkpoint.keep_last": 10,
                        "train.resume": "auto", "optim.schedule": "constant", **overrides})
    model = gpt()
    result = train(model, clm, batches_cls([make_clm_batch(4, 16, seed=s) for s in range(3)]), cfg)
    return model, result, Path(cfg.train.out_dir) / "checkpoints"


def test_checkpoint_contents_and_tied_weights_stored_once(tmp_path, gpt, batches_cls, make_clm_batch, run_config):
    model, result, root = _trained(tmp_path, gpt, batches_cls, make_clm_batch, run_config)
    path = result.checkpoint
    assert {p.name for p in path.iterdir()} == {"model.safetensors", "optimizer.pt", "trainer.pt", "config.yaml",
                                               "manifest.json"}
    manifest = checkpoint.verify(path)
    assert manifest["step"] == 6 and set(manifest["files"]) == {"model.safetensors", "optimizer.pt", "trainer.pt",
                                                                "config.yaml"}
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys() and "tok_emb.weight" in f.keys()
    ck = checkpoint.load(path)
    assert ck.model["lm_head.weight"] is ck.model["tok_emb.weight"]
    for name, p in model.state_dict().items():
        assert torch.equal(ck.model[name], p), name
    trainer = ck.trainer
    assert trainer["step"] == 6 and trainer["tokens"] == 6 * 64 and trainer["ranks"][0]["data"] == {"pos": 6}
    fresh = gpt(seed=5)  # the weights file also loads through lmforge.models.weights (lmforge.load's path)
    load_lmforge_weights(fresh, path / "model.safetensors")
    assert torch.equal(fresh.lm_head.weight, model.lm_head.weight)


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete_manifest", "delete_file"])
def test_damaged_checkpoint_is_detected_and_auto_resume_falls_back(tmp_path, gpt, batches_cls, make_clm_batch,
                                                                   run_config, damage):
    _, _, root = _trained(tmp_path, gpt, batches_cls, make_clm_batch, run_config)
    latest = root / "step_00000006"
    if damage == "truncate":
        f = latest / "optimizer.pt"
        f.write_bytes(f.read_bytes()[:100])
        match = r"optimizer\.pt: truncated"
    elif damage == "flip":
        f = latest / "model.safetensors"
        data = bytearray(f.read_bytes())
        data[-3] ^= 0xFF
        f.write_bytes(bytes(data))
        match = r"model\.safetensors: corrupt"
    elif damage == "delete_manifest":
        (latest / "manifest.json").unlink()
        match = r"manifest\.json: missing"
    else:
        (latest / "trainer.pt").unlink()
        match = r"trainer\.pt: missing"
    with pytest.raises(CheckpointError, match=match):
        checkpoint.load(latest)
    assert checkpoint.resolve_resume("auto", root) == root / "step_00000004"
    with pytest.raises(CheckpointError, match=match):
        checkpoint.resolve_resume(str(latest), root)  # an explicit path must be good


def test_auto_resume_skips_a_corrupt_latest_checkpoint(tmp_path, gpt, batches_cls, make_clm_batch, run_config):
    _, _, root = _trained(tmp_path, gpt, batches_cls, make_clm_batch, run_config)
    (root / "step_00000006" / "optimizer.pt").write_bytes(b"garbage")
    model, result, _ = _trained(tmp_path, gpt, batches_cls, make_clm_batch, run_config,
                                **{"train.max_steps": 8})
    assert result.step == 8
    reference, _, _ = _trained(tmp_path / "ref", gpt, batches_cls, make_clm_batch, run_config,
                               **{"train.max_steps": 8, "train.out_dir": str(tmp_path / "ref")})
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p, q)  # resumed from step 4 and redid 5..8 exactly


def test_resuming_a_finished_run_changes_nothing(tmp_path, gpt, batches_cls, make_clm_batch, run_config, capsys):
    model, result, root = _trained(tmp_path, gpt, batches_cls, make_clm_batch, run_config)
    saved = sorted(p.name for p in root.iterdir())
    again, result_again, _ = _trained(tmp_path, gpt, batches_cls, make_clm_batch, run_config)
    assert result_again.step == result.step == 6 and sorted(p.name for p in root.iterdir()) == saved
    for p, q in zip(model.parameters(), again.parameters()):
        assert torch.equal(p, q)
    assert "nothing left to train (all 6 steps done), resumed from step 6" in capsys.readouterr().out


def test_keep_last_and_keep_best(tmp_path):
    root = tmp_path / "ck"
    empty = {"model_state": {"w": torch.zeros(2)}, "aliases": {}, "optimizer_state": {}, "trainer_state": {}}
    losses = {1: 3.0, 2: 1.0, 3: 2.0, 4: 2.5, 5: 2.7}
    for step, loss in losses.items():
        checkpoint.save(root, step, metrics={"val_loss": loss}, **empty)
        checkpoint.prune(root, 2, keep_best=True, metric="val_loss", mode="min")
    assert [p.name for p in checkpoint.list_checkpoints(root)] == ["step_00000002", "step_00000004", "step_00000005"]
    checkpoint.prune(root, 1, keep_best=False)
    assert [p.name for p in checkpoint.list_checkpoints(root)] == ["step_00000005"]
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no leftovers


def test_stale_temporaries_are_ignored_and_removed(tmp_path):
    root = tmp_path / "ck"
    checkpoint.save(root, 1, model_state={"w": torch.ones(1)}, aliases={}, optimizer_state={}, trainer_state={})
    (root / ".step_00000002.abc.tmp").mkdir()  # what a kill during a save leaves
    assert checkpoint.list_checkpoints(root) == [root / "step_00000001"]
    checkpoint.remove_stale_temporaries(root)
    assert [p.name for p in root.iterdir()] == ["step_00000001"]


def test_rng_state_round_trip(tmp_path):
    state = checkpoint.rng_state()
    a = (random.random(), np.random.rand(), torch.rand(1))
    torch.save(state, tmp_path / "rng.pt")
    checkpoint.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    b = (random.random(), np.random.rand(), torch.rand(1))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def _logged_steps(out_dir: Path) -> int:
    try:
        return sum(1 for line in (out_dir / "metrics.jsonl").read_text().splitlines() if '"train_loss"' in line)
    except FileNotFoundError:
        return 0


@pytest.mark.slow
def test_chaos_repeated_sigkills_at_random_steps_end_bit_identical(tmp_path):
    """Kill the run with SIGKILL at random steps, several times, resuming each time: it ends
    exactly where an uninterrupted run ends (losses and weights bit-identical)."""
    reference = _worker(tmp_path / "ref")
    rng = random.Random(2026)
    run = tmp_path / "run"
    kills = 0
    for _ in range(4):
        target = _logged_steps(run) + rng.randint(1, 5)
        if target >= 16:
            break
        proc = _worker(run, "--slow")
        deadline = time.monotonic() + 120
        while _logged_steps(run) < target and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.kill()
        proc.wait()
        kills += 1
    assert kills >= 3
    final = _worker(run)
    out, _ = final.communicate(timeout=120)
    assert final.returncode == 0 and "max_steps 16" in out, out
    ref_out, _ = reference.communicate(timeout=120)
    assert reference.returncode == 0, ref_out
    assert _losses(run) == _losses(tmp_path / "ref")
    a = checkpoint.load(tmp_path / "ref" / "checkpoints" / "step_00000016")
    b = checkpoint.load(run / "checkpoints" / "step_00000016")
    for name in a.model:
        assert torch.equal(a.model[name], b.model[name]), name
    history = [e["event"] for e in json.loads((run / "run.json").read_text())["history"]]
    assert "start" in history and history.count("resume") >= 1  # (a kill before the first checkpoint starts over)
