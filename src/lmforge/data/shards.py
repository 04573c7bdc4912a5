"""Prepared token shards: the on-disk format of a tokenized corpus, its writer and its reader.

A prepared directory holds, per split (``train``, ``validation``):

- ``{split}-{k:05d}.bin``: the token ids of whole documents, back to back, each document
  followed by the separator (EOS, or SEP for WordPiece tokenizers), as flat little-endian
  uint16 (when every id fits) or uint32;
- ``{split}-{k:05d}.idx``: uint64 offsets of document starts within that shard, with the shard
  length appended (n_docs + 1 values), so document i spans ``[idx[i], idx[i+1])``, separator included;
- ``meta.json``: format version, dtype, vocab size, separator id, tokenizer fingerprint, and per
  split the shard files with their token and document counts.

`TokenShards` memory-maps one split and presents it as one array of tokens: random access to
token ranges (across shard ends) and to whole documents, without reading the corpus into memory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

FORMAT_VERSION = 1
META_FILE = "meta.json"
SPLITS = ("train", "validation")


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id (0 .. vocab_size - 1) fits in 16 bits, else uint32: half the disk and page cache."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


class ShardWriter:
    """Appends documents of one split to numbered shards of about `shard_tokens` tokens.

    A shard closes at the first document end at or past `shard_tokens`, so documents never straddle
    shards and the layout does not depend on how the caller batches its writes.
    """

    def __init__(self, directory: str | Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        if shard_tokens < 1:
            raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
        self.directory, self.split, self.dtype, self.shard_tokens = Path(directory), split, dtype, shard_tokens
        self.shards: list[dict[str, Any]] = []
        self._file: BinaryIO | None = None
        self._lengths: list[np.ndarray] = []
        self._n_tokens = 0

    def write(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents: `tokens` (N,) back to back, `lengths` (n_docs,) summing to N."""
        tokens = np.asarray(tokens, dtype=self.dtype)
        lengths = np.asarray(lengths, dtype=np.int64)
        while len(lengths):
            if self._file is None:
                self._open()
            ends = np.cumsum(lengths)
            # Number of documents that still go into this shard: up to and including the one crossing the limit.
            take = int(np.searchsorted(ends, self.shard_tokens - self._n_tokens, side="left")) + 1
            take = min(take, len(lengths))
            n = int(ends[take - 1])
            self._file.write(memoryview(tokens[:n]))
            self._lengths.append(lengths[:take])
            self._n_tokens += n
            tokens, lengths = tokens[n:], lengths[take:]
            if self._n_tokens >= self.shard_tokens:
                self._close_shard()

    def close(self) -> list[dict[str, Any]]:
        """Finish the last shard; returns the shard entries for meta.json."""
        if self._file is not None:
            self._close_shard()
        return self.shards

    def _open(self) -> None:
        name = f"{self.split}-{len(self.shards):05d}"
        self._file = open(self.directory / f"{name}.bin", "wb")  # closed in _close_shard
        self._name, self._lengths, self._n_tokens = name, [], 0

    def _close_shard(self) -> None:
        assert self._file is not None
        self._file.close()
        self._file = None
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int64)
        offsets = np.zeros(len(lengths) + 1, dtype=np.uint64)
        np.cumsum(lengths, out=offsets[1:])
        offsets.tofile(self.directory / f"{self._name}.idx")
        self.shards.append({"bin": f"{self._name}.bin", "idx": f"{self._name}.idx",
                            "n_tokens": int(self._n_tokens), "n_docs": int(len(lengths))})


def read_meta(directory: str | Path) -> dict[str, Any]:
    """The validated meta.json of a prepared directory (clear errors for a missing or foreign directory)."""
    directory = Path(directory)
    path = directory / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: not a prepared data directory (no {META_FILE}); "
                                "run `lmforge data prepare` first")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: corrupt ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != "lmforge-token-shards":
        raise ValueError(f"{path}: not an lmforge token-shards description")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format version {meta.get('format_version')}, this lmforge reads {FORMAT_VERSION}; "
                         "prepare the data again")
    return meta


class TokenShards:
    """One split of a prepared directory, memory-mapped and addressed as one token array.

    n_tokens: total tokens (separators included); n_docs: documents; doc_offsets: (n_docs + 1,) int64
    global start offsets of documents plus the end, so document i is ``tokens(doc_offsets[i], doc_offsets[i+1])``.
    """

    def __init__(self, directory: str | Path, split: str = "train") -> None:
        self.directory = Path(directory)
        self.meta = read_meta(self.directory)
        if split not in self.meta["splits"]:
            raise ValueError(f"{self.directory}: no split {split!r} (splits: {', '.join(self.meta['splits'])})")
        self.split = split
        self.dtype = np.dtype(self.meta["dtype"])
        self.vocab_size: int = self.meta["vocab_size"]
        self.eos_id: int = self.meta["separator_id"]
        self.fingerprint: str = self.meta["tokenizer_fingerprint"]
        self._shards: list[np.memmap] = []
        self._idx_files: list[Path] = []
        counts = []
        for entry in self.meta["splits"][split]["shards"]:
            self._shards.append(self._map(entry))
            self._idx_files.append(self.directory / entry["idx"])
            counts.append(entry["n_tokens"])
        self._starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int64)
        self.n_tokens = int(self._starts[-1])
        self.n_docs = int(self.meta["splits"][split]["n_docs"])
        self._doc_offsets: np.ndarray | None = None

    def _map(self, entry: dict[str, Any]) -> np.memmap:
        path = self.directory / entry["bin"]
        if not path.is_file():
            raise FileNotFoundError(f"{path}: shard listed in {META_FILE} is missing")
        expected = entry["n_tokens"] * self.dtype.itemsize
        if path.stat().st_size != expected:
            raise ValueError(f"{path}: {path.stat().st_size} bytes, expected {expected} ({entry['n_tokens']} tokens); "
                             "the shard is truncated or from another preparation")
        return np.memmap(path, dtype=self.dtype, mode="r")

    def __len__(self) -> int:
        return self.n_tokens

    def __repr__(self) -> str:
        return (f"TokenShards({str(self.directory)!r}, split={self.split!r}, n_tokens={self.n_tokens}, "
                f"n_docs={self.n_docs}, shards={len(self._shards)})")

    @property
    def doc_offsets(self) -> np.ndarray:
        """(n_docs + 1,) int64: global offset of each document's first token, then n_tokens."""
        if self._doc_offsets is None:
            parts = [np.zeros(1, np.int64)]
            for start, idx_path in zip(self._starts, self._idx_files):
                offsets = np.fromfile(idx_path, dtype=np.uint64).astype(np.int64)
                parts.append(offsets[1:] + start)
            self._doc_offsets = np.concatenate(parts)
            if len(self._doc_offsets) != self.n_docs + 1:
                raise ValueError(f"{self.directory}: index files list {len(self._doc_offsets) - 1} documents, "
                                 f"{META_FILE} says {self.n_docs}")
        return self._doc_offsets

    @property
    def doc_lengths(self) -> np.ndarray:
        """(n_docs,) int64 document lengths, separator included."""
        return np.diff(self.doc_offsets)

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the split as a numpy array in the stored dtype (copied only across a shard end)."""
        if not 0 <= start <= stop <= self.n_tokens:
            raise IndexError(f"token range [{start}, {stop}) outside [0, {self.n_tokens}) of {self.directory}")
        first = int(np.searchsorted(self._starts, start, side="right")) - 1
        pieces = []
        while start < stop:
            local = start - int(self._starts[first])
            end = min(stop, int(self._starts[first + 1]))
            pieces.append(self._shards[first][local:local + end - start])
            start, first = end, first + 1
        if len(pieces) == 1:
            return pieces[0]
        return np.concatenate(pieces) if pieces else np.zeros(0, self.dtype)

    def document(self, i: int, with_separator: bool = False) -> np.ndarray:
        """Token ids of document i; without its trailing separator unless `with_separator`."""
        if not -self.n_docs <= i < self.n_docs:
            raise IndexError(f"document {i} outside the {self.n_docs} documents of {self.directory} ({self.split})")
        i %= self.n_docs
        start, stop = int(self.doc_offsets[i]), int(self.doc_offsets[i + 1])
        return self.tokens(start, stop if with_separator else stop - 1)

    def check_tokenizer(self, tokenizer: Any) -> None:
        """Refuse a tokenizer other than the one the data was prepared with (its ids would mean other tokens)."""
        if tokenizer.fingerprint != self.fingerprint:
            raise ValueError(f"{self.directory}: prepared with a different tokenizer (fingerprint {self.fingerprint}, "
                             f"this tokenizer has {tokenizer.fingerprint}); prepare the data again with it")
