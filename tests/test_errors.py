"""A user's mistake (or their machine's limit) is one line naming the file or field, exit 2,
never a traceback or a page of usage."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import yaml

from lmforge.cli import main
from lmforge.interop.model_dir import save_model_dir
from lmforge.models import GPTConfig, build
from lmforge.train import checkpoint

TINY_RUN = {"train": {"device": "cpu", "precision": "fp32", "max_steps": 2, "micro_batch_size": 2},
            "data": {"synthetic": True, "seq_len": 16},
            "model": {"preset": "gpt-tiny", "overrides": {"dim": 32, "n_layers": 1, "n_heads": 2, "vocab_size": 64}},
            "log": {"progress": False, "tensorboard": False, "plot": False, "peak_flops": 1e12},
            "eval": {"every": 0}, "checkpoint": {"every": 1, "keep_last": 5, "keep_best": False}}


def _error(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("lmforge: error: ")
    return lines[0].removeprefix("lmforge: error: ")


def test_a_bad_value_in_a_config_file_names_the_file_and_field(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("optim:\n  lr: fast\n")
    assert _error(["pretrain", "--config", str(config)], capsys) == \
        f"{config}: optim.lr: expected float, got fast (see `lmforge pretrain --help`)"
    config.write_text("train:\n  max_steps: 0\n")
    assert _error(["pretrain", "--config", str(config)], capsys) == \
        f"{config}: train.max_steps must be >= 1, got 0"


def test_an_override_error_is_one_line_with_a_hint(capsys):
    assert _error(["pretrain", "--optim.lr", "fast"], capsys) == \
        "optim.lr: expected float, got fast (see `lmforge pretrain --help`)"
    assert "unrecognized arguments: --bogus 1" in _error(["pretrain", "--bogus", "1"], capsys)
    assert "epochs: expected int, got many" in _error(
        ["finetune", "classify", "--model", "m", "--train", "t", "--valid", "v", "--out", "o", "--epochs", "many"],
        capsys)


@pytest.mark.parametrize("text, message", [
    ("optim: [1, 2\n", "line 2: not valid YAML"),
    ("- optim\n- data\n", "a config file is a YAML mapping of sections"),
])
def test_malformed_config_files(tmp_path, capsys, text, message):
    config = tmp_path / "run.yaml"
    config.write_text(text)
    line = _error(["pretrain", "--config", str(config)], capsys)
    assert line.startswith(str(config)) and message in line


def test_an_empty_config_file_sets_nothing(tmp_path, capsys):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n")
    out = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({**TINY_RUN, "train": {**TINY_RUN["train"], "out_dir": str(out)}}))
    main(["pretrain", "--config", str(empty), "--config", str(config)])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 2


def test_quickstart_names_a_corpus_that_is_not_utf8_and_refuses_a_negative_budget(tmp_path, capsys):
    corpus = tmp_path / "latin1.txt"
    corpus.write_bytes("Ça va très bien, merci. ".encode("latin-1") * 1000)
    line = _error(["quickstart", "--corpus", str(corpus), "--out", str(tmp_path / "q")], capsys)
    assert line.startswith(f"{corpus}: not UTF-8 text (byte 0")
    assert _error(["quickstart", "--minutes", "-1", "--out", str(tmp_path / "q")], capsys) == \
        "--minutes must be positive, got -1.0"
    assert not (tmp_path / "q").exists()


def test_an_impossible_model_size_is_refused_before_allocating(tmp_path, capsys):
    model = build(GPTConfig(vocab_size=64, max_seq_len=16, dim=32, n_layers=1, n_heads=2))
    path = save_model_dir(tmp_path / "m", model, format="hf")
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "vocab_size": 10**12}))
    line = _error(["generate", "--model", str(path), "--prompt", "hi"], capsys)
    assert line.startswith(f"{path / 'config.json'}: 32,000,000,") and "check vocab_size (1,000,000,000,000)" in line


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of 1 MiB (root can mount one; skipped where the machine does not allow it)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if shutil.which("mount") is None or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                                                       capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_while_checkpointing_is_one_line_and_the_previous_checkpoint_survives(small_disk, tmp_path,
                                                                                       capsys):
    out = small_disk / "run"
    config = tmp_path / "run.yaml"
    # ~60K parameters: a checkpoint (weights + AdamW moments) of ~0.7 MB, so the second does not fit in 1 MiB.
    run = {**TINY_RUN, "train": {**TINY_RUN["train"], "out_dir": str(out), "max_steps": 6},
           "model": {"preset": "gpt-tiny", "overrides": {"dim": 48, "n_layers": 2, "n_heads": 2, "vocab_size": 64}}}
    config.write_text(yaml.safe_dump(run))
    line = _error(["pretrain", "--config", str(config)], capsys)
    assert "no space left on the device for the step" in line and "is intact" in line
    root = out / "checkpoints"
    good = checkpoint.latest_good(root)
    assert good is not None and good.name in line
    checkpoint.verify(good)
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no half-written temporaries left
