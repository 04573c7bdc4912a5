"""Hub ids wherever a model or tokenizer is named, answered offline from a cache laid out
exactly as huggingface_hub lays it out (models--org--name/{blobs,refs,snapshots})."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import huggingface_hub
import pytest
import torch
from huggingface_hub import constants, errors
from torch.testing import assert_close

import lmforge
from lmforge import hub
from lmforge.hub import lay_out
from lmforge.interop.model_dir import save_model_dir
from lmforge.models import GPTConfig, build
from lmforge.plan import make_plan
from lmforge.tokenizer import Tokenizer, train_tokenizer


@pytest.fixture(scope="module")
def tiny_gpt(tmp_path_factory) -> Path:
    tok = train_tokenizer(["a stitch in time saves nine"] * 30, "bpe", 300, min_frequency=1)
    torch.manual_seed(0)
    model = build(GPTConfig(vocab_size=tok.vocab_size, max_seq_len=32, dim=32, n_layers=1, n_heads=2))
    return save_model_dir(tmp_path_factory.mktemp("src") / "tiny", model.eval(), tokenizer=tok, format="hf")


@pytest.fixture
def offline_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_a_hub_id_loads_from_the_cache_offline(tiny_gpt, offline_cache):
    lay_out(offline_cache, "someone/tiny-gpt", tiny_gpt)
    lm = lmforge.load("someone/tiny-gpt")
    ref = lmforge.load(tiny_gpt)
    ids = torch.tensor([ref.tokenizer.encode("a stitch in time")])
    with torch.no_grad():
        assert_close(lm.model(ids), ref.model(ids))
    assert lm.path.parts[-2] == "snapshots" and lm.tokenizer.encode("saves nine") == ref.tokenizer.encode("saves nine")
    assert Tokenizer.from_pretrained("someone/tiny-gpt").vocab_size == ref.tokenizer.vocab_size
    assert make_plan("someone/tiny-gpt", seq_len=16).params["total"] == make_plan(tiny_gpt, seq_len=16).params["total"]


def test_a_revision_picks_its_own_snapshot(tiny_gpt, offline_cache, tmp_path):
    lay_out(offline_cache, "someone/tiny-gpt", tiny_gpt)
    other = tmp_path / "other"
    lmforge.load(tiny_gpt).save(other, format="hf")
    with torch.no_grad():
        lm = lmforge.load(other)
    snapshot = lay_out(offline_cache, "someone/tiny-gpt", other, revision="v2")
    assert hub.resolve("someone/tiny-gpt@v2") == snapshot
    assert hub.resolve("someone/tiny-gpt") != snapshot
    assert lmforge.load("someone/tiny-gpt@v2").family == lm.family


def test_the_cli_takes_hub_ids_offline(tiny_gpt, tmp_path):
    cache = tmp_path / "hub"
    lay_out(cache, "someone/tiny-gpt", tiny_gpt)
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    run = lambda *a: subprocess.run([sys.executable, "-m", "lmforge", *a], capture_output=True, text=True, env=env,
                                    timeout=120)
    done = run("generate", "--model", "someone/tiny-gpt", "--prompt", "a stitch", "--max-new-tokens", "4")
    assert done.returncode == 0, done.stderr
    missing = run("generate", "--model", "someone/not-there", "--prompt", "hi")
    assert missing.returncode == 2
    lines = missing.stderr.strip().splitlines()
    assert len(lines) == 1 and "someone/not-there: not in the local Hugging Face cache" in lines[0]
    assert "HF_HUB_OFFLINE is set" in lines[0]


def test_only_the_files_lmforge_reads_are_asked_for(monkeypatch, tmp_path):
    calls = []

    def fake(repo_id, revision=None, allow_patterns=None):
        calls.append((repo_id, revision, list(allow_patterns)))
        folder = tmp_path / str(len(calls))
        folder.mkdir()
        if "*.bin" in " ".join(allow_patterns) or len(calls) > 1:
            (folder / "pytorch_model.bin").write_bytes(b"")
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    folder = hub.resolve("org/old-model@abc123")
    assert [c[:2] for c in calls] == [("org/old-model", "abc123"), ("org/old-model", "abc123")]
    first, second = calls[0][2], calls[1][2]
    assert "*.safetensors" in first and not any(".bin" in p for p in first)  # safetensors first, no pickles
    assert "pytorch_model*.bin" in second  # only when the repository has no safetensors
    assert (folder / "pytorch_model.bin").exists()


@pytest.mark.parametrize("error, message", [
    (errors.GatedRepoError, "a gated repository: accept its terms on the Hub, then set HF_TOKEN"),
    (errors.RepositoryNotFoundError, "no such model on the Hugging Face Hub"),
    (errors.RevisionNotFoundError, "no such revision"),
])
def test_hub_failures_are_one_line_naming_the_id(monkeypatch, error, message):
    def fail(*args, **kwargs):
        raise error("nope", response=httpx.Response(403, request=httpx.Request("GET", "https://huggingface.co")))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    with pytest.raises(hub.HubError, match=f"^org/secret: {message}"):
        hub.resolve("org/secret")


def test_paths_and_ids_are_told_apart(tmp_path):
    assert hub.is_hub_id("gpt2") and hub.is_hub_id("Qwen/Qwen2.5-0.5B") and hub.is_hub_id("a/b@v1.0")
    assert not hub.is_hub_id("./model") and not hub.is_hub_id("/abs/model") and not hub.is_hub_id("a/b/c")
    with pytest.raises(FileNotFoundError, match="no such directory"):
        hub.resolve(tmp_path / "nope")


def test_continued_pretraining_and_finetuning_start_from_a_hub_id(tiny_gpt, offline_cache, tmp_path):
    from lmforge.config import load_config
    from lmforge.pretrain import pretrain
    from lmforge.tasks.base import load_base

    lay_out(offline_cache, "someone/tiny-gpt", tiny_gpt)
    out = tmp_path / "run"
    config = load_config(None, {
        "model.init_from": "someone/tiny-gpt", "data.synthetic": True, "data.seq_len": 16, "train.max_steps": 1,
        "train.micro_batch_size": 2, "train.device": "cpu", "train.precision": "fp32", "train.out_dir": str(out),
        "optim.lr": 1e-12, "optim.warmup_steps": 0, "log.progress": False, "log.tensorboard": False,
        "log.plot": False, "eval.every": 0, "eval.at_end": False, "checkpoint.every": 0})
    pretrain(config)
    ref, again = lmforge.load(tiny_gpt), lmforge.load(out / "model")
    ids = torch.tensor([ref.tokenizer.encode("a stitch in time")])
    with torch.no_grad():
        assert_close(again.model(ids), ref.model(ids), atol=1e-5, rtol=1e-5)  # the Hub weights, a tiny step on
    assert load_base("someone/tiny-gpt").family == "gpt"


def test_a_lora_run_from_a_hub_id_names_the_id_as_its_adapters_base(tiny_gpt, offline_cache, tmp_path):
    import json

    from lmforge.tasks import FinetuneConfig, finetune

    lay_out(offline_cache, "someone/tiny-gpt", tiny_gpt)
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"prompt": "a stitch", "response": "in time"}) + "\n" for _ in range(4)))
    config = FinetuneConfig(epochs=1, batch_size=2, device="cpu", lora_rank=2, progress=False, tensorboard=False,
                            options={"n_samples": 0})
    finetune("sft", "someone/tiny-gpt", data, data, tmp_path / "run", config=config)
    adapter = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "someone/tiny-gpt"  # not the cache's snapshot path
    assert lmforge.load("someone/tiny-gpt", adapter=tmp_path / "run" / "adapter").model is not None
