"""evaluate perplexity: the driver path equals lmforge.eval.perplexity over each document,
the metrics file, documents of JSONL files, and bad input."""

from __future__ import annotations

import json
import math
from importlib.resources import files
from pathlib import Path

import pytest
import torch

from lmforge.api import LM
from lmforge.eval.perplexity import perplexity_of_text, sliding_window_nll
from lmforge.models import GPTConfig, build, preset
from lmforge.tasks import evaluate, finetune
from lmforge.tasks.base import TASKS, load_base, register
from lmforge.tasks.perplexity import Perplexity
from lmforge.tokenizer import train_tokenizer

TEXT = (files("lmforge") / "corpus" / "tinyshakespeare.txt").read_text(encoding="utf-8")[:6000]


@pytest.fixture
def registered():
    """The task under its name, as lmforge.tasks registers it (restored afterwards)."""
    before = TASKS.get("perplexity")
    register(Perplexity())
    yield
    if before is None:
        TASKS.pop("perplexity")
    else:
        TASKS["perplexity"] = before


def _model(path: Path, family: str = "gpt") -> Path:
    """A random-init tiny GPT-2 (or Llama) with a BPE tokenizer trained on Shakespeare, max_seq_len 64."""
    tok = train_tokenizer(texts=TEXT.split("\n\n"), kind="bpe", vocab_size=400)
    torch.manual_seed(0)
    config = (GPTConfig(vocab_size=tok.vocab_size, max_seq_len=64, dim=32, n_layers=2, n_heads=2) if family == "gpt"
              else preset("llama-tiny", vocab_size=tok.vocab_size, max_seq_len=64, dim=32, n_heads=2, n_kv_heads=1,
                          hidden_dim=64, n_layers=2))
    return LM(build(config), tok).save(path, format="hf")


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_equals_sliding_window_perplexity_of_the_text(registered, tmp_path, family):
    model_dir = _model(tmp_path / "model", family)
    data = tmp_path / "text.txt"
    data.write_text(TEXT[:3000], encoding="utf-8")
    out = tmp_path / "eval"
    metrics = evaluate("perplexity", model_dir, data, out, max_length=48, precision="fp32", batch_size=3,
                       options={"stride": 16})
    base = load_base(model_dir)
    ref = perplexity_of_text(base.model, base.tokenizer, TEXT[:3000], max_len=48, stride=16)
    assert metrics["n_tokens"] == ref["n_tokens"] == len(base.tokenizer.encode(TEXT[:3000])) - 1
    assert metrics["n_windows"] == ref["n_windows"] and metrics["stride"] == 16 and metrics["max_length"] == 48
    assert metrics["nll_sum"] == pytest.approx(ref["nll_sum"], rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(ref["ppl"], rel=1e-5)
    assert metrics["bits_per_char"] == pytest.approx(ref["bits_per_char"], rel=1e-5)
    assert metrics["bits_per_byte"] == pytest.approx(ref["bits_per_byte"], rel=1e-5)
    assert metrics["loss"] == pytest.approx(metrics["nll"], rel=1e-6)  # the driver's loss is the mean NLL
    # A random-init model is close to uniform over the vocabulary: perplexity ~ V (loss ~ ln V).
    assert abs(math.log(metrics["perplexity"]) - math.log(base.config.vocab_size)) < 0.1
    written = json.loads((out / "metrics.json").read_text())
    assert {"perplexity", "nll", "bits_per_char", "n_tokens"} <= set(written)
    assert written["perplexity"] == pytest.approx(metrics["perplexity"])
    assert (out / "report.md").read_text().startswith("# perplexity")


def test_jsonl_documents_are_scored_apart_with_model_length_default(registered, tmp_path):
    """Each record's field is its own document (no context from the previous one); the
    default window is the model's max_seq_len with stride max_len // 2; a one-token document
    is left out and noted."""
    model_dir = _model(tmp_path / "model")
    docs = [TEXT[:900], TEXT[900:1000], TEXT[1000:2500], "a"]
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"body": d}) + "\n" for d in docs), encoding="utf-8")
    metrics = evaluate("perplexity", model_dir, data, tmp_path / "eval", precision="fp32", text_column="body")
    base = load_base(model_dir)
    refs = [sliding_window_nll(base.model, base.tokenizer.encode(d), 64, 32) for d in docs[:3]]
    assert metrics["n_documents"] == 3 and metrics["max_length"] == 64 and metrics["stride"] == 32
    assert metrics["n_tokens"] == sum(r["n_tokens"] for r in refs)
    assert metrics["nll_sum"] == pytest.approx(sum(r["nll_sum"] for r in refs), rel=1e-5)
    assert metrics["n_chars"] == sum(len(d) for d in docs[:3])
    assert "skipped 1 document(s) of fewer than 2 tokens" in (tmp_path / "eval" / "report.md").read_text()


def test_bad_input_raises_clear_errors(registered, make_model, tmp_path):
    model_dir = _model(tmp_path / "model")
    data = tmp_path / "text.txt"
    data.write_text(TEXT[:500], encoding="utf-8")
    with pytest.raises(ValueError, match="stride must be in 1..max_length \\(32\\), got 40"):
        evaluate("perplexity", model_dir, data, max_length=32, options={"stride": 40})
    with pytest.raises(ValueError, match="max_length 100 exceeds the model's max_seq_len 64"):
        evaluate("perplexity", model_dir, data, max_length=100)
    with pytest.raises(ValueError, match="perplexity is an evaluation task"):
        finetune("perplexity", model_dir, data, data, tmp_path / "run")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine words here"}\n{"other": 1}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl.*2"):
        evaluate("perplexity", model_dir, bad)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        evaluate("perplexity", model_dir, tmp_path / "missing.txt")
    tiny = tmp_path / "one.txt"
    tiny.write_text("a", encoding="utf-8")
    with pytest.raises(ValueError, match="no document has the 2 tokens needed"):
        evaluate("perplexity", model_dir, tiny)
    bert = make_model(tmp_path / "bert", TEXT.split("\n\n"), "bert")
    with pytest.raises(ValueError, match="perplexity needs a causal language model.*bert family"):
        evaluate("perplexity", bert, data)


def test_quantized_evaluation_is_the_quantized_models_perplexity(registered, tmp_path, capsys):
    import lmforge
    from lmforge.cli import main

    model_dir = _model(tmp_path / "model")
    data = tmp_path / "text.txt"
    data.write_text(TEXT[:2000], encoding="utf-8")
    fp32 = evaluate("perplexity", model_dir, data, max_length=48, precision="fp32", options={"stride": 16})
    int8 = evaluate("perplexity", model_dir, data, max_length=48, precision="fp32", quantize="int8",
                    options={"stride": 16})
    lm = lmforge.load(model_dir, quantize="int8")
    ref = perplexity_of_text(lm.model, lm.tokenizer, TEXT[:2000], max_len=48, stride=16)
    assert int8["perplexity"] == pytest.approx(ref["ppl"], rel=1e-5)
    assert int8["perplexity"] != fp32["perplexity"]
    assert int8["perplexity"] == pytest.approx(fp32["perplexity"], rel=0.01)
    main(["evaluate", "perplexity", "--model", str(model_dir), "--data", str(data), "--max-length", "48",
          "--precision", "fp32", "--quantize", "int8", "--stride", "16", "--no-progress"])
    assert json.loads(capsys.readouterr().out)["perplexity"] == pytest.approx(int8["perplexity"], rel=1e-6)
    with pytest.raises(ValueError, match="quantize: int8 is for evaluation"):
        finetune("perplexity", model_dir, data, data, tmp_path / "run", quantize="int8")
