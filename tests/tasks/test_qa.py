"""qa: windows over long contexts and their labels, span post-processing (v1.1, v2 null
answers), learning on a generated SQuAD set, HF export parity, bad records."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers as hf
from torch.testing import assert_close

from lmforge.data.readers import read_squad
from lmforge.eval.metrics import squad_metrics
from lmforge.interop.model_dir import load_model_dir
from lmforge.tasks import FinetuneConfig, finetune
from lmforge.tasks.base import load_base
from lmforge.tasks.qa import ExtractiveQA, QAOptions, best_span, predict


def _texts(path):
    data = read_squad(path)
    return [ex.context + " " + ex.question for ex in data.examples]


def test_windows_cover_long_contexts_and_label_the_answer(make_squad, make_model, tmp_path):
    path = make_squad(tmp_path / "t.json", 40, 0, v2=True)
    base = load_base(make_model(tmp_path / "m", _texts(path), vocab_size=300))
    config = FinetuneConfig(max_length=32, options=QAOptions(doc_stride=8, max_query_length=16))
    setup = ExtractiveQA().setup(base, config, path, path)
    data = read_squad(path)
    by_example: dict[int, list] = {}
    for f in setup.valid:
        by_example.setdefault(f["example"], []).append(f)
    assert max(len(w) for w in by_example.values()) > 1  # long contexts were split
    assert len(setup.train) == len(setup.valid)
    for i, ex in enumerate(data.examples):
        windows = by_example[i]
        assert all(len(f["input_ids"]) <= 32 for f in windows)
        labelled = [f for f in windows if f["start"] != f["cls"]]
        if ex.is_impossible:
            assert not labelled and all(f["start"] == f["end"] == 0 for f in windows)
            continue
        assert labelled  # some window holds the whole answer
        for f in labelled:
            text = ex.context[f["offsets"][f["start"]][0]:f["offsets"][f["end"]][1]]
            assert text.strip() == ex.answers[0].text
        # Consecutive windows share context: each starts before the previous one ends.
        for a, b in zip(windows, windows[1:]):
            assert b["offsets"][b["context"][0]][0] < a["offsets"][a["context"][1]][1]


def test_best_span_rules():
    start = np.array([5.0, 0, 1, 9, 0, 0], dtype=np.float32)  # position 0 plays [CLS]
    end = np.array([5.0, 8, 0, 0, 2, 7], dtype=np.float32)
    # The best pair overall would end before it starts (3 -> 1): not allowed; 3 -> 5 is the best valid one.
    assert best_span(start, end, (1, 5), n_best=6, max_answer_length=30) == (16.0, 3, 5)
    assert best_span(start, end, (1, 5), n_best=6, max_answer_length=2) == (11.0, 3, 4)
    assert best_span(start, end, (1, 2), n_best=1, max_answer_length=30) is None  # top start 2 after top end 1


def test_v2_null_answer_against_the_best_span(make_squad, make_model, tmp_path):
    path = make_squad(tmp_path / "t.json", 4, 0, v2=True)
    base = load_base(make_model(tmp_path / "m", _texts(path), vocab_size=300))
    config = FinetuneConfig(max_length=128)
    setup = ExtractiveQA().setup(base, config, path, path)
    data = read_squad(path)
    outputs = {}
    for pos, f in enumerate(setup.valid):
        T = len(f["input_ids"])
        start, end = torch.zeros(T), torch.zeros(T)
        ex = data.examples[f["example"]]
        if ex.answers:  # point at the gold span with logits 3 + 3 against a null score of 2 + 2
            start[f["start"]], end[f["end"]] = 3.0, 3.0
        start[f["cls"]], end[f["cls"]] = 2.0, 2.0
        outputs[pos] = (start, end)
    predictions = predict(data, setup.valid, outputs, QAOptions())
    assert predictions == {ex.id: ex.answers[0].text if ex.answers else "" for ex in data.examples}
    assert squad_metrics(predictions, {ex.id: [a.text for a in ex.answers] for ex in data.examples})["f1"] == 100.0
    # A threshold above the margin (6 - 4 = 2) turns every answer into "no answer".
    empty = predict(data, setup.valid, outputs, QAOptions(null_threshold=-2.5))
    assert set(empty.values()) == {""}


def test_learns_generated_squad_v2(make_squad, make_model, fast, tmp_path):
    train = make_squad(tmp_path / "train.json", 800, 0, v2=True)
    valid = make_squad(tmp_path / "valid.json", 160, 1, v2=True)
    base = make_model(tmp_path / "base", _texts(train), vocab_size=300)
    out = tmp_path / "run"
    metrics = finetune("qa", base, train, valid, out, epochs=8, lr=3e-3, batch_size=16, max_length=96, doc_stride=32,
                       **fast)
    data = read_squad(valid)
    first_sentence = {ex.id: ex.context.split(". ")[0] for ex in data.examples}
    baseline = squad_metrics(first_sentence, {ex.id: [a.text for a in ex.answers] for ex in data.examples})
    assert metrics["exact_match"] > 30 and metrics["f1"] > baseline["f1"] + 25
    assert metrics["HasAns_exact_match"] > 15 and metrics["NoAns_exact_match"] > 50
    assert json.loads((out / "metrics.json").read_text())["exact_match"] == pytest.approx(metrics["exact_match"])
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [ex.id for ex in data.examples]
    rescored = squad_metrics({r["id"]: r["prediction"] for r in rows}, {r["id"]: r["answers"] for r in rows})
    assert (rescored["exact_match"], rescored["f1"]) == pytest.approx((metrics["exact_match"], metrics["f1"]))


def test_hf_export_matches_transformers(make_squad, make_model, fast, tmp_path):
    path = make_squad(tmp_path / "t.json", 16, 0)
    base = make_model(tmp_path / "m", _texts(path), vocab_size=300)
    finetune("qa", base, path, path, tmp_path / "run", epochs=1, max_length=96, doc_stride=32, **fast)
    assert json.loads((tmp_path / "run" / "model" / "config.json").read_text())["architectures"] == [
        "BertForQuestionAnswering"]
    ours, _, tok, _ = load_model_dir(tmp_path / "run" / "model")
    theirs = hf.AutoModelForQuestionAnswering.from_pretrained(tmp_path / "run" / "model").eval()
    enc = tok.encodings(["Who founded Nordwind?"], ["Nordwind was founded by Anna Berg."])[0]
    ids, types = torch.tensor([enc.ids]), torch.tensor([enc.type_ids])
    with torch.no_grad():
        start, end = ours.eval()(ids, None, types)
        out = theirs(input_ids=ids, token_type_ids=types)
    assert_close(start, out.start_logits, atol=1e-4, rtol=1e-4)
    assert_close(end, out.end_logits, atol=1e-4, rtol=1e-4)


def test_malformed_squad_record_names_the_question(make_squad, make_model, fast, tmp_path):
    train = make_squad(tmp_path / "train.json", 8, 0)
    bad = json.loads(train.read_text())
    bad["data"][0]["paragraphs"][2]["qas"][0]["answers"][0]["answer_start"] += 3
    valid = tmp_path / "valid.json"
    valid.write_text(json.dumps(bad))
    base = make_model(tmp_path / "m", _texts(train), vocab_size=300)
    with pytest.raises(ValueError, match=r"valid\.json: question id 'q0-2': answer .* does not match the context"):
        finetune("qa", base, train, valid, tmp_path / "run", max_length=96, doc_stride=32, **fast)
    long_question = json.loads(train.read_text())
    long_question["data"][0]["paragraphs"][0]["qas"][0]["question"] = "Who " + "really " * 40 + "founded it?"
    train.write_text(json.dumps(long_question))
    with pytest.raises(ValueError, match="max_length 48 leaves 13 context tokens beside a question of 32 tokens"):
        finetune("qa", base, train, train, tmp_path / "run", max_length=48, max_query_length=32, doc_stride=16, **fast)
