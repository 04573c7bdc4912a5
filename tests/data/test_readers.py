import json
import re
from collections import Counter

import pytest

from lmforge.data.readers import (
    read_chat,
    read_classification,
    read_conll,
    read_parallel,
    read_seq2seq,
    read_squad,
)


def write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def jsonl(tmp_path, name: str, records: list) -> object:
    return write(tmp_path, name, "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))


def raises_at(path, line: int | None, *fragments: str):
    """pytest.raises(ValueError) whose message starts with "path:line:" and contains the fragments."""
    where = f"{path}:{line}: " if line is not None else f"{path}: "
    return pytest.raises(ValueError, match=re.escape(where) + ".*" + ".*".join(re.escape(f) for f in fragments))


# ----------------------------------------------------------------------------- classification


def test_ag_news_headerless_csv_by_index(shared_data):
    data = read_classification(shared_data / "ag_news" / "test.csv", label_col=0, text_col=1, text_pair_col=2)
    assert len(data) == 7600 and data.skipped == 0
    assert data.label_names == ["1", "2", "3", "4"]  # sorted, so id = class - 1 (classes.txt order)
    assert Counter(data.labels) == {0: 1900, 1: 1900, 2: 1900, 3: 1900}
    assert data.texts[0] == "Fears for T N pension after talks" and data.labels[0] == 2
    assert data.text_pairs[0].startswith("Unions representing workers at Turner")


def test_classification_label_mapping_and_unseen_label(tmp_path):
    records = [{"text": "a", "label": 10}, {"text": "b", "label": 2}, {"text": "c", "label": 2}]
    train = jsonl(tmp_path, "train.jsonl", records)
    data = read_classification(train)
    assert data.label_names == ["2", "10"] and data.labels == [1, 0, 0]  # numeric order, not file order
    assert data.label2id == {"2": 0, "10": 1}
    words = read_classification(write(tmp_path, "w.csv", "text,label\nx,sports\ny,business\nz,sports\n"))
    assert words.label_names == ["business", "sports"] and words.labels == [1, 0, 1]
    valid = write(tmp_path, "valid.csv", "label,text\nsports,fine\nweather,rain today\n")
    with raises_at(valid, 3, "'weather'"):
        read_classification(valid, label_names=words.label_names)
    skipped = read_classification(valid, label_names=words.label_names, skip_bad=True)
    assert skipped.labels == [1] and skipped.skipped == 1


def test_classification_text_pairs_and_tsv_quotes(tmp_path):
    path = write(tmp_path, "pairs.tsv", 'premise\thypothesis\tlabel\nA "quoted" man\tA man\tentailment\n')
    data = read_classification(path, text_col="premise", text_pair_col="hypothesis")
    assert data.texts == ['A "quoted" man'] and data.text_pairs == ["A man"] and data.labels == [0]


def test_classification_multi_label(tmp_path):
    path = write(tmp_path, "m.csv", "text,tags\none,b;a\ntwo,c\nthree,\n")
    data = read_classification(path, label_col="tags", multi_label=True, label_sep=";")
    assert data.label_names == ["a", "b", "c"] and data.labels == [[0, 1], [2], []]
    js = jsonl(tmp_path, "m.jsonl", [{"text": "x", "label": ["b", "a"]}, {"text": "y", "label": '["c"]'}])
    assert read_classification(js, multi_label=True).labels == [[0, 1], [2]]
    with raises_at(js, 1, "multi_label=True"):
        read_classification(js)


def test_classification_bad_records(tmp_path):
    path = write(tmp_path, "bad.csv", 'text,label\ngood,a\n"multi\nline",b\nonly-one-column\n,a\nfine,b\n')
    with raises_at(path, 5, "expected 2 columns, found 1"):  # the multi-line record starts on line 3
        read_classification(path)
    data = read_classification(path, skip_bad=True)
    assert data.texts == ["good", "multi\nline", "fine"] and data.skipped == 2  # short row and empty text
    js = jsonl(tmp_path, "bad.jsonl", [{"text": "ok", "label": "a"}, "{not json", {"txt": "x", "label": "a"}, [1]])
    with raises_at(js, 2, "invalid JSON"):
        read_classification(js)
    assert read_classification(js, skip_bad=True).skipped == 3
    missing = jsonl(tmp_path, "missing.jsonl", [{"text": "ok", "label": "a"}, "", {"txt": "x", "label": "a"}])
    with raises_at(missing, 3, "missing field 'text'"):
        read_classification(missing)


def test_classification_file_level_errors(tmp_path):
    with pytest.raises(ValueError, match=r"missing column 'label'.*header: text, y"):
        read_classification(write(tmp_path, "h.csv", "text,y\na,b\n"))
    with pytest.raises(ValueError, match="empty file"):
        read_classification(write(tmp_path, "e.csv", ""))
    with pytest.raises(ValueError, match="empty file"):
        read_classification(write(tmp_path, "only_header.csv", "text,label\n"))
    with pytest.raises(ValueError, match=r"no valid records \(1 malformed skipped\)"):
        read_classification(write(tmp_path, "allbad.csv", "text,label\n,a\n"), skip_bad=True)
    with pytest.raises(ValueError, match="cannot tell the format from the name: expected .csv, .tsv, .jsonl"):
        read_classification(write(tmp_path, "data.txt", "text,label\na,b\n"))
    with pytest.raises(ValueError, match="column index 5 out of range"):
        read_classification(write(tmp_path, "n.csv", "a,b\n"), text_col=5, label_col=0)
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        read_classification(tmp_path / "nope.csv")


# ----------------------------------------------------------------------------- NER


def test_wnut17(shared_data):
    root = shared_data / "wnut17"
    train = read_conll(root / "wnut17train.conll")
    assert len(train) == 3394 and sum(map(len, train.tokens)) == 62730 and train.skipped == 0
    assert train.tokens[0][:3] == ["@paulwalk", "It", "'s"]
    assert train.tokens[0][14:17] == ["Empire", "State", "Building"]
    assert train.tags[0][14:17] == ["B-location", "I-location", "I-location"]
    types = ["corporation", "creative-work", "group", "location", "person", "product"]
    assert train.label_names == ["O"] + [f"{p}-{t}" for t in types for p in "BI"]
    assert train.labels[0][14] == train.label_names.index("B-location")
    dev = read_conll(root / "emerging.dev.conll", label_names=train.label_names)
    assert len(dev) == 1009 and dev.repaired == 1  # one I-creative-work right after I-person starts an entity
    assert len(read_conll(root / "emerging.test.annotated", label_names=train.label_names)) == 1287
    for tags in dev.tags:  # IOB2 holds everywhere after reading
        for prev, tag in zip(["O", *tags], tags):
            assert not tag.startswith("I-") or prev[2:] == tag[2:]


CONLL03 = """-DOCSTART- -X- -X- O

EU NNP B-NP I-ORG
rejects VBZ B-VP O
German JJ B-NP I-MISC
call NN I-NP O

Peter NNP B-NP I-PER
Blackburn NNP I-NP I-PER
Paul NNP I-NP B-PER
"""


def test_conll_iob1_converted_and_docstart_skipped(tmp_path):
    path = write(tmp_path, "c.txt", CONLL03)
    data = read_conll(path, scheme="iob1")
    assert data.tokens == [["EU", "rejects", "German", "call"], ["Peter", "Blackburn", "Paul"]]
    assert data.tags == [["B-ORG", "O", "B-MISC", "O"], ["B-PER", "I-PER", "B-PER"]]
    assert data.repaired == 0
    assert read_conll(path, token_col=1).tokens[0][0] == "NNP"


def test_conll_bad_lines(tmp_path):
    path = write(tmp_path, "bad.conll", "a\tO\nb\tB-PER\n\nc\tO\td\n\ne\tX-PER\n\nf\tB-LOC\n")
    with raises_at(path, 4, "expected 2 columns, found 3"):
        read_conll(path)
    data = read_conll(path, skip_bad=True)
    assert data.tokens == [["a", "b"], ["f"]] and data.skipped == 2
    bad_tag = write(tmp_path, "tag.conll", "a\tO\nb\tPER\n")
    with raises_at(bad_tag, 2, "bad tag 'PER'"):
        read_conll(bad_tag)
    unseen = write(tmp_path, "unseen.conll", "a\tO\n\nb\tB-PER\nc\tI-DATE\n")
    with raises_at(unseen, 4, "'I-DATE'", "not among the known labels"):
        read_conll(unseen, label_names=["O", "B-PER", "I-PER"])
    with pytest.raises(ValueError, match="empty file"):
        read_conll(write(tmp_path, "empty.conll", "\n\n"))
    with pytest.raises(ValueError, match="scheme"):
        read_conll(path, scheme="bioes")


# ----------------------------------------------------------------------------- extractive QA

CTX1 = "The river Wend runs through Ashford. It was bridged in 1820 by Mary Hale."
CTX2 = "Copper turns green when it oxidises."


def squad(version: str | None, qas2: list | None = None) -> dict:
    qas1 = [
        {"id": "q1", "question": "Which river runs through Ashford?", "answers": [
            {"text": "Wend", "answer_start": 10}, {"text": "The river Wend", "answer_start": 0}]},
        {"id": "q2", "question": "When was it bridged?", "answers": [{"text": "1820", "answer_start": 55}]},
    ]
    qas2 = qas2 if qas2 is not None else [
        {"id": "q3", "question": "What colour does copper turn?", "answers": [{"text": "green", "answer_start": 13}]}]
    top = {"data": [{"title": "Ashford", "paragraphs": [{"context": CTX1, "qas": qas1}]},
                    {"title": "Metals", "paragraphs": [{"context": CTX2, "qas": qas2}]}]}
    return top | ({"version": version} if version else {})


def dump(tmp_path, name: str, obj) -> object:
    return write(tmp_path, name, json.dumps(obj, indent=1))


def test_squad_v1(tmp_path):
    data = read_squad(dump(tmp_path, "v1.json", squad("1.1")))
    assert data.version == "1.1" and len(data) == 3 and data.skipped == 0
    q1 = data.examples[0]
    assert (q1.id, q1.title, q1.context, q1.is_impossible) == ("q1", "Ashford", CTX1, False)
    assert [(a.text, a.start) for a in q1.answers] == [("Wend", 10), ("The river Wend", 0)]
    assert data.examples[2].answers[0].text == "green"


def test_squad_v2_and_detection(tmp_path):
    impossible = {"id": "q4", "question": "Who discovered copper?", "answers": [], "is_impossible": True,
                  "plausible_answers": [{"text": "Copper", "answer_start": 0}]}
    q3 = squad(None)["data"][1]["paragraphs"][0]["qas"][0] | {"is_impossible": False}
    for version, name in (("v2.0", "declared.json"), (None, "detected.json")):
        data = read_squad(dump(tmp_path, name, squad(version, [q3, impossible])))
        assert data.version == "2.0" and len(data) == 4
        assert data.examples[3].is_impossible and data.examples[3].answers == []
    with pytest.raises(ValueError, match="'q4': no answers"):  # v1.1 questions need an answer
        read_squad(dump(tmp_path, "v1bad.json", squad("1.1", [q3, {**impossible, "is_impossible": False}])))


def test_squad_bad_records(tmp_path):
    shifted = {"id": "q9", "question": "What turns green?", "answers": [{"text": "Copper", "answer_start": 1}]}
    path = dump(tmp_path, "bad.json", squad("1.1", [shifted]))
    with raises_at(path, None, "question id 'q9'", "'Copper' at 1 does not match", "'opper '"):
        read_squad(path)
    data = read_squad(path, skip_bad=True)
    assert [e.id for e in data.examples] == ["q1", "q2"] and data.skipped == 1
    cases = {
        "missing field 'question'": {"id": "q5", "answers": []},
        "duplicate id": {"id": "q1", "question": "Again?", "answers": [{"text": "green", "answer_start": 13}]},
        "is_impossible but has answers": {"id": "q6", "question": "?", "is_impossible": True,
                                          "answers": [{"text": "green", "answer_start": 13}]},
    }
    for i, (fragment, qa) in enumerate(cases.items()):
        with raises_at(path := dump(tmp_path, f"c{i}.json", squad("2.0", [qa])), None, fragment):
            read_squad(path)
    broken = write(tmp_path, "broken.json", '{"data": [\n{"title": "x",\n}')
    with raises_at(broken, 3, "invalid JSON"):
        read_squad(broken)
    with pytest.raises(ValueError, match="'data' list"):
        read_squad(dump(tmp_path, "nodata.json", {"version": "1.1"}))
    with pytest.raises(ValueError, match="empty file"):
        read_squad(write(tmp_path, "empty.json", "  \n"))


# ----------------------------------------------------------------------------- seq2seq


def test_dialogsum(shared_data):
    root = shared_data / "dialogsum"
    dev = read_seq2seq(root / "dialogsum.dev.jsonl", source_field="dialogue", target_field="summary")
    assert len(dev) == 500 and dev.skipped == 0
    assert dev.sources[0].startswith("#Person1#: Hello, how are you doing today?\n#Person2#:")
    assert dev.targets[0].startswith("#Person2# has trouble breathing.")
    test = read_seq2seq(root / "dialogsum.test.jsonl", source_field="dialogue", target_field="summary1")
    assert len(test) == 500
    with raises_at(root / "dialogsum.test.jsonl", 1, "missing field 'summary'"):
        read_seq2seq(root / "dialogsum.test.jsonl", source_field="dialogue", target_field="summary")


def test_seq2seq_tsv(tmp_path):
    data = read_seq2seq(write(tmp_path, "s.tsv", "src\ttgt\nhello\thallo\nbye\ttschüss\n"),
                        source_field="src", target_field="tgt")
    assert (data.sources, data.targets) == (["hello", "bye"], ["hallo", "tschüss"])
    headerless = write(tmp_path, "h.tsv", "hello\thallo\n\tleer\n")
    with raises_at(headerless, 2, "empty 0"):
        read_seq2seq(headerless, source_field=0, target_field=1)
    assert read_seq2seq(headerless, source_field=0, target_field=1, skip_bad=True).skipped == 1


def test_multi30k_parallel(shared_data):
    root = shared_data / "multi30k"
    data = read_parallel(root / "train.de", root / "train.en")
    assert len(data) == 29000
    assert data.sources[0] == "Zwei junge weiße Männer sind im Freien in der Nähe vieler Büsche."
    assert data.targets[0] == "Two young, White males are outside near many bushes."
    with pytest.raises(ValueError, match=r"line count mismatch: .*train\.de has 29000 lines, .*val\.en has 1014"):
        read_parallel(root / "train.de", root / "val.en")


def test_parallel_errors(tmp_path):
    src, tgt = write(tmp_path, "a.de", "eins\nzwei\ndrei\n"), write(tmp_path, "a.en", "one\ntwo\n")
    with pytest.raises(ValueError, match=r"a\.de has 3 lines, .*a\.en has 2"):
        read_parallel(src, tgt)
    with pytest.raises(ValueError, match=r"b\.de has 2 lines, .*b\.en has 3"):
        read_parallel(write(tmp_path, "b.de", "x\ny\n"), write(tmp_path, "b.en", "x\ny\nz\n"))
    tgt = write(tmp_path, "c.en", "one\n\nthree\n")
    with raises_at(tgt, 2, "empty line"):
        read_parallel(src, tgt)
    data = read_parallel(src, tgt, skip_bad=True)
    assert data.sources == ["eins", "drei"] and data.targets == ["one", "three"] and data.skipped == 1
    with pytest.raises(ValueError, match="empty file"):
        read_parallel(write(tmp_path, "e.de", ""), write(tmp_path, "e.en", ""))


# ----------------------------------------------------------------------------- chat


def test_chat_formats(tmp_path):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"},
                {"role": "assistant", "content": "Bye."}]
    path = jsonl(tmp_path, "chat.jsonl", [
        {"messages": messages},
        {"prompt": "2+2?", "response": "4", "system": "Maths tutor."},
        {"instruction": "Translate to French.", "input": "cat", "output": "chat"},
        {"instruction": "Name a colour.", "input": "", "output": "Blue"},
    ])
    data = read_chat(path)
    assert data.skipped == 0 and data.conversations[0] == messages
    assert data.conversations[1] == [{"role": "system", "content": "Maths tutor."}, {"role": "user", "content": "2+2?"},
                                     {"role": "assistant", "content": "4"}]
    assert data.conversations[2][0] == {"role": "user", "content": "Translate to French.\n\ncat"}
    assert data.conversations[3] == [{"role": "user", "content": "Name a colour."},
                                     {"role": "assistant", "content": "Blue"}]


def test_chat_validation(tmp_path):
    ok = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    bad = {
        "role 'bot' is not one of system, user, assistant": [{"role": "bot", "content": "x"}],
        "message 1: content must be a non-empty string": [{"role": "user", "content": "q"},
                                                          {"role": "assistant", "content": "  "}],
        "no assistant message": [{"role": "user", "content": "q"}],
        "message 1: a system message may only come first": [{"role": "user", "content": "q"},
                                                            {"role": "system", "content": "s"}],
    }
    for i, (fragment, messages) in enumerate(bad.items()):
        path = jsonl(tmp_path, f"bad{i}.jsonl", [ok, {"messages": messages}])
        with raises_at(path, 2, fragment):
            read_chat(path)
    path = jsonl(tmp_path, "mixed.jsonl", [ok, {"question": "?"}, "", {"messages": "hi"}, ok])
    with raises_at(path, 2, "expected 'messages', 'prompt'/'response' or 'instruction'/'output'"):
        read_chat(path)
    data = read_chat(path, skip_bad=True)
    assert len(data) == 2 and data.skipped == 2
    with pytest.raises(ValueError, match="empty file"):
        read_chat(write(tmp_path, "empty.jsonl", "\n"))
