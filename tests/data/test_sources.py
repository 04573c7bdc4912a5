"""Corpus sources: every format, streaming across block boundaries, and clear errors for bad input."""

import gzip
import json
import random
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmforge.data import sources
from lmforge.data.sources import format_of, iter_documents, resolve_inputs


def _write(path, text, gz=False):
    data = text.encode("utf-8") if isinstance(text, str) else text
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def test_format_of():
    assert format_of("a/b.jsonl.gz") == ("jsonl", True)
    assert format_of("corpus.v2.TXT") == ("txt", False)
    assert format_of("x.tsv") == ("tsv", False)
    with pytest.raises(ValueError, match=r"x\.tar\.gz.*unknown corpus format"):
        format_of("x.tar.gz")


def test_txt_blank_line_documents(tmp_path):
    text = "First doc line 1\nline 2\n\nSecond\n\n\n  \t \nThird\r\n\r\nFourth\n  indented\n"
    path = _write(tmp_path / "a.txt", text)
    assert list(iter_documents(path)) == ["First doc line 1\nline 2", "Second", "Third", "Fourth\n  indented"]
    assert list(iter_documents(path, doc_per_file=True)) == [text.strip("\r\n")]


@pytest.mark.parametrize("block_size", [1, 3, 7, 64])
def test_txt_split_is_independent_of_block_size(tmp_path, monkeypatch, block_size):
    rng = random.Random(block_size)
    lines = [rng.choice(["", " ", "alpha beta", "gamma", "\u4f60\u597d\u4e16\u754c", "  x"]) for _ in range(300)]
    text = "\n".join(lines) + "\n"
    expected = [d.strip("\r\n") for d in re.split(r"\n(?:[ \t\r\f\v]*\n)+", text) if d.strip()]
    path = _write(tmp_path / "a.txt", text)
    monkeypatch.setattr(sources, "BLOCK_SIZE", block_size)
    assert list(iter_documents(path)) == expected


def test_jsonl_field_and_errors(tmp_path):
    rows = [{"text": "one", "id": 1}, {"text": "two"}, {"body": "three", "text": None}]
    path = _write(tmp_path / "a.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert list(iter_documents(path)) == ["one", "two"]  # null documents are skipped
    with pytest.raises(ValueError, match=r"a\.jsonl:1: no field 'body' \(fields: text, id\)"):
        list(iter_documents(path, field="body"))
    bad = _write(tmp_path / "bad.jsonl", '{"text": "ok"}\n{"text": "unterminated\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: malformed JSON"):
        list(iter_documents(bad))
    arr = _write(tmp_path / "arr.jsonl", '["x"]\n')
    with pytest.raises(ValueError, match=r"arr\.jsonl:1: expected a JSON object, got list"):
        list(iter_documents(arr))
    num = _write(tmp_path / "num.jsonl", '{"text": 3}\n')
    with pytest.raises(ValueError, match=r"num\.jsonl:1: field 'text' holds int"):
        list(iter_documents(num))


def test_csv_and_tsv(tmp_path):
    csv_path = _write(tmp_path / "a.csv", 'id,text\n1,"multi\nline, with comma"\n2,plain\n3,\n')
    assert list(iter_documents(csv_path)) == ["multi\nline, with comma", "plain"]
    tsv_path = _write(tmp_path / "a.tsv", "label\tbody\nx\tfirst\ny\tsecond\n")
    assert list(iter_documents(tsv_path, field="body")) == ["first", "second"]
    with pytest.raises(ValueError, match=r"a\.tsv:1: no column 'text' \(columns: label, body\)"):
        list(iter_documents(tsv_path))
    short = _write(tmp_path / "short.csv", "a,text\n1,ok\n2\n")
    with pytest.raises(ValueError, match=r"short\.csv:3: row has 1 columns"):
        list(iter_documents(short))


def test_parquet_streams_row_groups(tmp_path):
    texts = [f"document {i}" for i in range(50)] + [None, "last"]
    table = pa.table({"text": texts, "n": list(range(len(texts)))})
    path = tmp_path / "a.parquet"
    pq.write_table(table, path, row_group_size=7)
    assert pq.ParquetFile(path).num_row_groups > 1
    assert list(iter_documents(path)) == [t for t in texts if t is not None]
    with pytest.raises(ValueError, match=r"a\.parquet: no column 'body' \(columns: text, n\)"):
        list(iter_documents(path, field="body"))
    _write(tmp_path / "gz.parquet.gz", path.read_bytes(), gz=True)
    assert list(iter_documents(tmp_path / "gz.parquet.gz")) == [t for t in texts if t is not None]
    broken = _write(tmp_path / "broken.parquet", b"not parquet at all")
    with pytest.raises(ValueError, match=r"broken\.parquet: not a readable Parquet file"):
        list(iter_documents(broken))


def test_gzip_inputs(tmp_path):
    _write(tmp_path / "a.txt.gz", "one\n\ntwo\n", gz=True)
    _write(tmp_path / "b.jsonl.gz", '{"text": "three"}\n', gz=True)
    _write(tmp_path / "c.csv.gz", "text\nfour\n", gz=True)
    assert list(iter_documents(tmp_path)) == ["one", "two", "three", "four"]
    _write(tmp_path / "bad.txt.gz", b"\x1f\x8b not really gzip")
    with pytest.raises(ValueError, match=r"bad\.txt\.gz: cannot read compressed data"):
        list(iter_documents(tmp_path / "bad.txt.gz"))


def test_non_utf8_refused_or_replaced(tmp_path):
    path = _write(tmp_path / "latin.txt", b"fine line\nsecond \xe9t\xe9 line\n")
    with pytest.raises(ValueError, match=r"latin\.txt:2: not valid UTF-8 \(byte offset 17\).*errors='replace'"):
        list(iter_documents(path))
    assert list(iter_documents(path, errors="replace")) == ["fine line\nsecond \ufffdt\ufffd line"]
    jpath = _write(tmp_path / "latin.jsonl", b'{"text": "ok"}\n{"text": "\xff"}\n')
    with pytest.raises(ValueError, match=r"latin\.jsonl:2: not valid UTF-8 \(byte offset 25\)"):
        list(iter_documents(jpath))
    with pytest.raises(ValueError, match="errors must be"):
        list(iter_documents(path, errors="ignore"))


def test_bom_is_dropped(tmp_path):
    path = _write(tmp_path / "bom.txt", "\ufeffhello\n")
    assert list(iter_documents(path)) == ["hello"]


def test_directories_globs_and_missing_inputs(tmp_path):
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    _write(tmp_path / "sub" / "b.txt", "B\n")
    _write(tmp_path / "sub" / "deeper" / "a.txt", "A\n")
    _write(tmp_path / "sub" / "notes.md", "skipped: unknown format\n")
    _write(tmp_path / "sub" / ".hidden.txt", "skipped: hidden\n")
    _write(tmp_path / "top.jsonl", '{"text": "T"}\n')
    assert resolve_inputs(tmp_path / "sub") == [tmp_path / "sub" / "b.txt", tmp_path / "sub" / "deeper" / "a.txt"]
    assert list(iter_documents(str(tmp_path / "**" / "*.txt"))) == ["B", "A"]
    assert list(iter_documents([tmp_path / "top.jsonl", tmp_path / "sub"])) == ["T", "B", "A"]
    with pytest.raises(FileNotFoundError, match=r"missing\.txt: no such file"):
        list(iter_documents(tmp_path / "missing.txt"))
    with pytest.raises(FileNotFoundError, match=r"nothing\*\.txt: pattern matches no corpus files"):
        resolve_inputs(str(tmp_path / "nothing*.txt"))
    with pytest.raises(ValueError, match=r"notes\.md: unknown corpus format"):
        resolve_inputs(tmp_path / "sub" / "notes.md")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(FileNotFoundError, match="directory holds no corpus files"):
        resolve_inputs(tmp_path / "empty_dir")


def test_empty_corpus(tmp_path):
    _write(tmp_path / "blank.txt", "\n \n\n")
    _write(tmp_path / "empty.jsonl", "")
    with pytest.raises(ValueError, match=r"empty corpus: no documents in .*blank\.txt"):
        list(iter_documents([tmp_path / "blank.txt", tmp_path / "empty.jsonl"]))
