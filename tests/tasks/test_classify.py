"""classify: learning on real data, outputs, HF export parity, multi-label, pairs, class weights."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as hf
from torch.testing import assert_close

from lmforge.data.readers import read_classification
from lmforge.interop.model_dir import load_model_dir
from lmforge.tasks import evaluate, finetune


def test_learns_ag_news_and_writes_the_run(ag_news, make_model, fast, tmp_path):
    base = make_model(tmp_path / "base", ag_news["texts"])
    out = tmp_path / "run"
    metrics = finetune("classify", base, ag_news["train"], ag_news["valid"], out, epochs=8, lr=2e-3, batch_size=16,
                       max_length=64, pooling="mean", **fast)
    assert metrics["accuracy"] > 0.5  # chance is 0.25 (balanced classes)
    assert set(metrics["per_class"]) == {"Business", "Sci/Tech", "Sports", "World"}
    for key in ("precision", "recall", "f1"):
        assert 0 <= metrics["per_class"]["Sports"][key] <= 1
    written = json.loads((out / "metrics.json").read_text())
    assert written["accuracy"] == pytest.approx(metrics["accuracy"])
    assert written["macro_f1"] == pytest.approx(metrics["macro_f1"])
    assert (out / "confusion_matrix.png").stat().st_size > 1000
    assert (out / "report.md").read_text().startswith("# classify")
    assert "pooling: mean" in (out / "finetune.yaml").read_text()
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum("val_accuracy" in r for r in evals) == 8  # one evaluation per epoch
    assert metrics["accuracy"] == max(r["val_accuracy"] for r in evals if "val_accuracy" in r)  # the best was kept
    assert not (out / "checkpoints").exists()
    # The best evaluation's weights were exported: evaluating them again gives the same numbers.
    again = evaluate("classify", out / "model", ag_news["valid"], tmp_path / "eval", max_length=64)
    assert again["accuracy"] == pytest.approx(metrics["accuracy"])
    assert again["confusion_matrix"] == metrics["confusion_matrix"]
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["macro_f1"] == pytest.approx(again["macro_f1"])
    assert (tmp_path / "eval" / "report.md").read_text().startswith(f"# classify: run/model on {ag_news['valid'].name}")
    assert "| Sports |" in (tmp_path / "eval" / "report.md").read_text()
    assert (tmp_path / "eval" / "confusion_matrix.png").is_file()
    # Each validation example's prediction, in file order: they give back the accuracy.
    valid = read_classification(ag_news["valid"])
    for where in (out, tmp_path / "eval"):
        rows = [json.loads(line) for line in (where / "predictions.jsonl").read_text().splitlines()]
        assert [r["label"] for r in rows] == [valid.label_names[y] for y in valid.labels]
        assert [r["text"] for r in rows] == valid.texts
        assert sum(r["label"] == r["prediction"] for r in rows) / len(rows) == pytest.approx(metrics["accuracy"])
        assert "predictions" not in json.loads((where / "metrics.json").read_text())


@pytest.mark.parametrize("family", ["bert", "gpt"])
def test_hf_export_matches_transformers(ag_news, make_model, fast, tmp_path, family):
    base = make_model(tmp_path / "base", ag_news["texts"], family)
    out = tmp_path / "run"
    finetune("classify", base, ag_news["train"], ag_news["valid"], out, epochs=1, lr=1e-3, max_length=48, **fast)
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["architectures"] == [{"bert": "BertForSequenceClassification",
                                        "gpt": "GPT2ForSequenceClassification"}[family]]
    assert config["id2label"] == {"0": "Business", "1": "Sci/Tech", "2": "Sports", "3": "World"}
    ours, head, tok, _ = load_model_dir(out / "model")
    theirs = hf.AutoModelForSequenceClassification.from_pretrained(out / "model").eval()
    texts = ["Stocks fell sharply on Wall Street today.", "The team won the final match.", "New chip is fast"]
    enc = tok.encodings(texts)
    T = max(len(e.ids) for e in enc)
    pad = tok.pad_id
    ids = torch.tensor([e.ids + [pad] * (T - len(e.ids)) for e in enc])
    mask = torch.tensor([[1] * len(e.ids) + [0] * (T - len(e.ids)) for e in enc])
    with torch.no_grad():
        a = ours.eval()(ids, mask)
        b = theirs(input_ids=ids, attention_mask=mask).logits
    assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_a_rare_label_is_warned_about_and_a_declared_set_makes_it_an_error(ag_news, make_model, fast, tmp_path,
                                                                           caplog, write_csv):
    rows = [[t, "World" if i % 2 else "Sports"] for i, t in enumerate(ag_news["texts"][:60])]
    rows[17][1] = "Sprots"  # one mistyped label among sixty
    train = write_csv(tmp_path / "typo.csv", ["text", "label"], rows)
    base = make_model(tmp_path / "bert", ag_news["texts"], vocab_size=400, n_layers=1)
    valid = write_csv(tmp_path / "v.csv", ["text", "label"], rows[:10])
    with caplog.at_level("WARNING", logger="lmforge.tasks"):
        finetune("classify", base, train, valid, tmp_path / "run", epochs=1, **fast)
    assert "rare labels: 'Sprots' (1x), against a median of 29 per label" in caplog.text
    labels = tmp_path / "labels.txt"
    labels.write_text("Sports\nWorld\n")
    with pytest.raises(ValueError, match=r"typo\.csv:19: label 'Sprots' is not among the known labels"):
        finetune("classify", base, train, train, tmp_path / "run2", labels=f"@{labels}", **fast)
