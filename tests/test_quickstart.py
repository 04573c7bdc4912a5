"""The main job, shortened: a minute-long quickstart on part of the corpus leaves a complete run directory."""

import json
import subprocess
import sys

import pytest
import torch
import transformers as hf

import lmforge
from lmforge.quickstart import CPU, GPU, default_corpus, split_text, training_config


def test_split_keeps_the_last_tenth_for_validation():
    text = "".join(f"line {i}\n" for i in range(1000))
    train, val = split_text(text)
    assert train + val == text and train.endswith("\n")
    assert abs(len(val) / len(text) - 0.1) < 0.01


@pytest.mark.parametrize("max_steps", [20, 99, 833, 1234, 5001])
def test_training_config_is_valid_for_any_budget(tmp_path, max_steps):
    """However many steps the machine's speed allows, the config passes validation
    (checkpoints fall on evaluations) and the schedule fits inside the run."""
    for recipe in (CPU, GPU):
        config = training_config(recipe, tmp_path, max_steps, 240.0, "cpu", "fp32", 0)
        assert config.train.max_steps == max_steps and config.checkpoint.every % config.eval.every == 0
        assert config.optim.warmup_steps < max_steps


@pytest.mark.slow
def test_quickstart_run_directory_is_complete(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(default_corpus().read_text()[:150_000])
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "lmforge", "quickstart", "--out", str(out), "--corpus", str(corpus),
                        "--minutes", "0.75"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "bits per character" in r.stdout and "samples" in r.stdout
    for name in ("metrics.jsonl", "loss.png", "report.md", "metrics.json", "config.yaml", "model/config.json",
                 "model/model.safetensors", "model/tokenizer.json"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["bits_per_char"] > 0 and metrics["steps"] >= 1
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("train_loss" in r or "val_loss" in r for r in records) and all("step" in r for r in records)
    report = (out / "report.md").read_text()
    assert "bits per character" in report and "ROMEO:" in report and "loss.png" in report
    # model/ loads in both lmforge and transformers, with the same logits
    lm = lmforge.api.load(out / "model")
    theirs = hf.AutoModelForCausalLM.from_pretrained(out / "model").eval()
    ids = torch.tensor([lm.tokenizer.encode("ROMEO: what light")])
    with torch.no_grad():
        torch.testing.assert_close(lm.model(ids), theirs(ids).logits, atol=1e-5, rtol=1e-5)


def test_set_options_go_on_top_of_the_recipe(tmp_path):
    config = training_config(CPU, tmp_path, 500, 240.0, "cpu", "fp32", 0, {
        "optim.optimizer": "muon", "optim.schedule": "wsd", "model.overrides.act": "relu2",
        "model.overrides.value_embeds": 2})
    assert config.optim.optimizer == "muon" and config.optim.schedule == "wsd"
    assert config.model.overrides == {"dim": CPU.dim, "n_layers": CPU.n_layers, "n_heads": CPU.n_heads,
                                      "max_seq_len": CPU.seq_len, "dropout": CPU.dropout, "act": "relu2",
                                      "value_embeds": 2}
    assert config.optim.lr == CPU.lr and config.train.max_steps == 500  # the rest is the recipe's


@pytest.mark.parametrize("option, message", [
    ("optim.optimizr=muon", "--set: unrecognized arguments: --optim.optimizr=muon"),
    ("model.overrides.value_embeds=9", "--set: GPTConfig.value_embeds must be an integer from 0 to n_layers / 2"),
    ("muon", "--set 'muon': expected KEY=VALUE"),
])
def test_a_bad_set_option_is_one_line_before_any_work(tmp_path, option, message):
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "lmforge", "quickstart", "--out", str(out), "--set", option],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not out.exists()
