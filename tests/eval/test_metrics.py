import math

import numpy as np
import pytest
import sacrebleu
from sklearn.metrics import f1_score, precision_recall_fscore_support

from lmforge.eval.metrics import (
    bits_per_byte,
    bits_per_char,
    bleu_scores,
    classification_metrics,
    multilabel_metrics,
    ner_metrics,
    normalize_answer,
    perplexity,
    rouge_scores,
    squad_metrics,
)

# ---------------------------------------------------------------- classification


def test_classification_matches_hand_computation():
    # confusion (rows true a, b, c): [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    y_true = [0, 0, 1, 1, 2, 2]
    y_pred = [0, 1, 1, 1, 2, 0]
    m = classification_metrics(y_true, y_pred, ["a", "b", "c"])
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["per_class"]["a"] == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2})
    assert m["per_class"]["b"] == pytest.approx({"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2})
    assert m["per_class"]["c"] == pytest.approx({"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2})
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert m["weighted_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)  # equal supports


def test_classification_names_equal_indices_and_agree_with_sklearn():
    rng = np.random.default_rng(0)
    y_true, y_pred = rng.integers(0, 4, 200).tolist(), rng.integers(0, 4, 200).tolist()
    names = ["w", "x", "y", "z"]
    by_index = classification_metrics(y_true, y_pred, names)
    by_name = classification_metrics([names[i] for i in y_true], [names[i] for i in y_pred], names)
    assert by_index == by_name
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, zero_division=0)
    for i, n in enumerate(names):
        assert by_index["per_class"][n] == pytest.approx({"precision": p[i], "recall": r[i], "f1": f[i],
                                                          "support": s[i]})
    assert by_index["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro"))
    assert by_index["weighted_f1"] == pytest.approx(f1_score(y_true, y_pred, average="weighted"))


def test_classification_absent_class_does_not_drag_macro_f1():
    m = classification_metrics([0, 1], [0, 1], ["a", "b", "never"])
    assert m["macro_f1"] == 1.0
    assert m["per_class"]["never"]["support"] == 0


def test_classification_bad_input_is_named():
    with pytest.raises(ValueError, match="y_pred\\[1\\] = 'q'"):
        classification_metrics(["a", "b"], ["a", "q"], ["a", "b"])
    with pytest.raises(ValueError, match="y_true\\[0\\] = 5"):
        classification_metrics([5], [0], ["a", "b"])
    with pytest.raises(ValueError, match="2 labels but y_pred has 1"):
        classification_metrics([0, 1], [0], ["a", "b"])


def test_multilabel_matches_hand_computation():
    t = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0]])
    p = np.array([[1, 0, 0], [0, 1, 0], [1, 0, 1]])
    m = multilabel_metrics(t, p, ["x", "y", "z"])
    # tp = [2, 1, 0], fp = [0, 0, 1], fn = [0, 1, 1]
    assert m["micro_precision"] == pytest.approx(3 / 4)
    assert m["micro_recall"] == pytest.approx(3 / 5)
    assert m["micro_f1"] == pytest.approx(2 * 0.75 * 0.6 / 1.35)
    assert m["macro_f1"] == pytest.approx((1.0 + 2 / 3 + 0.0) / 3)
    assert m["subset_accuracy"] == pytest.approx(1 / 3)
    assert m["hamming_loss"] == pytest.approx(3 / 9)
    assert m["per_class"]["y"] == pytest.approx({"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2})
    assert m["micro_f1"] == pytest.approx(f1_score(t, p, average="micro"))


def test_multilabel_rejects_non_indicator():
    with pytest.raises(ValueError, match="0/1"):
        multilabel_metrics([[0, 2]], [[0, 1]])
    with pytest.raises(ValueError, match="indicator matrices"):
        multilabel_metrics([[0, 1]], [[0, 1, 1]])


# ---------------------------------------------------------------- NER


def test_ner_strict_iob2_entity_level():
    true = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    pred = [["B-PER", "I-PER", "O", "I-LOC"], ["B-ORG", "O"]]
    m = ner_metrics(true, pred)
    # strict: the I-LOC after O is not an entity -> predicted {PER, ORG}, gold {PER, LOC, ORG}
    assert m["precision"] == pytest.approx(1.0)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(0.8)
    assert m["accuracy"] == pytest.approx(5 / 6)
    assert m["per_type"]["LOC"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert m["per_type"]["PER"]["f1"] == 1.0


def test_ner_span_boundary_error_costs_precision_and_recall():
    true = [["B-PER", "I-PER", "I-PER"]]
    pred = [["B-PER", "I-PER", "O"]]
    m = ner_metrics(true, pred)
    assert (m["precision"], m["recall"], m["f1"]) == (0.0, 0.0, 0.0)


def test_ner_bad_tags_and_lengths():
    with pytest.raises(ValueError, match=r"pred_tags\[0\]\[1\] = 'PER'"):
        ner_metrics([["O", "B-PER"]], [["O", "PER"]])
    with pytest.raises(ValueError, match=r"true_tags\[0\]\[0\] = 'E-PER'"):
        ner_metrics([["E-PER"]], [["O"]])
    with pytest.raises(ValueError, match="sentence 0: 2 true tags but 1"):
        ner_metrics([["O", "O"]], [["O"]])
    assert ner_metrics([["S-PER", "O"]], [["S-PER", "O"]], scheme="IOBES")["f1"] == 1.0


# ---------------------------------------------------------------- SQuAD


def test_normalize_answer_official_rules():
    assert normalize_answer("  The  Eiffel-Tower! ") == "eiffeltower"
    assert normalize_answer("an apple and a banana") == "apple and banana"
    assert normalize_answer("Theatre") == "theatre"  # articles only as whole words


def test_squad_v2_hand_worked():
    refs = {
        "q1": ["The Eiffel Tower", "Eiffel Tower"],
        "q2": ["Barack Obama"],
        "q3": [],  # unanswerable
        "q4": [""],  # unanswerable, written the SQuAD 2.0 way
    }
    preds = {"q1": "eiffel tower!", "q2": "President Barack Obama", "q3": "", "q4": "Paris", "extra": "x"}
    m = squad_metrics(preds, refs)
    # q2: tokens {president, barack, obama} vs {barack, obama}: P 2/3, R 1 -> F1 0.8
    assert m["exact_match"] == pytest.approx(50.0)
    assert m["f1"] == pytest.approx(100 * (1 + 0.8 + 1 + 0) / 4)
    assert m["total"] == 4
    assert m["HasAns_exact_match"] == pytest.approx(50.0) and m["HasAns_f1"] == pytest.approx(90.0)
    assert m["NoAns_exact_match"] == pytest.approx(50.0) and m["NoAns_f1"] == pytest.approx(50.0)
    assert m["HasAns_total"] == 2 and m["NoAns_total"] == 2


def test_squad_v1_max_over_gold_and_partial_overlap():
    refs = {"a": ["Denver Broncos", "the Broncos"], "b": ["in 1998 in Paris"]}
    preds = {"a": "broncos", "b": "Paris 1998 ."}
    m = squad_metrics(preds, refs)
    # a: vs "the Broncos" -> "broncos": EM 1; b: {in, 1998, in, paris} vs {paris, 1998}: P 1, R 1/2 -> 2/3
    assert m["exact_match"] == pytest.approx(50.0)
    assert m["f1"] == pytest.approx(100 * (1 + 2 / 3) / 2)
    assert "HasAns_f1" not in m  # only one kind of question


def test_squad_missing_prediction_raises():
    with pytest.raises(ValueError, match="no prediction.*'q2'"):
        squad_metrics({"q1": "x"}, {"q1": ["x"], "q2": ["y"]})


# ---------------------------------------------------------------- generation


def test_rouge_known_values():
    # rouge-score's own README example, worked by hand with stemming (jumps -> jump):
    # unigram overlap 6 of 8 / 9; bigrams 2 of 7 / 8; LCS "the quick brown jump the" = 5
    r = rouge_scores(["The quick brown dog jumps on the log."], ["The quick brown fox jumps over the lazy dog"])
    assert r["rouge1"] == pytest.approx(100 * 2 * (6 / 8) * (6 / 9) / (6 / 8 + 6 / 9))
    assert r["rouge2"] == pytest.approx(100 * 4 / 15)
    assert r["rougeL"] == pytest.approx(100 * 2 * (5 / 8) * (5 / 9) / (5 / 8 + 5 / 9))
    assert r["rougeLsum"] == pytest.approx(r["rougeL"])


def test_rouge_identical_is_100_and_multi_reference_takes_best():
    preds = ["the cat sat on the mat", "hello world"]
    assert rouge_scores(preds, preds) == pytest.approx({k: 100.0 for k in ("rouge1", "rouge2", "rougeL", "rougeLsum")})
    multi = rouge_scores(preds, [["a dog ran", "the cat sat on the mat"], ["hello world"]])
    assert multi["rouge1"] == pytest.approx(100.0)


def test_bleu_hand_worked_and_identity():
    # n-gram precisions 4/5, 3/4, 2/3, 1/2, no brevity penalty
    b = bleu_scores(["a b c d e"], ["a b c d f"])
    assert b["bleu"] == pytest.approx(100 * (4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25)
    same = bleu_scores(["the cat sat on the mat ."], [["the cat sat on the mat ."]])
    assert same == pytest.approx({"bleu": 100.0, "chrf": 100.0})


def test_bleu_multi_reference_matches_sacrebleu_readme():
    # sacrebleu's README example: BLEU = 48.53, chrF2 = 59.73
    hyps = ["The dog bit the man.", "It wasn't surprising.", "The man had just bitten him."]
    refs = [["The dog bit the man.", "The dog had bit the man."],
            ["It was not unexpected.", "No one was surprised."],
            ["The man bit him first.", "The man had bitten the dog."]]
    b = bleu_scores(hyps, refs)
    assert round(b["bleu"], 2) == 48.53
    assert round(b["chrf"], 2) == 59.73


def test_bleu_variable_reference_counts():
    hyps = ["The dog bit the man.", "It wasn't surprising."]
    refs = [["The dog bit the man.", "The dog had bit the man."], ["It was not unexpected."]]
    direct = sacrebleu.corpus_bleu(hyps, [["The dog bit the man.", "It was not unexpected."],
                                          ["The dog had bit the man.", None]])
    assert bleu_scores(hyps, refs)["bleu"] == pytest.approx(direct.score)
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        bleu_scores(hyps, refs[:1])


# ---------------------------------------------------------------- language modelling


def test_perplexity_and_bits():
    assert perplexity(0.0) == 1.0
    assert perplexity(math.log(50)) == pytest.approx(50.0)
    assert perplexity(1e6) == math.inf
    assert bits_per_char(10 * math.log(2), 10) == pytest.approx(1.0)
    assert bits_per_byte(8 * math.log(2), 4) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="n_chars"):
        bits_per_char(1.0, 0)


# ---------------------------------------------------------------- reports (eval/report.py)


def test_write_metrics_json_roundtrip_and_atomic(tmp_path):
    import json

    import torch

    from lmforge.eval.report import write_metrics_json

    path = tmp_path / "sub" / "metrics.json"
    m = {"accuracy": np.float64(0.5), "n": np.int64(3), "cm": np.array([[1, 0], [0, 2]]), "t": torch.tensor(1.5)}
    write_metrics_json(path, m)
    assert json.loads(path.read_text()) == {"accuracy": 0.5, "n": 3, "cm": [[1, 0], [0, 2]], "t": 1.5}
    with pytest.raises(TypeError, match="object is not JSON"):
        write_metrics_json(path, {"bad": object()})
    assert json.loads(path.read_text())["n"] == 3  # the old file survives a failed write
    assert [p.name for p in path.parent.iterdir()] == ["metrics.json"]  # no temporary left behind


def test_confusion_matrix_png(tmp_path):
    from matplotlib.image import imread

    from lmforge.eval.report import confusion_matrix_png

    m = classification_metrics([0, 1, 2, 2], [0, 2, 2, 1], ["neg", "neu", "pos"])
    path = confusion_matrix_png(m["confusion_matrix"], ["neg", "neu", "pos"], tmp_path / "cm.png", normalize=True)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    h, w, _ = imread(path).shape
    assert h > 100 and w > 100
    with pytest.raises(ValueError, match=r"expected \(2, 2\)"):
        confusion_matrix_png([[1, 2, 3]], ["a", "b"], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_markdown_report():
    from lmforge.eval.report import markdown_report

    text = markdown_report("Eval", {
        "Summary": {"accuracy": 0.5, "n": 4},
        "Per class": {"a|b": {"f1": 1.0, "support": 2}, "c": {"f1": 0.25, "support": 2}},
        "Notes": "Strict IOB2.",
        "Samples": [{"id": 1, "pred": "x"}, {"id": 2, "gold": "y"}],
    })
    assert text == (
        "# Eval\n\n"
        "## Summary\n\n| metric | value |\n|---|---|\n| accuracy | 0.5000 |\n| n | 4 |\n\n"
        "## Per class\n\n|  | f1 | support |\n|---|---|---|\n| a\\|b | 1.0000 | 2 |\n| c | 0.2500 | 2 |\n\n"
        "## Notes\n\nStrict IOB2.\n\n"
        "## Samples\n\n| id | pred | gold |\n|---|---|---|\n| 1 | x |  |\n| 2 |  | y |\n"
    )
    with pytest.raises(ValueError, match="report section"):
        markdown_report("x", {"bad": 3})


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    from lmforge.eval.report import write_text
    from lmforge.files import atomic_path

    write_text(tmp_path / "r.md", "old")
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "r.md") as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash mid-write")
    assert (tmp_path / "r.md").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["r.md"]
