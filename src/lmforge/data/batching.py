"""Batches: what the training loop consumes, and the one way lmforge pads them.

A batch is a dict of CPU tensors: input_ids (B, T) and, as the objective needs them,
attention_mask (B, T) (1 = real token), token_type_ids (B, T), labels (B, T) or (B,),
decoder_input_ids (B, S), index (B,) (which features a task batch holds). Sequences are
right-padded; a label of IGNORE_INDEX is skipped by every loss.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from lmforge.models.config import IGNORE_INDEX

__all__ = ["IGNORE_INDEX", "BatchIterator", "TokenSeq", "as_ids", "attention_mask", "collate_inputs", "collate_lm",
           "pad", "pad_batch", "with_index"]


TokenSeq = Sequence[int] | np.ndarray | Tensor


class BatchIterator(Protocol):
    """What the loop consumes: an iterator of batches whose position can be saved and
    restored exactly. Training stops when it is exhausted, so a pretraining iterator cycles
    through its data forever. Under torchrun each process has its own shard, and all shards
    must last equally many batches."""

    def __iter__(self) -> Iterator[dict[str, Tensor]]: ...

    def __next__(self) -> dict[str, Tensor]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def as_ids(seq: TokenSeq) -> Tensor:
    """One sequence of token ids -> 1-D int64 CPU tensor (copies narrow or memmapped arrays)."""
    if isinstance(seq, Tensor):
        t = seq.to(device="cpu", dtype=torch.int64)
    else:
        t = torch.from_numpy(np.array(seq, dtype=np.int64, ndmin=1))
    if t.dim() != 1:
        raise ValueError(f"expected a 1-D sequence of token ids, got shape {tuple(t.shape)}")
    return t


def pad(seqs: Sequence[TokenSeq], value: int, max_len: int | None = None) -> Tensor:
    """Right-pad sequences (each cut to max_len) to the longest -> (B, T) int64."""
    if len(seqs) == 0:
        raise ValueError("cannot collate an empty batch")
    return pad_sequence([as_ids(s)[:max_len] for s in seqs], batch_first=True, padding_value=value)


def attention_mask(lengths: Sequence[int], width: int) -> Tensor:
    """(B, width) int64: 1 on each row's first `length` positions, 0 on its padding."""
    return (torch.arange(width)[None] < torch.as_tensor(lengths)[:, None]).long()


def pad_batch(seqs: Sequence[TokenSeq], value: int, max_len: int | None = None) -> tuple[Tensor, Tensor]:
    """Right-pad sequences (each cut to max_len) -> (ids (B, T), attention_mask (B, T))."""
    ids = pad(seqs, value, max_len)
    return ids, attention_mask([min(len(s), max_len or len(s)) for s in seqs], ids.size(1))


def collate_inputs(features: Sequence[dict[str, Any]], pad_id: int) -> dict[str, Tensor]:
    """Encoder inputs of task features {input_ids, type_ids}: input_ids, attention_mask and
    token_type_ids (B, T)."""
    ids, mask = pad_batch([f["input_ids"] for f in features], pad_id)
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": pad([f["type_ids"] for f in features], 0)}


def collate_lm(features: Sequence[dict[str, Any]], pad_id: int) -> dict[str, Tensor]:
    """Features {input_ids, labels} of a language-modelling task (seq2seq, sft): input_ids,
    attention_mask (B, T) and labels (B, T') padded with IGNORE_INDEX."""
    ids, mask = pad_batch([f["input_ids"] for f in features], pad_id)
    return {"input_ids": ids, "attention_mask": mask, "labels": pad([f["labels"] for f in features], IGNORE_INDEX)}


def with_index(batch: dict[str, Tensor], positions: Sequence[int]) -> dict[str, Tensor]:
    """Add the features' positions ("index", (B,) int64) so that outputs can be matched to them."""
    batch["index"] = torch.tensor(list(positions), dtype=torch.int64)
    return batch
