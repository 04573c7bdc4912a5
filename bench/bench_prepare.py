"""Benchmark corpus preparation: lmforge `prepare_corpus` against plain `tokenizers` loops and
HF `datasets` `.map(batched=True, num_proc=N)`, on the same file, in one process.

Every method reads the same .txt corpus (documents separated by blank lines) and produces token
ids with an end-of-text id after each document:

- tokenizers loop: read the file, ``encode`` each document, write a flat uint16 file;
- tokenizers encode_batch: the same with ``encode_batch`` over 1,000 documents (Rust threads: all cores);
- datasets map: ``load_dataset("text", sample_by="paragraph")`` + ``.map(batched=True, num_proc=N)``
  (its own Arrow output; the time includes loading, not any flattening to a token file);
- lmforge: ``prepare_corpus(..., num_workers=N)`` (shards, index, metadata, train/val split).

Runs are interleaved round-robin (so background load hits every method alike); the median and the
best run are reported, with the CPU seconds each method spent (load-independent). Example:

    .venv/bin/python bench/bench_prepare.py --target-mb 30 --repeats 3
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.resources
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np

from lmforge.data.prepare import default_workers, prepare_corpus
from lmforge.data.tokenizer_training import train_tokenizer_files
from lmforge.tokenizer import Tokenizer


def make_corpus(directory: Path, target_mb: float) -> Path:
    """The shipped Shakespeare corpus repeated to about `target_mb` megabytes."""
    text = (importlib.resources.files("lmforge") / "corpus" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    text = text.rstrip("\n") + "\n\n"
    copies = max(1, round(target_mb * 1e6 / len(text.encode("utf-8"))))
    path = directory / "corpus.txt"
    path.write_text(text * copies, encoding="utf-8")
    return path


def plain_loop(tok: Tokenizer, corpus: Path, out: Path) -> int:
    backend, eos = tok.backend, tok.eos_id
    ids: list[int] = []
    for doc in corpus.read_text(encoding="utf-8").split("\n\n"):
        if doc.strip():
            ids.extend(backend.encode(doc, add_special_tokens=False).ids)
            ids.append(eos)
    np.array(ids, dtype=np.uint16).tofile(out / "loop.bin")
    return len(ids)


def batch_loop(tok: Tokenizer, corpus: Path, out: Path) -> int:
    backend, eos = tok.backend, tok.eos_id
    docs = [d for d in corpus.read_text(encoding="utf-8").split("\n\n") if d.strip()]
    ids: list[int] = []
    for i in range(0, len(docs), 1000):
        for enc in backend.encode_batch(docs[i:i + 1000], add_special_tokens=False):
            ids.extend(enc.ids)
            ids.append(eos)
    np.array(ids, dtype=np.uint16).tofile(out / "batch.bin")
    return len(ids)


def datasets_map(tok: Tokenizer, corpus: Path, out: Path, workers: int) -> int:
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets

    datasets.disable_progress_bars()
    backend, eos = tok.backend, tok.eos_id

    def tokenize(batch: dict) -> dict:
        texts = [t for t in batch["text"]]
        return {"input_ids": [e.ids + [eos] for e in backend.encode_batch(texts, add_special_tokens=False)]}

    ds = datasets.load_dataset("text", data_files=str(corpus), sample_by="paragraph", split="train",
                               cache_dir=str(out / "hf_cache"))
    ds = ds.filter(lambda b: [bool(t.strip()) for t in b["text"]], batched=True, num_proc=workers)
    ds = ds.map(tokenize, batched=True, num_proc=workers, remove_columns=["text"])
    return sum(len(x) for x in ds.with_format("numpy")["input_ids"])


def lmforge_prepare(tok: Tokenizer, corpus: Path, out: Path, workers: int) -> int:
    stats = prepare_corpus(tok, corpus, out / "prepared", val_fraction=0.0005, num_workers=workers, overwrite=True)
    return stats["n_tokens"]


def cpu_seconds() -> float:
    """User + system time of this process (all its threads) and of its finished child processes."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def versions() -> str:
    names = ["tokenizers", "datasets", "numpy", "pyarrow", "lmforge"]
    found = []
    for name in names:
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{name} (not installed)")
    cpu = platform.processor() or platform.machine()
    return f"Python {platform.python_version()}, {', '.join(found)}; {default_workers()} cores ({cpu})"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", type=Path, help="a .txt corpus (default: Shakespeare repeated to --target-mb)")
    parser.add_argument("--target-mb", type=float, default=30.0)
    parser.add_argument("--tokenizer", type=Path, help="tokenizer directory (default: byte-level BPE trained here)")
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--workers", type=int, default=default_workers())
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip", nargs="*", default=[], choices=["loop", "batch", "datasets"],
                        help="methods to leave out")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="bench_prepare_"))
    try:
        corpus = args.input or make_corpus(work, args.target_mb)
        if args.tokenizer:
            tok = Tokenizer.from_pretrained(args.tokenizer)
        else:
            shakespeare = importlib.resources.files("lmforge") / "corpus" / "tinyshakespeare.txt"
            tok = train_tokenizer_files(str(shakespeare), "bpe", args.vocab_size)
        mb = corpus.stat().st_size / 1e6
        n = args.workers
        methods: dict[str, Callable[[Path], int]] = {
            "tokenizers loop (encode per doc, 1 process)": partial(plain_loop, tok, corpus),
            "tokenizers encode_batch (Rust threads)": partial(batch_loop, tok, corpus),
            f"datasets map (batched, num_proc={n})": lambda out: datasets_map(tok, corpus, out, n),
            f"lmforge prepare_corpus (workers={n})": lambda out: lmforge_prepare(tok, corpus, out, n),
        }
        short = dict(zip(("loop", "batch", "datasets"), methods))
        for name in args.skip:
            methods.pop(short[name])
        times: dict[str, list[float]] = {name: [] for name in methods}
        cpu: dict[str, list[float]] = {name: [] for name in methods}
        tokens: dict[str, int] = {}
        load_before = os.getloadavg()[0]
        for _ in range(args.repeats):
            for name, fn in methods.items():
                out = Path(tempfile.mkdtemp(dir=work))
                cpu_start, start = cpu_seconds(), time.perf_counter()
                tokens[name] = fn(out)
                times[name].append(time.perf_counter() - start)
                cpu[name].append(cpu_seconds() - cpu_start)
                shutil.rmtree(out)
                print(f"  {name}: {times[name][-1]:.2f} s", file=sys.stderr, flush=True)
        ours = statistics.median(times[list(methods)[-1]])
        ours_best = min(times[list(methods)[-1]])
        print(f"\nCorpus: {corpus.name}, {mb:.1f} MB; tokenizer: byte-level BPE, vocab {tok.vocab_size}; "
              f"median of {args.repeats} interleaved runs; load average {load_before:.1f} before, "
              f"{os.getloadavg()[0]:.1f} after\n")
        print("| method | median s | MB/s | M tokens/s | best s | MB/s (best) | CPU s (all processes) | tokens "
              "| lmforge speed-up (median / best) |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for name, ts in times.items():
            t, best = statistics.median(ts), min(ts)
            speedup = f"{t / ours:.2f}x / {best / ours_best:.2f}x"
            print(f"| {name} | {t:.2f} | {mb / t:.2f} | {tokens[name] / t / 1e6:.2f} | {best:.2f} | {mb / best:.2f} | "
                  f"{statistics.median(cpu[name]):.2f} | {tokens[name]:,} | {speedup} |")
        print(f"\n{versions()}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
