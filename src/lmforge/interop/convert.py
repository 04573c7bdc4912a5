"""Moving tensors between naming schemes by rules: the mechanism behind interop/hf.py,
free of any foreign names."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor


class ConversionError(ValueError):
    """A checkpoint that cannot be mapped; the message names the file and the tensor."""


@dataclass(frozen=True)
class Rule:
    """lmforge tensor `ours` = concat(theirs..., dim 0), each transposed first when
    `transpose` (GPT-2's Conv1D stores (in, out)). `split` gives the row counts of the
    parts when they differ (grouped-query QKV); `vocab` marks rows padded to the
    padded vocabulary in lmforge. `optional` tensors may be absent from a checkpoint
    (heads) and are then left freshly initialised."""

    ours: str
    theirs: tuple[str, ...]
    transpose: bool = False
    vocab: bool = False
    split: tuple[int, ...] | None = None
    optional: bool = False


def present(rules: list[Rule], tensors: Mapping[str, Tensor], source: str) -> tuple[list[Rule], list[str]]:
    """The rules whose tensors the checkpoint holds, and the lmforge names of optional ones it
    lacks (freshly initialised); a required tensor missing raises ConversionError naming it."""
    found: list[Rule] = []
    fresh: list[str] = []
    for rule in rules:
        have = [name in tensors for name in rule.theirs]
        if all(have):
            found.append(rule)
        elif rule.optional and not any(have):
            fresh.append(rule.ours)
        else:
            missing = [n for n, ok in zip(rule.theirs, have) if not ok]
            raise ConversionError(f"{source}: missing tensor(s) {missing} (needed for lmforge's {rule.ours})")
    return found, fresh


def gather(rules: list[Rule], tensors: Mapping[str, Tensor], target: Mapping[str, Tensor], source: str,
           vocab_size: int) -> Iterator[tuple[str, Tensor]]:
    """Each lmforge tensor built from `tensors` (the checkpoint's) by `rules`, one at a time
    (so that a model loads holding one checkpoint tensor beside it, not all of them).

    target: the lmforge model's state dict (for shapes, padding and dtypes).
    Raises ConversionError naming `source` and the tensor on a missing tensor or a shape mismatch.
    """
    for rule in rules:
        if not all(name in tensors for name in rule.theirs):
            raise ConversionError(f"{source}: missing tensor(s) {list(rule.theirs)} (needed for lmforge's {rule.ours})")
        parts = [tensors[name].t() if rule.transpose else tensors[name] for name in rule.theirs]
        value = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]
        del parts
        want = target[rule.ours]
        if rule.vocab and value.size(0) == vocab_size and want.size(0) > vocab_size:
            pad = value.new_zeros((want.size(0) - vocab_size, *value.shape[1:]))
            value = torch.cat([value, pad], dim=0)
        if tuple(value.shape) != tuple(want.shape):
            raise ConversionError(f"{source}: tensor {' + '.join(rule.theirs)} has shape {tuple(value.shape)}, "
                                  f"lmforge's {rule.ours} needs {tuple(want.shape)}")
        yield rule.ours, value.to(want.dtype)


def scatter(rules: list[Rule], state: Mapping[str, Tensor], vocab_size: int) -> dict[str, Tensor]:
    """The inverse of `gather`: lmforge tensors -> the checkpoint's names."""
    out: dict[str, Tensor] = {}
    for rule in rules:
        if rule.ours not in state:
            continue
        value = state[rule.ours]
        if rule.vocab:
            value = value[:vocab_size]
        if len(rule.theirs) == 1:
            parts = [value]
        elif rule.split is not None:
            parts = list(value.split(list(rule.split), dim=0))
        else:
            parts = list(value.chunk(len(rule.theirs), dim=0))
        for name, part in zip(rule.theirs, parts):
            out[name] = (part.t() if rule.transpose else part).contiguous()
    return out
