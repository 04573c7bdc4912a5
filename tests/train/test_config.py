import dataclasses
from pathlib import Path

import pytest
import yaml
from jsonargparse import ArgumentParser

from lmforge.config import OptimConfig, RunConfig, config_parser, load_config, save_config
from lmforge.pretrain import model_config


def test_defaults_are_valid_and_round_trip_through_yaml(tmp_path):
    cfg = RunConfig()
    save_config(cfg, tmp_path / "run.yaml")
    assert load_config(tmp_path / "run.yaml") == cfg
    assert yaml.safe_load((tmp_path / "run.yaml").read_text())["optim"]["betas"] == [0.9, 0.95]


def test_yaml_then_dotted_overrides(tmp_path):
    (tmp_path / "run.yaml").write_text(
        "optim:\n  lr: 3e-4\n  betas: [0.9, 0.99]\ntrain:\n  max_steps: 50\n  objective: mlm\n"
        "model:\n  preset: bert-tiny\n  overrides: {dim: 64}\n")
    cfg = load_config(tmp_path / "run.yaml", {"optim.lr": 1e-3, "model.overrides.n_layers": 2,
                                              "dist.strategy": "fsdp"})
    assert cfg.optim.lr == 1e-3 and cfg.optim.betas == (0.9, 0.99)  # YAML's "3e-4" is a float here
    assert cfg.train.max_steps == 50 and cfg.train.objective == "mlm"
    assert cfg.model.overrides == {"dim": 64, "n_layers": 2}
    assert cfg.dist.strategy == "fsdp"
    assert load_config(tmp_path / "run.yaml", ["--optim.lr", "2e-4"]).optim.lr == 2e-4


@pytest.mark.parametrize("overrides, field", [
    ({"optim.lr": -1}, "optim.lr"),
    ({"optim.lrr": 1}, "optim.lrr"),
    ({"train.objective": "xx"}, "train.objective"),
    ({"train.grad_accum": 0}, "train.grad_accum"),
    ({"train.max_steps": None}, "train.max_steps"),
    ({"optim.betas": [0.9]}, "optim.betas"),
    ({"checkpoint.every": 7, "eval.every": 5}, "checkpoint.every"),
    ({"dist.timeout_minutes": 0}, "dist.timeout_minutes"),
])
def test_invalid_values_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        load_config(None, overrides)


def test_missing_or_bad_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("optim:\n  lr: -0.5\n")
    with pytest.raises(ValueError, match=r"bad\.yaml.*optim\.lr"):
        load_config(tmp_path / "bad.yaml")


def test_jsonargparse_builds_the_dataclasses(tmp_path):
    """What the CLI does: the dataclasses as arguments, a YAML file, dotted overrides."""
    (tmp_path / "c.yaml").write_text("train:\n  micro_batch_size: 2\n")
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--config", action="config")
    parser.add_class_arguments(RunConfig, "run")
    ns = parser.parse_args(["--run", str(tmp_path / "c.yaml"), "--run.optim.lr", "3e-4",
                            "--run.model.overrides.dim", "256", "--run.train.precision", "bf16"])
    cfg = parser.instantiate(ns).run
    assert isinstance(cfg, RunConfig) and isinstance(cfg.optim, OptimConfig)
    assert (cfg.optim.lr, cfg.train.micro_batch_size, cfg.train.precision) == (3e-4, 2, "bf16")
    assert cfg.model.overrides == {"dim": 256}


def test_help_shows_each_fields_docstring():
    text = config_parser().format_help()
    for f in dataclasses.fields(OptimConfig):
        assert f"--optim.{f.name}" in text
    assert "peak learning rate" in text and "clip the global gradient norm" in text


CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_example_configs_load_and_resolve_a_model(path):
    cfg = load_config(path)
    model = model_config(cfg, vocab_size=1000)  # the vocabulary comes from the data's tokenizer
    assert model.max_seq_len >= cfg.data.seq_len


def test_there_are_example_configs_for_each_family():
    objectives = {load_config(p).train.objective for p in CONFIGS.glob("*.yaml")}
    assert objectives == {"clm", "mlm+nsp", "denoise"}
