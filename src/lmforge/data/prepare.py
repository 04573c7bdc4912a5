"""Corpus preparation: tokenize a corpus on every core into token shards (format: `lmforge.data.shards`).

The main process streams documents (`lmforge.data.sources`) in chunks of about a megabyte to a
pool of worker processes; each worker tokenizes its chunk with the Rust tokenizer on one thread
(TOKENIZERS_PARALLELISM=false: the pool already fills the cores, nested threads would only contend),
decides each document's split and returns flat numpy arrays, which are cheap to send back. The main
process appends them, in submission order, to the shards of a temporary directory, which is renamed
into place at the end. At most two chunks per worker are in flight, so memory stays bounded whatever
the corpus size, and the output does not depend on the number of workers.

The train/validation split is by document and by content: a keyed hash of the document's text
(key = seed) decides, so it is deterministic, independent of order and chunking, and duplicate
documents always land in the same split.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import multiprocessing as mp
import os
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers

from lmforge.data.shards import FORMAT_VERSION, META_FILE, SPLITS, ShardWriter, read_meta, token_dtype
from lmforge.data.sources import InputSpec, iter_documents, resolve_inputs
from lmforge.files import Ownership, owned_dir
from lmforge.hardware import usable_cpus
from lmforge.tokenizer import Tokenizer

CHUNK_CHARS = 1 << 18  # characters per task: amortises IPC; small, so the last tasks leave no core idle for long


def default_workers() -> int:
    """The CPUs this process may keep busy (affinity and cgroup quota: lmforge.hardware.usable_cpus)."""
    return usable_cpus()


# ---- the work done on each chunk (in a worker, or in-process) -------------------------------------------------
class ChunkEncoder:
    """Tokenizes a chunk of documents into per-split flat token arrays with a separator after each document."""

    def __init__(self, tokenizer_json: str, separator: int, dtype: np.dtype, val_fraction: float, seed: int) -> None:
        self.backend = tokenizers.Tokenizer.from_str(tokenizer_json)  # a private copy: settings below are ours
        self.backend.no_truncation()  # whole documents, whatever the saved tokenizer was set up to do
        self.backend.no_padding()
        # Offsets are not needed here; encode_batch_fast (tokenizers >= 0.21) skips computing them.
        self.encode = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
        self.separator, self.dtype = (separator,), np.dtype(dtype)
        self.threshold = int(val_fraction * 2**64)  # validation iff hash < threshold
        self.key = str(seed).encode()[:64]

    def __call__(self, docs: Sequence[str]) -> tuple[list[tuple[np.ndarray, np.ndarray]], int]:
        """-> ([(tokens, lengths) for train, validation], UTF-8 bytes of the chunk)."""
        encoded = [d.encode("utf-8") for d in docs]
        n_bytes = sum(map(len, encoded))
        in_val = [self.threshold > 0 and self._hash(b) < self.threshold for b in encoded]
        ids = [e.ids for e in self.encode(list(docs), add_special_tokens=False)]
        out = []
        for val in (False, True):
            chosen = [x for x, v in zip(ids, in_val) if v == val]
            lengths = np.fromiter((len(x) + 1 for x in chosen), dtype=np.int64, count=len(chosen))
            flat = itertools.chain.from_iterable(p for x in chosen for p in (x, self.separator))
            out.append((np.fromiter(flat, dtype=self.dtype, count=int(lengths.sum())), lengths))
        return out, n_bytes

    def _hash(self, data: bytes) -> int:
        return int.from_bytes(hashlib.blake2b(data, digest_size=8, key=self.key).digest(), "little")


_worker_encoder: ChunkEncoder | None = None


def _init_worker(tokenizer_json: str, separator: int, dtype: str, val_fraction: float, seed: int) -> None:
    global _worker_encoder
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one Rust thread per worker process
    _worker_encoder = ChunkEncoder(tokenizer_json, separator, np.dtype(dtype), val_fraction, seed)


def _encode_in_worker(docs: list[str]) -> tuple[list[tuple[np.ndarray, np.ndarray]], int]:
    assert _worker_encoder is not None
    return _worker_encoder(docs)


def _chunks(docs: Iterable[str], chunk_chars: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    size = 0
    for doc in docs:
        chunk.append(doc)
        size += len(doc)
        if size >= chunk_chars:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _encoded_chunks(encoder_args: tuple, chunks: Iterator[list[str]], workers: int, local: ChunkEncoder) -> Iterator:
    """Results in submission order; at most 2 chunks per worker in flight (the bound on memory)."""
    if workers <= 1 or mp.current_process().daemon:  # a daemonic process (e.g. a pool worker) may not fork a pool
        yield from map(local, chunks)
        return
    # fork starts workers fastest and is safe here (workers only run tokenizers and numpy); else the platform default
    ctx = mp.get_context("fork" if sys.platform.startswith("linux") else None)
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # silences tokenizers' fork warning; restored just below
    try:
        pool = ctx.Pool(workers, initializer=_init_worker, initargs=encoder_args)
    finally:
        if saved is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved
    with pool:
        pending: deque = deque()
        for chunk in chunks:
            pending.append(pool.apply_async(_encode_in_worker, (chunk,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


# ---- the pipeline ---------------------------------------------------------------------------------------------
def _recipe(tokenizer: Tokenizer, files: list[Path], options: dict[str, Any]) -> dict[str, Any]:
    """Everything the output depends on; equal recipes give byte-identical output, so a re-run can be skipped."""
    inputs = []
    for path in files:
        st = path.stat()
        inputs.append({"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return {"format_version": FORMAT_VERSION, "tokenizer_fingerprint": tokenizer.fingerprint, "inputs": inputs,
            **options}


def prepare_corpus(tokenizer: Tokenizer | str | Path, inputs: InputSpec, out_dir: str | Path, *,
                   val_fraction: float = 0.0005, field: str = "text", doc_per_file: bool = False,
                   errors: str = "strict", seed: int = 0, num_workers: int | None = None,
                   shard_tokens: int = 1 << 28, chunk_chars: int = CHUNK_CHARS, overwrite: bool = False,
                   progress: bool = False) -> dict[str, Any]:
    """Tokenize a corpus into train/validation token shards in `out_dir`, using every core.

    tokenizer: a Tokenizer or a directory to load one from. Each document gets the tokenizer's
        EOS (or SEP, for BERT-style tokenizers) appended; special tokens are otherwise not added.
    inputs, field, doc_per_file, errors: the corpus, as in `lmforge.data.sources.iter_documents`.
    val_fraction: expected fraction of documents in the validation split (chosen by a keyed hash
        of the text with key `seed`; see the module docstring).
    num_workers: worker processes (default: all cores; 1 tokenizes in this process).
    shard_tokens: tokens per shard file (documents are never split across shards).
    overwrite: rebuild even when `out_dir` already holds this exact preparation (same inputs by
        path, size and mtime, same tokenizer and options); by default that case is detected and skipped.

    Returns stats: per-split token and document counts, input MB, seconds, MB/s and tokens/s,
    and ``skipped`` (True when an identical preparation was found).
    """
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer.from_pretrained(tokenizer)
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    separator = tok.eos_id if tok.eos_id is not None else tok.sep_id
    if separator is None:
        raise ValueError("the tokenizer has neither an EOS nor a SEP token to separate documents")
    out_dir = Path(out_dir)
    files = resolve_inputs(inputs)
    options = {"field": field, "doc_per_file": doc_per_file, "errors": errors, "val_fraction": val_fraction,
               "seed": seed, "shard_tokens": shard_tokens, "separator_id": separator}
    recipe = _recipe(tok, files, options)
    if out_dir.exists():
        previous = _previous_meta(out_dir)
        if previous is not None and previous.get("recipe") == recipe and not overwrite:
            return {**_counts(previous), "out_dir": str(out_dir), "skipped": True}

    dtype = token_dtype(tok.vocab_size)
    workers = max(1, num_workers or default_workers())
    encoder_args = (tok.backend.to_str(), separator, dtype.str, val_fraction, seed)
    local = ChunkEncoder(tok.backend.to_str(), separator, dtype, val_fraction, seed)
    started = time.perf_counter()
    with owned_dir(out_dir, PREPARED) as tmp:  # a failure leaves no output and any earlier preparation intact
        writers = {split: ShardWriter(tmp, split, dtype, shard_tokens) for split in SPLITS}
        n_bytes = 0
        chunks = _chunks(iter_documents(files, field, doc_per_file, errors), chunk_chars)
        bar = _progress_bar(files) if progress else None
        for per_split, chunk_bytes in _encoded_chunks(encoder_args, chunks, workers, local):
            for split, (tokens, lengths) in zip(SPLITS, per_split):
                writers[split].write(tokens, lengths)
            n_bytes += chunk_bytes
            if bar is not None:
                bar.update(chunk_bytes)
        if bar is not None:
            bar.update(max(0, bar.total - bar.n))  # file sizes count line breaks and markup the text does not
            bar.close()
        splits = {}
        for split, writer in writers.items():
            shards = writer.close()
            splits[split] = {"n_tokens": sum(s["n_tokens"] for s in shards), "n_docs": sum(s["n_docs"] for s in shards),
                             "shards": shards}
        meta = {"format": "lmforge-token-shards", "format_version": FORMAT_VERSION, "dtype": dtype.name,
                "vocab_size": tok.vocab_size, "separator_id": separator, "separator_token": tok.id_to_token(separator),
                "tokenizer_fingerprint": tok.fingerprint, "n_bytes": n_bytes, "splits": splits, "recipe": recipe}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False), encoding="utf-8")
    seconds = time.perf_counter() - started
    counts = _counts(meta)
    return {**counts, "out_dir": str(out_dir), "skipped": False, "workers": workers, "seconds": seconds,
            "mb_per_s": n_bytes / 1e6 / seconds, "tokens_per_s": counts["n_tokens"] / seconds}


def _prepared_files(out_dir: Path) -> set[str] | None:
    """The files a preparation wrote (its meta.json lists the shards); None: not a prepared directory."""
    try:
        meta = json.loads((out_dir / META_FILE).read_text(encoding="utf-8"))
        shards = [shard for split in meta["splits"].values() for shard in split["shards"]]
        return {META_FILE, *(shard[k] for shard in shards for k in ("bin", "idx"))}
    except (OSError, ValueError, KeyError, TypeError):
        return None


PREPARED = Ownership(written=_prepared_files, seal=None, what="prepared data directory")


def _previous_meta(out_dir: Path) -> dict[str, Any] | None:
    """meta.json of an earlier preparation in out_dir; refuses to replace a directory that is something else."""
    if not out_dir.is_dir():
        raise ValueError(f"{out_dir}: exists and is not a directory")
    if not (out_dir / META_FILE).is_file():
        if any(out_dir.iterdir()):
            raise ValueError(f"{out_dir}: exists, is not empty and is not a prepared data directory; "
                             "choose another output directory")
        return None
    try:
        return read_meta(out_dir)
    except ValueError:
        return None  # an older format or a corrupt meta.json: prepare again


def _counts(meta: dict[str, Any]) -> dict[str, Any]:
    splits = meta["splits"]
    return {"dtype": meta["dtype"], "vocab_size": meta["vocab_size"], "mb": meta["n_bytes"] / 1e6,
            "n_tokens": sum(s["n_tokens"] for s in splits.values()),
            "n_docs": sum(s["n_docs"] for s in splits.values()),
            "splits": {name: {"n_tokens": s["n_tokens"], "n_docs": s["n_docs"], "n_shards": len(s["shards"])}
                       for name, s in splits.items()}}


def _progress_bar(files: list[Path]) -> Any:
    from tqdm import tqdm

    total = sum(p.stat().st_size for p in files)  # compressed sizes understate .gz inputs; the bar is a guide
    return tqdm(total=total, unit="B", unit_scale=True, desc="prepare")
