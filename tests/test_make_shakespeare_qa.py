"""scripts/make_shakespeare_qa.py (the QA example's data) writes SQuAD v1.1 that lmforge reads,
with every answer where answer_start says: `who` at the heading of the speech holding the
quoted line, `next` on the line right after it."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from lmforge.data.readers import read_squad

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "make_shakespeare_qa.py"


def load_script():
    spec = importlib.util.spec_from_file_location("make_shakespeare_qa", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def check_answers(paragraphs: list[dict]) -> dict[str, int]:
    """Assert each question's answer fits its kind; returns the number of questions per kind."""
    counts = {"who": 0, "next": 0}
    for p in paragraphs:
        context = p["context"]
        for qa in p["qas"]:
            (answer,) = qa["answers"]
            start, text = answer["answer_start"], answer["text"]
            assert context[start:start + len(text)] == text
            kind = qa["id"].rsplit("-", 1)[1]
            counts[kind] += 1
            if kind == "who":
                quote = qa["question"].removeprefix('Who says "').removesuffix('"?')
                assert context[start:start + len(text) + 2] == text + ":\n"  # a speech's heading
                where, speech_end = context.index(quote), context.find("\n\n", start)
                assert start < where and (speech_end == -1 or where < speech_end), qa["id"]
            else:
                quote = qa["question"].removeprefix('What is the line after "').removesuffix('"?')
                assert context[start - len(quote) - 1:start] == quote + "\n", qa["id"]
                assert context[start + len(text):start + len(text) + 1] in ("", "\n")  # a whole line
            assert context.count(quote) == 1
    return counts


def test_writes_squad_that_read_squad_accepts(tmp_path, capsys):
    load_script().main(["--out", str(tmp_path)])  # the packaged Tiny Shakespeare
    assert "questions on" in capsys.readouterr().out
    names = ("train", "valid", "valid-who", "valid-next")
    sets = {name: json.loads((tmp_path / f"{name}.json").read_text(encoding="utf-8")) for name in names}
    read = {name: read_squad(tmp_path / f"{name}.json") for name in names}
    assert all(data.version == "1.1" and data.skipped == 0 for data in read.values())
    assert len(read["train"].examples) > 5 * len(read["valid"].examples) > 2000
    assert len(read["valid-who"].examples) + len(read["valid-next"].examples) == len(read["valid"].examples)
    contexts = {name: {p["context"] for p in squad["data"][0]["paragraphs"]} for name, squad in sets.items()}
    assert not contexts["train"] & contexts["valid"]
    counts = {name: check_answers(squad["data"][0]["paragraphs"]) for name, squad in sets.items()}
    assert counts["train"]["who"] > counts["train"]["next"] > 1000
    assert counts["valid-who"] == {"who": counts["valid"]["who"], "next": 0}


def test_passages_have_two_speakers():
    script = load_script()
    text = "\n\n".join(f"{who}:\nline number {i} of the speech\nand one more line here {i}"
                       for i, who in enumerate(["ANNE", "BOB", "ANNE", "ANNE", "CAROL", "DAN", "DAN"]))
    sets = script.build(text, per_passage=2, max_chars=10_000, valid_fraction=0.0, kinds=("who",))
    paragraphs = sets["train"]["data"][0]["paragraphs"]
    # passages ANNE+BOB, ANNE+ANNE (one speaker: dropped), CAROL+DAN, DAN (dropped)
    assert [[q["answers"][0]["text"] for q in p["qas"]] for p in paragraphs] == [["ANNE", "BOB"], ["CAROL", "DAN"]]
    assert sets["valid"]["data"][0]["paragraphs"] == [] and set(sets) == {"train", "valid", "valid-who"}
    nexts = script.build(text, per_passage=2, max_chars=10_000, valid_fraction=0.0, kinds=("next",))
    answers = [q["answers"][0]["text"] for p in nexts["train"]["data"][0]["paragraphs"] for q in p["qas"]]
    assert answers == ["and one more line here 0", "and one more line here 1", "and one more line here 4",
                       "and one more line here 5"]
    check_answers(nexts["train"]["data"][0]["paragraphs"])
    with pytest.raises(ValueError, match="question kinds"):
        script.build(text, kinds=("why",))
