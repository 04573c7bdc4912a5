"""DDP and FSDP2 on 2 CPU processes (gloo) train exactly like one process with the same
global batch: same losses, same weights (fp32 tolerance), and FSDP checkpoints resume, also
on another number of processes (sharded checkpoints resharded by torch.distributed.checkpoint)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmforge.models import GPTConfig
from lmforge.plan import make_plan
from lmforge.train import checkpoint

WORKER = Path(__file__).with_name("dist_worker.py")
pytestmark = pytest.mark.slow


def _run(out_dir: Path, strategy: str, max_steps: int, nproc: int) -> None:
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                     f"--nproc_per_node={nproc}"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run([*launcher, str(WORKER), str(out_dir), strategy, str(max_steps)], env={
        **env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _losses(out_dir: Path) -> list[tuple[float, float]]:
    """(train_loss, grad_norm) per step: the norm catches a gradient off by a constant factor,
    which Adam's update would hide."""
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["train_loss"], r["grad_norm"]) for r in records if "train_loss" in r]


def _weights(out_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return checkpoint.load(checkpoint.step_dir(out_dir / "checkpoints", step)).model


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single")
    _run(out, "none", 6, nproc=1)
    return out


def _assert_same_training(run: Path, reference: Path, step: int) -> None:
    torch.testing.assert_close(_losses(run), _losses(reference)[: len(_losses(run))], rtol=1e-5, atol=1e-6)
    ref, got = _weights(reference, step), _weights(run, step)
    assert set(ref) == set(got)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-6, msg=name)


def _assert_planned_communication(run: Path, strategy: str) -> None:
    """Every step's collectives move the bytes `lmforge plan` predicts for this model and
    batch (gradient all-reduce under DDP; all-gathers and reduce-scatter under FSDP2)."""
    config = GPTConfig(vocab_size=64, max_seq_len=16, dim=32, n_layers=2, n_heads=2, bias=False)
    plan = make_plan(config, seq_len=16, batch_size=4, grad_accum=2, precision="fp32", devices=2,
                     strategy=strategy, device="cpu").communication
    steps = json.loads((run / "comm.json").read_text())["steps"]
    assert len(steps) >= 3
    for step in steps:
        assert {k: v for k, v in step.items() if k != "scalars" and v} == plan["payload"], step
        assert step.get("scalars", 0) < 1024  # the loop's own reductions: a few scalars


def test_ddp_matches_single_process(tmp_path, reference):
    _run(tmp_path, "ddp", 4, nproc=2)
    assert len(_losses(tmp_path)) == 4
    _assert_same_training(tmp_path, reference, 4)
    _assert_planned_communication(tmp_path, "ddp")
    # every parameter takes part in the loss: DDP was built without the per-step unused-parameter search
    assert json.loads((tmp_path / "comm.json").read_text())["ddp"] == {"find_unused_parameters": False}


def test_fsdp_matches_single_process_and_resumes(tmp_path, reference):
    _run(tmp_path, "fsdp", 4, nproc=2)
    assert len(_losses(tmp_path)) == 4
    _assert_same_training(tmp_path, reference, 4)  # the sharded (DCP) checkpoints, read whole
    _assert_planned_communication(tmp_path, "fsdp")
    _run(tmp_path, "fsdp", 6, nproc=2)  # resumes from step 4: sharded weights and optimizer state restored
    assert len(_losses(tmp_path)) == 6
    _assert_same_training(tmp_path, reference, 6)


def test_fsdp_checkpoint_resumes_on_four_processes_under_ddp(tmp_path, reference):
    """2 processes (FSDP2, sharded checkpoint) -> 4 processes (DDP): the global batch and data
    position carry over, so steps 5-6 are the single-process run's."""
    _run(tmp_path, "fsdp", 4, nproc=2)
    _run(tmp_path, "ddp", 6, nproc=4)
    assert len(_losses(tmp_path)) == 6
    _assert_same_training(tmp_path, reference, 6)
