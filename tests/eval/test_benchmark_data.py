"""Benchmark readers: each published layout gives the strings lm-evaluation-harness's own
task code builds (its preprocessing functions are the reference); bad input names the file,
line and field."""

import json
from pathlib import Path

import pytest
from lm_eval.tasks.hellaswag import utils as lm_eval_hellaswag
from lm_eval.tasks.wikitext import preprocess_wikitext as lm_eval_wikitext
from lm_eval.tasks.winogrande import preprocess_winogrande as lm_eval_winogrande

from lmforge.eval.benchmark_data import (
    clean_hellaswag,
    read_arc,
    read_hellaswag,
    read_lambada,
    read_piqa,
    read_wikitext,
    read_winogrande,
    wikitext_articles,
    wikitext_detokenize,
)


def _jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


HELLASWAG = [
    {"ind": 4, "activity_label": "Removing ice from car", "ctx_a": "Then, the man writes over the snow covering "
     "the window of a car, and a woman wearing winter clothes smiles.", "ctx_b": "then", "label": 3,
     "endings": [", the man adds wax to the windshield and cuts it.", ", a person board a ski lift, while two men "
                 "supporting the head of the person wearing winter clothes snow as the we girls sled.",
                 ", the man puts on a christmas coat, knitted with netting.", ", the man continues removing the "
                 "snow on his car."]},
    {"ind": 9, "activity_label": "Home and Garden", "ctx_a": "[header] How to clean a grill [title] Heat the grill.",
     "ctx_b": "THE grates [step] are hot.", "label": "0",
     "endings": ["[substeps] Scrub them  with a brush.", "Wait [title] an hour.", "Leave it.", "Call someone."]},
]


def test_hellaswag_matches_lm_eval_process_docs(tmp_path):
    import datasets

    docs = read_hellaswag(_jsonl(tmp_path / "hellaswag_val.jsonl", HELLASWAG))
    theirs = lm_eval_hellaswag.process_docs(datasets.Dataset.from_list(
        [{**r, "label": str(r["label"])} for r in HELLASWAG]))
    for doc, ref in zip(docs, theirs):
        assert doc.queries == (ref["query"],)
        assert doc.answers == tuple(ref["choices"])
        assert doc.gold == ref["gold"]
    assert docs[1].queries[0] == "Home and Garden: How to clean a grill. Heat the grill. The grates are hot."


@pytest.mark.parametrize("text", ["A [title] B [step] c", "  x  [header] y [substeps]  z ", "no brackets",
                                  "[a][b] [title]end"])
def test_hellaswag_cleanup_is_lm_evals(text):
    assert clean_hellaswag(text) == lm_eval_hellaswag.preprocess(text)


ARC_AI2 = [{"id": "Q1", "question": {"stem": "Which gas do plants take in?", "choices": [
    {"text": "oxygen", "label": "A"}, {"text": "carbon dioxide", "label": "B"}, {"text": "helium", "label": "C"}]},
    "answerKey": "B"},
    {"id": "Q2", "question": {"stem": "2 + 2?", "choices": [{"text": "3", "label": "1"}, {"text": "4", "label": "2"},
                                                          {"text": "5", "label": "3"}, {"text": "22", "label": "4"}]},
     "answerKey": "2"}]


def _arc_hf(r):
    return {"id": r["id"], "question": r["question"]["stem"],
            "choices": {"text": [c["text"] for c in r["question"]["choices"]],
                        "label": [c["label"] for c in r["question"]["choices"]]}, "answerKey": r["answerKey"]}


def test_arc_both_layouts_read_alike(tmp_path):
    ai2 = read_arc(_jsonl(tmp_path / "ARC-Easy-Test.jsonl", ARC_AI2))
    hf = read_arc(_jsonl(tmp_path / "arc_hf.jsonl", [_arc_hf(r) for r in ARC_AI2]))
    assert [(d.queries, d.answers, d.gold) for d in ai2] == [(d.queries, d.answers, d.gold) for d in hf]
    assert ai2[0].queries == ("Question: Which gas do plants take in?\nAnswer:",)
    assert ai2[0].answers == ("oxygen", "carbon dioxide", "helium") and ai2[0].gold == 1
    assert ai2[1].gold == 1  # answerKey "2" among labels "1".."4"


def test_piqa_labels_file_beside_the_data_or_in_records(tmp_path):
    records = [{"goal": "Open a jar", "sol1": "twist the lid", "sol2": "bake it"},
               {"goal": "Dry hair", "sol1": "water", "sol2": "a towel"}]
    data = _jsonl(tmp_path / "valid.jsonl", records)
    (tmp_path / "valid-labels.lst").write_text("0\n1\n")
    docs = read_piqa(data)
    assert [d.gold for d in docs] == [0, 1]
    assert docs[1].queries == ("Question: Dry hair\nAnswer:",) and docs[1].answers == ("water", "a towel")
    with_labels = _jsonl(tmp_path / "piqa_hf.jsonl", [{**r, "label": i} for i, r in enumerate(records)])
    assert [(d.queries, d.answers, d.gold) for d in read_piqa(with_labels)] == \
        [(d.queries, d.answers, d.gold) for d in docs]
    (tmp_path / "valid-labels.lst").write_text("0\n")
    with pytest.raises(ValueError, match="valid-labels.lst: 1 labels for the 2 records"):
        read_piqa(data)
    (tmp_path / "valid-labels.lst").unlink()
    with pytest.raises(FileNotFoundError, match="valid-labels.lst: no such file"):
        read_piqa(data)


def test_winogrande_partial_scoring_matches_lm_eval(tmp_path):
    rec = {"qID": "1", "sentence": "The trophy doesn't fit into the brown suitcase because the _ is too large.",
           "option1": "trophy", "option2": "suitcase", "answer": "1"}
    (doc,) = read_winogrande(_jsonl(tmp_path / "dev.jsonl", [rec]))
    assert doc.queries == tuple(lm_eval_winogrande.doc_to_choice(rec))
    assert doc.answers == (lm_eval_winogrande.doc_to_target(rec),) == ("is too large.",)
    assert doc.gold == lm_eval_winogrande.doc_to_text(rec) == 0


def test_lambada_last_word(tmp_path):
    (doc,) = read_lambada(_jsonl(tmp_path / "lambada_test.jsonl", [{"text": "he said  hello to his friend"}]))
    assert doc.queries == ("he said  hello to his",) and doc.answers == (" friend",)


RAW = (" \n = Valkyria Chronicles = \n \n Senjō no Valkyria 3 @-@ is a game . \n \n = = Gameplay = = \n \n"
       " It 's fun ( really ) . \n \n = Tower Building = \n \n The tower , 1 @,@ 000 ft . \n")


def test_wikitext_articles_split_at_top_level_titles(tmp_path):
    path = tmp_path / "wiki.test.raw"
    path.write_text(RAW, encoding="utf-8")
    pages = [p for _, p in wikitext_articles(RAW)]
    assert pages == [" = Valkyria Chronicles = \n \n Senjō no Valkyria 3 @-@ is a game . \n \n = = Gameplay = = \n"
                     " \n It 's fun ( really ) . \n ",
                     " = Tower Building = \n \n The tower , 1 @,@ 000 ft . \n"]
    docs = read_wikitext(path)
    assert [d.record["page"] for d in docs] == pages and [d.line for d in docs] == [2, 10]


@pytest.mark.parametrize("page", [RAW, " = A = \n \" quoted \" [ x ] { y } ( z ) 5 @.@ 5 N ; : ! ? 's s ' \u00b0 \n",
                                  "= = = = Deep = = = = \n = = = Less = = = \n"])
def test_wikitext_detokenizer_is_lm_evals(page):
    assert wikitext_detokenize(page) == lm_eval_wikitext.wikitext_detokenizer({"page": page})


@pytest.mark.parametrize("lines,reader,message", [
    (['{"ctx_a": "a", "ctx_b": "b", "activity_label": "c", "endings": ["x"], "label": 0}', '{"ctx_a": "a"'],
     read_hellaswag, r"data.jsonl:2: invalid JSON"),
    (['{"ctx_a": "a", "ctx_b": "b", "activity_label": "c", "label": 0}'], read_hellaswag,
     r"data.jsonl:1: missing field 'endings'"),
    (['{"ctx_a": "a", "ctx_b": "b", "activity_label": "c", "endings": ["x", "y"], "label": 5}'], read_hellaswag,
     r"data.jsonl:1: field 'label' = 5 names none of the 2 choices"),
    (['', '{"question": {"choices": []}, "answerKey": "A"}'], read_arc, r"data.jsonl:2: missing field 'question.stem'"),
    (['{"question": "q", "choices": {"text": ["a"], "label": ["A"]}, "answerKey": "B"}'], read_arc,
     r"data.jsonl:1: field 'answerKey' = 'B' is not one of the choice labels \['A'\]"),
    (['{"sentence": "no blank", "option1": "a", "option2": "b", "answer": "1"}'], read_winogrande,
     r"data.jsonl:1: field 'sentence' has no '_'"),
    (['{"text": 5}'], read_lambada, r"data.jsonl:1: field 'text' holds int, expected str"),
    (['[1, 2]'], read_lambada, r"data.jsonl:1: expected a JSON object"),
])
def test_bad_input_names_file_line_and_field(tmp_path, lines, reader, message):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        reader(path)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl: no such file"):
        read_hellaswag(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="empty.jsonl: empty file"):
        read_arc(tmp_path / "empty.jsonl")
    with pytest.raises(FileNotFoundError, match="wiki.raw: no such file"):
        read_wikitext(tmp_path / "wiki.raw")
