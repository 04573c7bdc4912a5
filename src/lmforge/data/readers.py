"""Task data readers for fine-tuning: classification (CSV/TSV/JSONL), NER (CoNLL columns),
extractive QA (SQuAD v1.1/v2.0), seq2seq (JSONL/TSV or line-aligned parallel files) and
chat / instruction data (JSONL).

Each reader also takes the dataset sources of lmforge.data.datasets_io (Parquet files,
`datasets` save_to_disk directories, Hub id:split), whose records are named by row:
"fancyzhx/ag_news:train[12]: empty 'text'"; `columns` renames their columns (and the
CSV/JSONL columns of classification and seq2seq files) first.

Readers validate while they read. With skip_bad=False (the default) the first malformed
record raises ValueError "file:line: what is wrong" (SQuAD: "file: question id ...: ...");
with skip_bad=True malformed records are skipped and counted in the result's `skipped`.
An empty file, a file with no valid record, and a column missing from a header always raise.
Text comes back as str; tokenization belongs to the task modules.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import zip_longest
from pathlib import Path
from typing import Any

from lmforge.data.datasets_io import is_dataset_source, iter_rows, open_table, parse_columns

Column = str | int
Columns = str | dict[str, str] | None  # OLD=NEW renames (see datasets_io.parse_columns)
ROLES = ("system", "user", "assistant")
_TAG = re.compile(r"^(O|[BI]-\S+)$")


class _BadRecord(Exception):
    """A malformed record; the reader adds the location and raises or skips."""


class _Tally:
    """Raises or counts bad records for one file."""

    def __init__(self, path: Path, skip_bad: bool) -> None:
        self.path, self.skip_bad, self.skipped = path, skip_bad, 0

    def bad(self, line: int | str | None, msg: str) -> None:
        """Raise "file:line: msg" ("source[row]: msg" for a dataset row, "file: msg" where lines
        mean nothing), or count when skipping."""
        if not self.skip_bad:
            where = f"{self.path}:{line}" if isinstance(line, int) else f"{self.path}{line or ''}"
            raise ValueError(f"{where}: {msg}")
        self.skipped += 1

    def check_nonempty(self, n_records: int) -> None:
        if n_records == 0:
            raise ValueError(f"{self.path}: no valid records ({self.skipped} malformed skipped)" if self.skipped
                             else f"{self.path}: empty file (no records)")


def _lines(path: str | Path, newline: str | None = None) -> Iterator[tuple[int, str]]:
    """(1-based line number, line) of a UTF-8 text file (a BOM is dropped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    no = 0
    with path.open(encoding="utf-8-sig", newline=newline) as f:
        try:
            for no, line in enumerate(f, 1):
                yield no, line
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}:{no + 1}: not valid UTF-8 ({e.reason})") from None


def _format(path: Path, fmt: str | None) -> str:
    fmt = fmt or {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl"}.get(
        path.suffix.lower())
    if fmt not in ("csv", "tsv", "jsonl"):
        raise ValueError(f"{path}: cannot tell the format from the name: expected .csv, .tsv, .jsonl or .parquet, "
                         "a datasets save_to_disk directory or a Hub dataset id:split")
    return fmt


def _jsonl(path: Path, tally: _Tally) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line, object) per non-blank JSONL line; invalid JSON and non-objects are bad records."""
    for no, line in _lines(path):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            tally.bad(no, f"invalid JSON ({e.msg}, column {e.colno})")
            continue
        if isinstance(obj, dict):
            yield no, obj
        else:
            tally.bad(no, f"expected a JSON object, got {type(obj).__name__}")


def read_jsonl(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """(line, object) for each non-blank line of a JSONL file. The first line that is not a
    JSON object raises ValueError "file:line: ...", and so does a file without records."""
    path = Path(path)
    tally = _Tally(path, skip_bad=False)
    records = list(_jsonl(path, tally))
    tally.check_nonempty(len(records))
    return records


def _rows(path: Path, fmt: str | None, columns: Sequence[Column], header: bool | None,
          tally: _Tally, rename: dict[str, str] | None = None) -> Iterator[tuple[int | str, list[Any]]]:
    """(line, [value of each requested column]) from CSV, TSV or JSONL, or ("[row]", values)
    from a dataset source.

    Columns are header names or 0-based indices; header=None means "has a header unless every
    column is an index". TSV is read without quoting (quotes are text, as in GLUE-style files).
    A row with another column count than the header (or the first row) is a bad record.
    rename: {old: new} column names; the requested columns are the new names.
    """
    if is_dataset_source(path):
        yield from iter_rows(open_table(path), columns, rename)
        return
    original = {new: old for old, new in (rename or {}).items()}
    columns = [original.get(c, c) if isinstance(c, str) else c for c in columns]
    fmt = _format(path, fmt)
    if fmt == "jsonl":
        for no, obj in _jsonl(path, tally):
            missing = [c for c in columns if c not in obj]
            if missing:
                tally.bad(no, f"missing field {missing[0]!r}")
                continue
            yield no, [obj[c] for c in columns]
        return
    if header is None:
        header = not all(isinstance(c, int) for c in columns)
    csv.field_size_limit(max(csv.field_size_limit(), 1 << 30))  # long documents are normal here
    lines = (line for _, line in _lines(path, newline=""))
    reader = csv.reader(lines, delimiter="\t", quoting=csv.QUOTE_NONE) if fmt == "tsv" else csv.reader(lines)
    width: int | None = None
    index: list[int] = []
    prev = 0
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            tally.bad(reader.line_num, f"malformed {fmt.upper()} ({e})")
            prev = reader.line_num
            continue
        no, prev = prev + 1, reader.line_num  # a quoted field may span lines: report where the record starts
        if not row or (len(row) == 1 and not row[0].strip()):
            continue
        if width is None:
            width = len(row)
            names = [c.strip() for c in row] if header else []
            for c in columns:
                if isinstance(c, int) and not -width <= c < width:
                    raise ValueError(f"{path}: column index {c} out of range ({width} columns)")
                if isinstance(c, str) and c not in names:
                    raise ValueError(f"{path}: missing column {c!r} (header: {', '.join(names) or 'none'})")
            index = [c if isinstance(c, int) else names.index(c) for c in columns]
            if header:
                continue
        if len(row) != width:
            tally.bad(no, f"expected {width} columns, found {len(row)}")
            continue
        yield no, [row[i] for i in index]


def _text(value: Any, name: Column) -> str:
    if not isinstance(value, str):
        raise _BadRecord(f"field {name!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise _BadRecord(f"empty {name!r}")
    return value


# ----------------------------------------------------------------------------- classification


@dataclass
class ClassificationData:
    """texts[i] (and text_pairs[i]) with labels[i]: a class id, or a list of ids when multi_label.
    label_names[id] is the name of class id; save it beside the model."""

    texts: list[str]
    labels: list[Any]
    label_names: list[str]
    text_pairs: list[str] | None = None
    multi_label: bool = False
    skipped: int = 0

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def label2id(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.label_names)}


def _label_strings(value: Any, multi_label: bool, sep: str) -> list[str]:
    if isinstance(value, str) and multi_label and value.strip().startswith("["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise _BadRecord(f"label list is not valid JSON ({e.msg})") from None
    if isinstance(value, list):
        if not multi_label:
            raise _BadRecord("label is a list; pass multi_label=True")
        items = value
    elif isinstance(value, str):
        items = value.split(sep) if multi_label else [value]
    else:
        items = [value]
    out = []
    for v in items:
        if isinstance(v, bool | int | float):
            v = json.dumps(v)
        if not isinstance(v, str):
            raise _BadRecord(f"label must be a string or number, got {type(v).__name__}")
        if v.strip():
            out.append(v.strip())
        elif not multi_label:
            raise _BadRecord("empty label")
    return out


def _sorted_labels(names: set[str]) -> list[str]:
    """Numeric labels in numeric order ("2" before "10"), otherwise lexicographic."""
    if all(re.fullmatch(r"-?\d+", n) for n in names):
        return sorted(names, key=int)
    return sorted(names)


def read_classification(
    path: str | Path,
    *,
    text_col: Column = "text",
    label_col: Column = "label",
    text_pair_col: Column | None = None,
    fmt: str | None = None,
    header: bool | None = None,
    label_names: Sequence[str] | None = None,
    multi_label: bool = False,
    label_sep: str = ",",
    skip_bad: bool = False,
    columns: Columns = None,
) -> ClassificationData:
    """Read a text (or text-pair) classification file: CSV, TSV or JSONL (fmt from the suffix).

    Columns are names, or 0-based indices for header-less files (AG News: label_col=0,
    text_col=1, text_pair_col=2). Labels are names or numbers. Without label_names, ids follow
    the sorted label names (numeric order when all labels are integers), so the mapping does
    not depend on the file's order; pass the training set's label_names when reading
    valid/test, and an unseen label is an error naming file, line and label. multi_label: a
    JSON list, or labels joined by label_sep.
    """
    path = Path(path)
    tally = _Tally(path, skip_bad)
    cols = [text_col, label_col] + ([text_pair_col] if text_pair_col is not None else [])
    fixed = {n: i for i, n in enumerate(label_names)} if label_names is not None else None
    texts, pairs, raw = [], [], []
    for no, values in _rows(path, fmt, cols, header, tally, parse_columns(columns)):
        try:
            text = _text(values[0], text_col)
            pair = _text(values[2], text_pair_col) if text_pair_col is not None else None
            labels = _label_strings(values[1], multi_label, label_sep)
            unseen = [lab for lab in labels if fixed is not None and lab not in fixed]
            if unseen:
                raise _BadRecord(f"label {unseen[0]!r} is not among the known labels {list(fixed)}")
        except _BadRecord as e:
            tally.bad(no, str(e))
            continue
        texts.append(text)
        pairs.append(pair)
        raw.append(labels)
    tally.check_nonempty(len(texts))
    names = list(label_names) if label_names is not None else _sorted_labels({x for labs in raw for x in labs})
    to_id = {n: i for i, n in enumerate(names)}
    ids: list[Any] = [sorted({to_id[x] for x in labs}) if multi_label else to_id[labs[0]] for labs in raw]
    return ClassificationData(texts, ids, names, pairs if text_pair_col is not None else None, multi_label,
                              tally.skipped)


# ----------------------------------------------------------------------------- NER


@dataclass
class NerData:
    """Sentences of tokens with IOB2 tags; label_names: "O", then B-/I- per entity type (sorted).
    repaired counts I- tags that began an entity in an IOB2 file and were rewritten to B-."""

    tokens: list[list[str]]
    tags: list[list[str]]
    label_names: list[str]
    skipped: int = 0
    repaired: int = 0

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def labels(self) -> list[list[int]]:
        to_id = {n: i for i, n in enumerate(self.label_names)}
        return [[to_id[t] for t in tags] for tags in self.tags]


def _to_iob2(tags: list[str]) -> tuple[list[str], int]:
    """IOB1 -> IOB2: an I-X that does not continue an X entity starts one (B-X). Returns (tags, changes)."""
    out, changed, prev = [], 0, "O"
    for tag in tags:
        if tag.startswith("I-") and prev[2:] != tag[2:]:
            tag, changed = "B-" + tag[2:], changed + 1
        out.append(tag)
        prev = tag
    return out, changed


def _tag_problem(tag: Any, known: set[str] | None) -> str | None:
    """What is wrong with one NER tag, or None."""
    if not isinstance(tag, str) or not _TAG.match(tag):
        return f"bad tag {tag!r} (expected O, B-TYPE or I-TYPE)"
    if known is not None and tag not in known:
        return f"tag {tag!r} is not among the known labels"
    return None


def _conll_sentences(path: Path, token_col: int, tag_col: int, known: set[str] | None,
                     tally: _Tally) -> Iterator[tuple[list[str], list[str]]]:
    """(tokens, tags) of each well-formed sentence of a CoNLL file."""
    toks: list[str] = []
    tags: list[str] = []
    width, broken = None, False
    for no, line in _lines(path):
        line = line.strip().strip("\ufeff")
        cols = line.split("\t") if "\t" in line else line.split()
        if not line or cols[0] == "-DOCSTART-":
            if toks and not broken:
                yield toks, tags
            toks, tags, broken = [], [], False
            continue
        width = width or len(cols)
        if len(cols) != width:
            msg = f"expected {width} columns, found {len(cols)}"
        else:
            msg = _tag_problem(cols[tag_col].strip(), known)
        if msg is None:
            toks.append(cols[token_col])
            tags.append(cols[tag_col].strip())
            continue
        tally.bad(no, msg)
        broken = True
    if toks and not broken:
        yield toks, tags


def _dataset_sentences(path: Path, rename: dict[str, str], known: set[str] | None,
                       tally: _Tally) -> Iterator[tuple[list[str], list[str]]]:
    """(tokens, tags) of each well-formed row of a dataset with `tokens` and `ner_tags` columns
    (the Hub's convention, e.g. WNUT-17, CoNLL-2003; ClassLabel tags come back as names)."""
    for where, (toks, tags) in iter_rows(open_table(path), ["tokens", "ner_tags"], rename):
        if not isinstance(toks, list) or not isinstance(tags, list) or len(toks) != len(tags):
            tally.bad(where, "tokens and ner_tags must be lists of the same length")
        elif not toks:
            continue
        elif not all(isinstance(t, str) and t.strip() for t in toks):
            tally.bad(where, "every token must be a non-empty string")
        else:
            msg = next((m for m in (_tag_problem(t, known) for t in tags) if m), None)
            if msg is None:
                yield toks, tags
            else:
                tally.bad(where, msg)


def read_conll(
    path: str | Path,
    *,
    token_col: int = 0,
    tag_col: int = -1,
    scheme: str = "iob2",
    label_names: Sequence[str] | None = None,
    skip_bad: bool = False,
    columns: Columns = None,
) -> NerData:
    """Read CoNLL-style NER columns (tab- or space-separated; tag in the last column by default),
    or a dataset source with `tokens` and `ner_tags` columns (renamed there by `columns`).

    Blank lines end sentences, -DOCSTART- lines are skipped; scheme "iob2" (BIO) or "iob1"
    (converted to IOB2). Every line must have as many columns as the first one and a tag
    O, B-X or I-X, and with label_names (from the training set) a known tag. skip_bad skips
    (and counts) whole sentences with a malformed line.
    """
    if scheme not in ("iob1", "iob2"):
        raise ValueError(f"read_conll: scheme must be 'iob1' or 'iob2', got {scheme!r}")
    path = Path(path)
    tally = _Tally(path, skip_bad)
    known = set(label_names) if label_names is not None else None
    rows = (_dataset_sentences(path, parse_columns(columns), known, tally) if is_dataset_source(path)
            else _conll_sentences(path, token_col, tag_col, known, tally))
    sentences, repaired = [], 0
    for toks, tags in rows:
        fixed, n = _to_iob2(tags)
        repaired += n if scheme == "iob2" else 0
        sentences.append((toks, fixed))
    tally.check_nonempty(len(sentences))
    if label_names is None:
        types = sorted({t[2:] for _, ts in sentences for t in ts if t != "O"})
        label_names = ["O"] + [f"{p}-{t}" for t in types for p in "BI"]
    return NerData([s[0] for s in sentences], [s[1] for s in sentences], list(label_names), tally.skipped, repaired)


# ----------------------------------------------------------------------------- extractive QA


@dataclass
class Answer:
    text: str
    start: int  # character offset in the context


@dataclass
class QAExample:
    id: str
    question: str
    context: str
    answers: list[Answer]
    is_impossible: bool = False
    title: str = ""


@dataclass
class QAData:
    examples: list[QAExample]
    version: str  # "1.1" or "2.0"
    skipped: int = 0

    def __len__(self) -> int:
        return len(self.examples)


def _need(obj: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(obj, dict) or key not in obj:
        raise _BadRecord(f"{where}: missing field {key!r}")
    if not isinstance(obj[key], kind):
        raise _BadRecord(f"{where}: field {key!r} has type {type(obj[key]).__name__}")
    return obj[key]


def _qa_example(qa: Any, context: str, title: str, v2: bool) -> QAExample:
    qid = str(_need(qa, "id", (str, int), "question"))
    where = f"question id {qid!r}"
    question = _need(qa, "question", str, where)
    if not question.strip():
        raise _BadRecord(f"{where}: empty question")
    impossible = bool(qa.get("is_impossible", False)) if v2 else False
    answers = []
    for a in _need(qa, "answers", list, where):
        text, start = _need(a, "text", str, where), _need(a, "answer_start", int, where)
        found = context[start:start + len(text)] if start >= 0 else None
        if found != text:
            raise _BadRecord(f"{where}: answer {text!r} at {start} does not match the context (found {found!r})")
        answers.append(Answer(text, start))
    if impossible and answers:
        raise _BadRecord(f"{where}: is_impossible but has answers")
    if not impossible and not answers:
        raise _BadRecord(f"{where}: no answers" + ("" if v2 else " (SQuAD v1.1 questions must have one)"))
    return QAExample(qid, question, context, answers, impossible, title)


def _squad_dataset(path: Path, rename: dict[str, str], tally: _Tally) -> QAData:
    """SQuAD-format rows (id, title, context, question, answers {text: [...], answer_start:
    [...]}, as the Hub's squad and squad_v2): version 2.0 when some question has no answer."""
    table = open_table(path)
    has_title = "title" in [rename.get(c, c) for c in table.column_names]
    wanted = ["id", "question", "context", "answers"] + (["title"] if has_title else [])
    rows = list(iter_rows(table, wanted, rename))
    v2 = any(isinstance(r[3], dict) and not r[3].get("text") for _, r in rows)
    examples, seen = [], set()
    for where, (qid, question, context, answers, *title) in rows:
        try:
            texts, starts = (answers.get("text"), answers.get("answer_start")) if isinstance(answers, dict) else (0, 0)
            if not isinstance(texts, list) or not isinstance(starts, list) or len(texts) != len(starts):
                raise _BadRecord("answers must be {text: [...], answer_start: [...]} of the same length")
            if not isinstance(context, str):
                raise _BadRecord("context must be a string")
            qa = {"id": qid, "question": question, "is_impossible": not texts,
                  "answers": [{"text": t, "answer_start": a} for t, a in zip(texts, starts)]}
            ex = _qa_example(qa, context, str(title[0]) if title else "", v2)
            if ex.id in seen:
                raise _BadRecord(f"question id {ex.id!r}: duplicate id")
        except _BadRecord as e:
            tally.bad(where, str(e))
            continue
        seen.add(ex.id)
        examples.append(ex)
    tally.check_nonempty(len(examples))
    return QAData(examples, "2.0" if v2 else "1.1", tally.skipped)


def read_squad(path: str | Path, *, skip_bad: bool = False, columns: Columns = None) -> QAData:
    """Read SQuAD v1.1 / v2.0 JSON (version from the "version" field, else from is_impossible),
    or a dataset source in the Hub's SQuAD columns (renamed there by `columns`).

    Each answer must satisfy context[answer_start : answer_start + len(text)] == text; v2 no-answer
    questions (is_impossible) have no answers. Errors name the file and the question id.
    """
    path = Path(path)
    tally = _Tally(path, skip_bad)
    if is_dataset_source(path):
        return _squad_dataset(path, parse_columns(columns), tally)
    text = "".join(line for _, line in _lines(path))
    if not text.strip():
        raise ValueError(f"{path}: empty file (no records)")
    try:
        top = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(top, dict) or not isinstance(top.get("data"), list):
        raise ValueError(f"{path}: expected a SQuAD object with a 'data' list")
    paragraphs = []
    for i, article in enumerate(top["data"]):
        if isinstance(article, dict) and isinstance(article.get("paragraphs"), list):
            paragraphs += [(str(article.get("title", "")), p) for p in article["paragraphs"]]
        else:
            tally.bad(None, f"article {i}: expected an object with a 'paragraphs' list")
    declared = str(top.get("version", ""))
    v2 = declared.lstrip("v").startswith("2") if declared else any(
        isinstance(q, dict) and "is_impossible" in q for _, p in paragraphs if isinstance(p, dict)
        for q in (p.get("qas") if isinstance(p.get("qas"), list) else []))
    examples: list[QAExample] = []
    seen: set[str] = set()
    for n, (title, p) in enumerate(paragraphs):
        try:
            context = _need(p, "context", str, f"paragraph {n} ({title!r})")
            qas = _need(p, "qas", list, f"paragraph {n} ({title!r})")
        except _BadRecord as e:
            tally.bad(None, str(e))
            continue
        for qa in qas:
            try:
                ex = _qa_example(qa, context, title, v2)
                if ex.id in seen:
                    raise _BadRecord(f"question id {ex.id!r}: duplicate id")
            except _BadRecord as e:
                tally.bad(None, str(e))
                continue
            seen.add(ex.id)
            examples.append(ex)
    tally.check_nonempty(len(examples))
    return QAData(examples, "2.0" if v2 else "1.1", tally.skipped)


# ----------------------------------------------------------------------------- seq2seq


@dataclass
class Seq2SeqData:
    sources: list[str]
    targets: list[str]
    skipped: int = 0

    def __len__(self) -> int:
        return len(self.sources)


def read_seq2seq(
    path: str | Path,
    *,
    source_field: Column = "source",
    target_field: Column = "target",
    fmt: str | None = None,
    header: bool | None = None,
    skip_bad: bool = False,
    columns: Columns = None,
) -> Seq2SeqData:
    """Read source/target pairs from JSONL or TSV/CSV (DialogSum: source_field="dialogue",
    target_field="summary"; its test split has "summary1".."summary3")."""
    path = Path(path)
    tally = _Tally(path, skip_bad)
    sources, targets = [], []
    for no, (src, tgt) in _rows(path, fmt, [source_field, target_field], header, tally, parse_columns(columns)):
        try:
            src, tgt = _text(src, source_field), _text(tgt, target_field)
        except _BadRecord as e:
            tally.bad(no, str(e))
            continue
        sources.append(src)
        targets.append(tgt)
    tally.check_nonempty(len(sources))
    return Seq2SeqData(sources, targets, tally.skipped)


def read_parallel(source_path: str | Path, target_path: str | Path, *, skip_bad: bool = False) -> Seq2SeqData:
    """Read line-aligned parallel files (train.de / train.en): line i of one translates line i of
    the other. Different line counts always raise; an empty line on either side is a bad record."""
    src_path, tgt_path = Path(source_path), Path(target_path)
    tallies = {src_path: _Tally(src_path, skip_bad), tgt_path: _Tally(tgt_path, skip_bad)}
    sources, targets, counts = [], [], [0, 0]
    for a, b in zip_longest(_lines(src_path), _lines(tgt_path)):
        counts = [a[0] if a else counts[0], b[0] if b else counts[1]]
        if a is None or b is None:  # keep counting the longer file for the error message
            continue
        s, t = a[1].strip(), b[1].strip()
        if not s or not t:
            tallies[src_path if not s else tgt_path].bad(a[0], "empty line")
            continue
        sources.append(s)
        targets.append(t)
    if counts[0] != counts[1]:
        raise ValueError(f"line count mismatch: {src_path} has {counts[0]} lines, {tgt_path} has {counts[1]}")
    tallies[src_path].check_nonempty(len(sources))
    return Seq2SeqData(sources, targets, sum(t.skipped for t in tallies.values()))


# ----------------------------------------------------------------------------- chat / instructions


@dataclass
class ChatData:
    """Conversations as lists of {"role": "system"|"user"|"assistant", "content": str}."""

    conversations: list[list[dict[str, str]]] = field(default_factory=list)
    skipped: int = 0

    def __len__(self) -> int:
        return len(self.conversations)


def _as_messages(obj: dict[str, Any]) -> list[Any]:
    """The record's messages, converting {prompt, response} and {instruction, input, output}."""
    system = [{"role": "system", "content": obj["system"]}] if "system" in obj else []
    if "messages" in obj:
        if not isinstance(obj["messages"], list):
            raise _BadRecord("'messages' must be a list")
        return obj["messages"]
    if "prompt" in obj and "response" in obj:
        return [*system, {"role": "user", "content": obj["prompt"]}, {"role": "assistant", "content": obj["response"]}]
    if "instruction" in obj and "output" in obj:
        extra = obj.get("input") or ""
        if not isinstance(obj["instruction"], str) or not isinstance(extra, str):
            raise _BadRecord("'instruction' and 'input' must be strings")
        user = obj["instruction"] + ("\n\n" + extra if extra.strip() else "")
        return [*system, {"role": "user", "content": user}, {"role": "assistant", "content": obj["output"]}]
    raise _BadRecord("expected 'messages', 'prompt'/'response' or 'instruction'/'output' fields")


def _validate_messages(messages: list[Any]) -> list[dict[str, str]]:
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise _BadRecord(f"message {i}: expected an object with 'role' and 'content'")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise _BadRecord(f"message {i}: role {role!r} is not one of {', '.join(ROLES)}")
        if role == "system" and i != 0:
            raise _BadRecord(f"message {i}: a system message may only come first")
        if not isinstance(content, str) or not content.strip():
            raise _BadRecord(f"message {i}: content must be a non-empty string")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise _BadRecord("no assistant message")
    return out


def read_chat(path: str | Path, *, skip_bad: bool = False, columns: Columns = None) -> ChatData:
    """Read chat / instruction JSONL: {"messages": [...]}, {"prompt", "response"} or
    {"instruction", "input", "output"} (an optional "system" string in the last two), or a
    dataset source with such columns (renamed there by `columns`). Each conversation is
    checked: known roles, system only first, non-empty contents, at least one assistant turn."""
    path = Path(path)
    tally = _Tally(path, skip_bad)
    out = ChatData()
    records = iter_rows(open_table(path), None, parse_columns(columns)) if is_dataset_source(path) \
        else _jsonl(path, tally)
    for no, obj in records:
        try:
            out.conversations.append(_validate_messages(_as_messages(obj)))
        except _BadRecord as e:
            tally.bad(no, str(e))
    tally.check_nonempty(len(out.conversations))
    out.skipped = tally.skipped
    return out
