"""Corpus sources: stream documents out of text, JSONL, CSV/TSV and Parquet files.

A corpus is a list of inputs: files, directories (searched recursively, in sorted
order) and glob patterns. The format follows the extension, optionally followed by
``.gz``:

- ``.txt``: documents are separated by one or more blank lines (or, with
  ``doc_per_file=True``, each file is one document);
- ``.jsonl``: one JSON object per line, the document in ``field`` (default ``"text"``);
- ``.csv`` / ``.tsv``: a header row, the document in column ``field``;
- ``.parquet``: the document in column ``field``, read one row group batch at a time.

Everything streams: files are read in blocks of a few MB and never held whole (except
one file with ``doc_per_file=True``). Bad input raises ValueError / FileNotFoundError
naming the file and line, so the CLI can print one line and stop.
"""

from __future__ import annotations

import csv
import glob
import gzip
import json
import re
import sys
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO

FORMATS = {".txt": "txt", ".jsonl": "jsonl", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet"}
"""Known extensions (each may be followed by ``.gz``) and the reader they select."""

BLOCK_SIZE = 1 << 22  # bytes read per step: large enough to amortise Python overhead, small enough to bound memory

_BLANK_LINES = re.compile(r"\n(?:[ \t\r\f\v]*\n)+")  # the separator between .txt documents
_LEADING_BLANK = re.compile(r"(?:[ \t\r\f\v]*\n)+")
_GLOB_CHARS = re.compile(r"[*?\[]")

InputSpec = str | Path | Iterable[str | Path]


def format_of(path: str | Path) -> tuple[str, bool]:
    """(format, gzipped) of a corpus file from its extension, e.g. ``("jsonl", True)`` for ``a.jsonl.gz``."""
    suffixes = [s.lower() for s in Path(path).suffixes]
    gz = bool(suffixes) and suffixes[-1] == ".gz"
    ext = suffixes[-2] if gz and len(suffixes) >= 2 else (suffixes[-1] if suffixes and not gz else "")
    if ext not in FORMATS:
        known = ", ".join(sorted(FORMATS))
        raise ValueError(f"{path}: unknown corpus format {''.join(suffixes) or '(no extension)'!r}; "
                         f"expected one of {known} (optionally followed by .gz)")
    return FORMATS[ext], gz


def _is_corpus_file(path: Path) -> bool:
    try:
        format_of(path)
    except ValueError:
        return False
    return not path.name.startswith(".")


def resolve_inputs(inputs: InputSpec) -> list[Path]:
    """Expand files, directories (recursive, sorted) and glob patterns into a list of corpus files.

    Within a directory or glob, files of unknown format and hidden files are skipped; a file
    named explicitly must have a known format. Raises FileNotFoundError naming the missing
    input or the pattern that matched nothing, and ValueError when nothing is given.
    """
    items = [inputs] if isinstance(inputs, str | Path) else list(inputs)
    if not items:
        raise ValueError("no corpus inputs given")
    files: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and _is_corpus_file(p))
            if not found:
                raise FileNotFoundError(f"{path}: directory holds no corpus files ({', '.join(sorted(FORMATS))})")
            files.extend(found)
        elif path.is_file():
            format_of(path)
            files.append(path)
        elif _GLOB_CHARS.search(str(item)):
            found = sorted(Path(p) for p in glob.glob(str(item), recursive=True))
            found = [p for p in found if p.is_file() and _is_corpus_file(p)]
            if not found:
                raise FileNotFoundError(f"{item}: pattern matches no corpus files")
            files.extend(found)
        else:
            raise FileNotFoundError(f"{path}: no such file or directory")
    return files


def _open(path: Path, gz: bool) -> IO[bytes]:
    return gzip.open(path, "rb") if gz else open(path, "rb")


def _decoded_blocks(stream: IO[bytes], path: Path, errors: str) -> Iterator[str]:
    """Decode a byte stream in blocks that end on a line break; undecodable bytes name their line and offset."""
    carry, offset, line, first = b"", 0, 1, True
    while True:
        try:
            chunk = stream.read(BLOCK_SIZE)
        except (OSError, EOFError, zlib.error) as e:
            raise ValueError(f"{path}: cannot read compressed data ({e})") from None
        if chunk:
            data = carry + chunk
            cut = data.rfind(b"\n") + 1
            if cut == 0:  # no line break yet: keep reading the long line
                carry = data
                continue
            data, carry = data[:cut], data[cut:]
        else:
            data, carry = carry, b""
            if not data:
                return
        try:
            text = data.decode("utf-8", errors)
        except UnicodeDecodeError as e:
            bad_line = line + data.count(b"\n", 0, e.start)
            raise ValueError(
                f"{path}:{bad_line}: not valid UTF-8 (byte offset {offset + e.start}); "
                "pass errors='replace' to replace undecodable bytes with U+FFFD"
            ) from None
        if first and text.startswith("\ufeff"):  # a UTF-8 byte order mark is not part of the text
            text = text[1:]
        first = False
        offset += len(data)
        line += data.count(b"\n")
        yield text
        if not chunk:
            return


def _lines(blocks: Iterable[str]) -> Iterator[str]:
    """Lines split on ``\\n`` only (keeping it), so CSV quoting and JSON line numbers stay exact."""
    for block in blocks:
        pieces = block.split("\n")
        last = pieces.pop()
        for piece in pieces:
            yield piece + "\n"
        if last:
            yield last


def _txt_documents(blocks: Iterator[str], doc_per_file: bool) -> Iterator[str]:
    if doc_per_file:
        text = "".join(blocks).strip("\r\n")
        if text.strip():
            yield text
        return
    pending: list[str] = []  # the document still open at the end of the previous block
    for block in blocks:
        done: list[str] = []
        # Blocks end with a line break, so blank lines at the very start of this block close `pending`.
        leading = _LEADING_BLANK.match(block) if pending else None
        if leading:
            done.append("".join(pending))
            pending, block = [], block[leading.end():]
        parts = _BLANK_LINES.split(block)
        if len(parts) > 1:
            pending.append(parts[0])
            done.append("".join(pending))
            done += parts[1:-1]
            pending = [parts[-1]]
        else:
            pending.append(parts[0])
        yield from _nonblank(done)  # a whole block's documents at once: documents are many and short
    yield from _nonblank(["".join(pending)])


def _nonblank(texts: list[str]) -> list[str]:
    stripped = [t.strip("\r\n") for t in texts]
    return [t for t in stripped if t and not t.isspace()]


def _jsonl_documents(blocks: Iterator[str], path: Path, field: str) -> Iterator[str]:
    for lineno, line in enumerate(_lines(blocks), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: malformed JSON ({e.msg}, column {e.colno})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
        if field not in record:
            raise ValueError(f"{path}:{lineno}: no field {field!r} (fields: {', '.join(map(str, record)) or 'none'})")
        yield from _text_value(record[field], path, lineno, field)


def _text_value(value: object, path: Path, where: int | str, field: str) -> Iterator[str]:
    if value is None:  # a null document is an empty one: skipped
        return
    if not isinstance(value, str):
        raise ValueError(f"{path}:{where}: field {field!r} holds {type(value).__name__}, expected a string")
    if value.strip():
        yield value


def _csv_documents(blocks: Iterator[str], path: Path, field: str, delimiter: str) -> Iterator[str]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # documents can be far longer than csv's 128 kB default
    reader = csv.reader(_lines(blocks), delimiter=delimiter)
    try:
        header = next(reader, None)
        if header is None:
            return
        if field not in header:
            raise ValueError(f"{path}:1: no column {field!r} (columns: {', '.join(header)})")
        col = header.index(field)
        for row in reader:
            if not row:
                continue
            if col >= len(row):
                raise ValueError(f"{path}:{reader.line_num}: row has {len(row)} columns, no {field!r}")
            yield from _text_value(row[col], path, reader.line_num, field)
    except csv.Error as e:
        raise ValueError(f"{path}:{reader.line_num}: malformed CSV ({e})") from None


def _parquet_documents(stream: IO[bytes], path: Path, field: str, errors: str) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(stream)
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{path}: not a readable Parquet file ({e})") from None
    names = pf.schema_arrow.names
    if field not in names:
        raise ValueError(f"{path}: no column {field!r} (columns: {', '.join(names)})")
    row = 0
    try:
        for batch in pf.iter_batches(columns=[field], batch_size=4096):
            for value in batch.column(0).to_pylist():
                row += 1
                if isinstance(value, bytes):
                    try:
                        value = value.decode("utf-8", errors)
                    except UnicodeDecodeError as e:
                        raise ValueError(f"{path}: row {row}: not valid UTF-8 (byte offset {e.start}); "
                                         "pass errors='replace' to replace undecodable bytes with U+FFFD") from None
                yield from _text_value(value, path, f"row {row}", field)
    except pa.ArrowException as e:
        raise ValueError(f"{path}: cannot read Parquet data after row {row} ({e})") from None


def iter_file_documents(path: str | Path, field: str = "text", doc_per_file: bool = False,
                        errors: str = "strict") -> Iterator[str]:
    """Stream the documents of one corpus file (see the module docstring for the formats)."""
    path = Path(path)
    fmt, gz = format_of(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    with _open(path, gz) as stream:
        if fmt == "parquet":
            yield from _parquet_documents(stream, path, field, errors)
            return
        blocks = _decoded_blocks(stream, path, errors)
        if fmt == "txt":
            yield from _txt_documents(blocks, doc_per_file)
        elif fmt == "jsonl":
            yield from _jsonl_documents(blocks, path, field)
        else:
            yield from _csv_documents(blocks, path, field, "\t" if fmt == "tsv" else ",")


def iter_documents(inputs: InputSpec, field: str = "text", doc_per_file: bool = False,
                   errors: str = "strict") -> Iterator[str]:
    """Stream every document of a corpus, file by file in sorted order, as strings.

    inputs: files, directories or glob patterns (see `resolve_inputs`).
    field: the JSON field or CSV/TSV/Parquet column holding the text.
    doc_per_file: treat each .txt file as one document instead of splitting on blank lines.
    errors: "strict" refuses bytes that are not UTF-8 (naming file, line and byte offset);
        "replace" replaces them with U+FFFD.
    Empty documents are skipped; a corpus with no documents at all raises ValueError.
    """
    if errors not in ("strict", "replace"):
        raise ValueError(f"errors must be 'strict' or 'replace', got {errors!r}")
    files = resolve_inputs(inputs)
    empty = True
    for path in files:
        docs = iter_file_documents(path, field, doc_per_file, errors)
        for doc in docs:  # the first document; the rest are delegated without a Python step each
            empty = False
            yield doc
            yield from docs
    if empty:
        shown = ", ".join(str(p) for p in files[:5]) + (" ..." if len(files) > 5 else "")
        raise ValueError(f"empty corpus: no documents in {shown}")
