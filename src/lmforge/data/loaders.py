"""Loaders over prepared token shards: plain Python iterators yielding dicts of int64 CPU tensors.

- `RandomWindows`: random fixed-length windows for causal-LM pretraining (infinite, seeded, resumable);
- `SequentialWindows`: consecutive windows over a split, for validation (finite, deterministic);
- `PackedDocuments`: whole documents packed into rows, with per-token document ids and positions
  so a trainer can build a block-diagonal causal mask and restart positions at each document;
- `Documents`: whole documents as token arrays, for collators that build their own examples
  (masked LM + next sentence, denoising);
- `PooledExamples`: batches made from pools of `Documents` by an objective's example maker
  and collator (NSP pairs, denoising spans), resumable like the rest.

Distributed training: every loader takes ``rank`` and ``world_size``. All ranks compute the same
global batch of ``batch_size * world_size`` rows and each keeps its own ``batch_size`` rows (rank r
takes rows ``r*B .. (r+1)*B``), so ranks see disjoint rows and together exactly what one process
with the global batch would see. Labels are already shifted: ``labels[:, t]`` is the token after
``input_ids[:, t]``, and -100 where there is none to predict (do not shift again).

Resumption: `state_dict()` after a batch captures the position; a loader built with the same
arguments and given `load_state_dict(state)` yields exactly the batches the uninterrupted one would.
Another number of processes: `load_state_dicts(states)` (every process's saved state, rank order)
continues at the global position they had reached. `RandomWindows` counts its position in global
windows, so with the same global batch (micro-batch x processes x accumulation) the continued run
sees exactly the windows the uninterrupted one would have; `Documents` streams (masked LM, NSP,
denoising) continue after the last document any process had read (see `PooledExamples`).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lmforge.data.batching import IGNORE_INDEX
from lmforge.data.shards import TokenShards

POOL_DOCS = 256  # documents per pool: NotNext partners and the example shuffle come from within a pool
WINDOW_BLOCK = 4096  # RandomWindows draws window starts this many at a time, from (seed, block)



def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")


def _check_state(state: dict[str, Any], expected: dict[str, Any], name: str) -> None:
    for key, value in expected.items():
        if state.get(key) != value:
            raise ValueError(f"{name}.load_state_dict: saved {key}={state.get(key)!r} but this loader has {value!r}; "
                             "resuming needs the same data settings")


def _shifted(rows: np.ndarray) -> dict[str, torch.Tensor]:
    """(B, T + 1) token rows -> input_ids (B, T) and next-token labels (B, T), int64."""
    rows = rows.astype(np.int64)
    return {"input_ids": torch.from_numpy(np.ascontiguousarray(rows[:, :-1])),
            "labels": torch.from_numpy(np.ascontiguousarray(rows[:, 1:]))}


def same_position(states: list[dict[str, Any]], key: str, name: str) -> dict[str, Any]:
    """The one global position that every process's saved state holds (loaders whose position
    is global: each process saved the same); ValueError when they disagree."""
    if not states:
        raise ValueError(f"{name}.load_state_dicts: no saved states")
    values = {repr(s.get(key)) for s in states}
    if len(values) != 1:
        raise ValueError(f"{name}.load_state_dicts: the processes saved different positions ({key}: "
                         f"{', '.join(sorted(values))})")
    return states[0]


class RandomWindows:
    """Infinite batches of random windows: {"input_ids": (B, T), "labels": (B, T)} int64.

    Global window j (counting every process's rows, micro-batch after micro-batch) starts at a
    position drawn from a generator seeded with (seed, j // WINDOW_BLOCK), so the stream is a
    function of the window's number alone, whatever the batch size and number of processes:
    the number of windows consumed ("samples") is the whole resumable state. Windows run
    across document ends (documents are separated by EOS), as in GPT-2 style pretraining.
    """

    def __init__(self, shards: TokenShards, batch_size: int, seq_len: int, *, seed: int = 0, rank: int = 0,
                 world_size: int = 1) -> None:
        _check_rank(rank, world_size)
        if shards.n_tokens < seq_len + 1:
            raise ValueError(f"{shards.directory} ({shards.split}): {shards.n_tokens} tokens, fewer than one window "
                             f"of seq_len + 1 = {seq_len + 1}")
        self.shards, self.batch_size, self.seq_len = shards, batch_size, seq_len
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.samples = 0  # global windows consumed
        self._block: tuple[int, np.ndarray] = (-1, np.zeros(0, np.int64))

    def __iter__(self) -> RandomWindows:
        return self

    def _starts(self, first: int, n: int) -> np.ndarray:
        """Start positions of global windows first .. first + n - 1."""
        out = []
        for j in range(first, first + n):
            block = j // WINDOW_BLOCK
            if self._block[0] != block:
                rng = np.random.default_rng([self.seed, block])
                self._block = (block, rng.integers(0, self.shards.n_tokens - self.seq_len, size=WINDOW_BLOCK))
            out.append(self._block[1][j % WINDOW_BLOCK])
        return np.array(out, dtype=np.int64)

    def __next__(self) -> dict[str, torch.Tensor]:
        B = self.batch_size
        mine = self._starts(self.samples + self.rank * B, B)
        rows = np.stack([self.shards.tokens(int(s), int(s) + self.seq_len + 1) for s in mine])  # (B, T + 1)
        self.samples += B * self.world_size
        return _shifted(rows)

    def state_dict(self) -> dict[str, Any]:
        return {"samples": self.samples, "seed": self.seed, "seq_len": self.seq_len}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_state(state, {"seed": self.seed, "seq_len": self.seq_len}, "RandomWindows")
        # Checkpoints written before positions were global counted micro-batches of a global batch.
        self.samples = int(state["samples"]) if "samples" in state else int(state["step"]) * int(state["global_batch"])

    def load_state_dicts(self, states: list[dict[str, Any]]) -> None:
        """Continue where a run of len(states) processes stopped (the position is global)."""
        self.load_state_dict(same_position(states, "samples", "RandomWindows"))


class SequentialWindows:
    """One deterministic pass of consecutive, non-overlapping windows (validation).

    Yields {"input_ids": (b, T), "labels": (b, T)} with b = batch_size except possibly the last batch.
    With world_size > 1 every window is evaluated exactly once and every rank runs the same number
    of batches: the last global batch is split into equal shares, a rank short of windows filling
    its share with padding rows whose labels are all -100 (they count for nothing). Iterating again
    starts a new pass.
    """

    def __init__(self, shards: TokenShards, batch_size: int, seq_len: int, *, rank: int = 0, world_size: int = 1,
                 max_batches: int | None = None) -> None:
        _check_rank(rank, world_size)
        self.shards, self.batch_size, self.seq_len = shards, batch_size, seq_len
        self.rank, self.world_size, self.max_batches = rank, world_size, max_batches
        self.n_windows = max(0, shards.n_tokens - 1) // seq_len
        if self.n_windows == 0:
            raise ValueError(f"{shards.directory} ({shards.split}): {shards.n_tokens} tokens, fewer than one window "
                             f"of seq_len + 1 = {seq_len + 1}")

    def _ranges(self) -> list[tuple[int, int, int]]:
        """(first, last, rows): this rank's window indices [first, last) of each batch, padded to rows."""
        global_batch = self.batch_size * self.world_size
        ranges = []
        for base in range(0, self.n_windows, global_batch):
            rows = min(self.batch_size, -(-(self.n_windows - base) // self.world_size))
            first = min(base + self.rank * rows, self.n_windows)
            ranges.append((first, min(first + rows, self.n_windows), rows))
        return ranges[: self.max_batches] if self.max_batches is not None else ranges

    def __len__(self) -> int:
        return len(self._ranges())

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        T = self.seq_len
        for first, last, rows in self._ranges():
            windows = list(range(first, last)) + [0] * (rows - (last - first))  # padding: any window, no labels
            batch = _shifted(np.stack([self.shards.tokens(w * T, w * T + T + 1) for w in windows]))  # (rows, T)
            batch["labels"][last - first:] = IGNORE_INDEX
            yield batch


class _DocumentOrder:
    """Epoch-wise document order (a seeded permutation, or the stored order) and a cursor into it."""

    def __init__(self, n_docs: int, shuffle: bool, seed: int) -> None:
        if n_docs == 0:
            raise ValueError("no documents to iterate over")
        self.n_docs, self.shuffle, self.seed = n_docs, shuffle, seed
        self.epoch, self.cursor = 0, 0
        self._order_epoch, self._order = -1, np.arange(0)

    def current(self) -> int:
        """The document at the cursor (the cursor is always inside the current epoch)."""
        if self._order_epoch != self.epoch:
            rng = np.random.default_rng([self.seed, self.epoch])
            self._order = rng.permutation(self.n_docs) if self.shuffle else np.arange(self.n_docs)
            self._order_epoch = self.epoch
        return int(self._order[self.cursor])

    def advance(self) -> None:
        self.cursor += 1
        if self.cursor == self.n_docs:
            self.epoch, self.cursor = self.epoch + 1, 0


class PackedDocuments:
    """Batches of rows of length T packed with whole documents.

    Yields {"input_ids", "labels", "doc_ids", "position_ids"}, each (B, T) int64:
    doc_ids numbers the documents within a row (0, 1, ...; -1 on padding), position_ids restart at
    0 with each document, labels are next tokens within the same document (-100 at a document's
    last token and on padding). A document that fits in a row is never cut: when it does not fit in
    what is left of the row, the rest of the row is padded with `pad_id` (default: the separator).
    A document longer than T is cut into pieces, each treated as its own document.
    epochs: None for an endless stream; else stop after that many passes (the last batch may be
    short when world_size is 1, and is dropped when incomplete otherwise).
    """

    def __init__(self, shards: TokenShards, batch_size: int, seq_len: int, *, seed: int = 0, shuffle: bool = True,
                 rank: int = 0, world_size: int = 1, pad_id: int | None = None, epochs: int | None = None) -> None:
        _check_rank(rank, world_size)
        self.shards, self.batch_size, self.seq_len = shards, batch_size, seq_len
        self.seed, self.shuffle, self.rank, self.world_size, self.epochs = seed, shuffle, rank, world_size, epochs
        self.pad_id = shards.eos_id if pad_id is None else pad_id
        self.offsets = shards.doc_offsets
        self.order = _DocumentOrder(shards.n_docs, shuffle, seed)
        self.offset = 0  # tokens of the current document already placed (documents longer than a row)

    def __iter__(self) -> PackedDocuments:
        return self

    def _exhausted(self) -> bool:
        return self.epochs is not None and self.order.epoch >= self.epochs

    def _next_row(self) -> list[tuple[int, int]]:
        """Global token ranges [start, stop) of the segments that make up the next row."""
        T, segments, used = self.seq_len, [], 0
        while used < T and not self._exhausted():
            doc = self.order.current()
            start, stop = int(self.offsets[doc]) + self.offset, int(self.offsets[doc + 1])
            remaining = stop - start
            if remaining <= T - used:  # the (rest of the) document fits: place it whole
                segments.append((start, stop))
                used += remaining
                self.offset = 0
                self.order.advance()
            elif remaining > T:  # longer than any row: it has to be cut, so fill this row with its next piece
                take = T - used
                segments.append((start, start + take))
                used += take
                self.offset += take
            else:  # would fit a fresh row: pad this one rather than cut the document
                break
        return segments

    def _row(self, segments: list[tuple[int, int]]) -> tuple[np.ndarray, ...]:
        T = self.seq_len
        ids = np.full(T, self.pad_id, np.int64)
        labels = np.full(T, IGNORE_INDEX, np.int64)
        doc_ids = np.full(T, -1, np.int64)
        positions = np.zeros(T, np.int64)
        at = 0
        for k, (start, stop) in enumerate(segments):
            n = stop - start
            ids[at:at + n] = self.shards.tokens(start, stop)
            labels[at:at + n - 1] = ids[at + 1:at + n]
            doc_ids[at:at + n] = k
            positions[at:at + n] = np.arange(n)
            at += n
        return ids, labels, doc_ids, positions

    def __next__(self) -> dict[str, torch.Tensor]:
        global_rows = []
        for _ in range(self.batch_size * self.world_size):
            if self._exhausted():
                break
            global_rows.append(self._next_row())
        full = len(global_rows) == self.batch_size * self.world_size
        mine = global_rows[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        if not mine or (not full and self.world_size > 1):
            raise StopIteration
        columns = zip(*(self._row(segments) for segments in mine))
        names = ("input_ids", "labels", "doc_ids", "position_ids")
        return {name: torch.from_numpy(np.stack(col)) for name, col in zip(names, columns)}

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.order.epoch, "cursor": self.order.cursor, "offset": self.offset, "seed": self.seed,
                "shuffle": self.shuffle, "seq_len": self.seq_len, "global_batch": self.batch_size * self.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_state(state, {"seed": self.seed, "shuffle": self.shuffle, "seq_len": self.seq_len,
                             "global_batch": self.batch_size * self.world_size}, "PackedDocuments")
        self.order.epoch, self.order.cursor = int(state["epoch"]), int(state["cursor"])
        self.offset = int(state["offset"])


class Documents:
    """Whole documents as int64 numpy arrays (separator removed), for collators that build examples.

    Documents come in a seeded per-epoch order (or stored order with shuffle=False); rank r of
    world_size takes every world_size-th document of that order, so ranks see disjoint documents.
    epochs: None for an endless stream. Resumable through state_dict() / load_state_dict().
    """

    def __init__(self, shards: TokenShards, *, shuffle: bool = True, seed: int = 0, rank: int = 0,
                 world_size: int = 1, epochs: int | None = None) -> None:
        _check_rank(rank, world_size)
        self.shards, self.seed, self.shuffle = shards, seed, shuffle
        self.rank, self.world_size, self.epochs = rank, world_size, epochs
        self.order = _DocumentOrder(shards.n_docs, shuffle, seed)

    def __iter__(self) -> Documents:
        return self

    def __next__(self) -> np.ndarray:
        while self.epochs is None or self.order.epoch < self.epochs:
            take = self.order.cursor % self.world_size == self.rank
            doc = self.order.current()
            self.order.advance()
            if take:
                return self.shards.document(doc).astype(np.int64)
        raise StopIteration

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.order.epoch, "cursor": self.order.cursor, "seed": self.seed, "shuffle": self.shuffle,
                "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_state(state, {"seed": self.seed, "shuffle": self.shuffle, "world_size": self.world_size}, "Documents")
        self.order.epoch, self.order.cursor = int(state["epoch"]), int(state["cursor"])


class PooledExamples:
    """Batches built from pools of documents: make_examples(pool, seed) -> examples, which are
    shuffled and collated batch_size at a time. Endless when `documents` is."""

    def __init__(self, documents: Documents, make_examples: Callable[[list[np.ndarray], int], list[Any]],
                 collate: Any, batch_size: int, *, seed: int = 0, pool_docs: int = POOL_DOCS) -> None:
        self.documents, self.make_examples, self.collate = documents, make_examples, collate
        self.batch_size, self.seed, self.pool_docs = batch_size, seed, pool_docs
        self.pool_index, self.used = -1, 0
        self.pool_start = documents.state_dict()
        self.examples: list[Any] = []

    def _fill(self) -> None:
        """Read the next pool of documents; make, shuffle and keep its examples."""
        self.pool_start = self.documents.state_dict()
        docs = [d for _, d in zip(range(self.pool_docs), self.documents) if len(d)]
        if not docs:
            raise StopIteration
        self.pool_index += 1
        seed = self.seed * 1_000_003 + self.pool_index
        self.examples = self.make_examples(docs, seed)
        random.Random(seed).shuffle(self.examples)
        self.used = 0

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        return self

    def __next__(self) -> dict[str, Tensor]:
        while self.used + self.batch_size > len(self.examples):  # a pool's last partial batch is dropped
            self._fill()
        batch = self.examples[self.used:self.used + self.batch_size]
        self.used += self.batch_size
        return self.collate(batch)

    def state_dict(self) -> dict[str, Any]:
        return {"pool_start": self.pool_start, "pool_index": self.pool_index, "used": self.used,
                "collator": self.collate.state_dict(), "documents_end": self.documents.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.documents.load_state_dict(state["pool_start"])
        saved = int(state["pool_index"])
        self.pool_index, self.examples = saved - 1, []
        if saved >= 0:
            self._fill()  # rebuilds the same pool (same stream position, same seed)
        self.used = int(state["used"])
        self.collate.load_state_dict(state["collator"])

    def load_state_dicts(self, states: list[dict[str, Any]]) -> None:
        """Continue where a run of len(states) processes stopped, with this loader's number of
        processes: after the last document any of them had read (the examples still unused in
        each process's current pool, at most `pool_docs` documents' worth per process, are
        skipped; no document is read twice). Rank r keeps rank r's masking RNG where there is one."""
        ends = [s.get("documents_end", s["pool_start"]) for s in states]
        furthest = max(ends, key=lambda e: (int(e["epoch"]), int(e["cursor"])))
        self.documents.load_state_dict({**furthest, "world_size": self.documents.world_size})
        self.pool_start = self.documents.state_dict()
        self.pool_index, self.used, self.examples = max(int(s["pool_index"]) for s in states), 0, []
        if self.documents.rank < len(states):
            self.collate.load_state_dict(states[self.documents.rank]["collator"])
