"""perplexity: evaluate a causal language model on a text file (evaluation only).

    lmforge evaluate perplexity --model DIR --data FILE [--max-length N] [--stride S]

    documents       a .txt file is one document (the whole text); in .jsonl / .csv / .tsv /
                    .parquet files each record's text_column (--field, default "text") is one,
                    scored on its own: no context crosses from one document to the next
    windows         each document is read in windows of max_length tokens (default: the
                    model's max_seq_len) moving `stride` tokens at a time (default max_length / 2);
                    a window scores only the tokens the previous one did not, so every token
                    but a document's first is predicted exactly once, with at least
                    max_length - stride tokens of context (lmforge.eval.perplexity.window_spans)
    metrics         perplexity = exp(nll), nll = mean negative log-likelihood per predicted
                    token (nats), nll_sum, bits_per_char and bits_per_byte (summed nats / ln 2
                    / the documents' characters or UTF-8 bytes: these compare models with
                    different tokenizers), n_tokens (predicted tokens), n_documents, n_windows

Runs through the fine-tuning driver's evaluate path (`evaluate("perplexity", model=...,
data=..., out=...)`), so precision, device and batch_size work as for every task; the
numbers equal lmforge.eval.perplexity.sliding_window_nll over each document.

Also here: the per-token NLL statistics (`row_token_stats`) that sft's validation shares.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lmforge.data.batching import IGNORE_INDEX, attention_mask, pad
from lmforge.data.sources import iter_documents
from lmforge.eval.loglikelihood import token_stats
from lmforge.eval.metrics import bits_per_byte, bits_per_char, perplexity
from lmforge.eval.perplexity import window_spans
from lmforge.nn.quant import head_weight
from lmforge.tasks.base import Base, FinetuneConfig, Outputs, Setup, task_options
from lmforge.train.objectives import ObjectiveOutput

# ----------------------------------------------------------------------------- per-token statistics


def row_token_stats(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Causal LM statistics per row of a GPT batch (input_ids, attention_mask, labels (B, T),
    already shifted, -100 = not scored): summed NLL (B,), correct next tokens (B,), scored
    tokens (B,). Only the scored positions reach the LM head (evaluation: one host sync)."""
    hidden = model.encode(batch["input_ids"], batch.get("attention_mask"))  # (B, T, D)
    labels = batch["labels"]
    scored = labels != IGNORE_INDEX  # (B, T)
    rows = scored.nonzero()[:, 0]  # host sync (evaluation only): the scored positions' rows
    nll, correct = token_stats(hidden[scored], head_weight(model.lm_head), labels[scored], model.config.vocab_size,
                               model.config.logit_softcap)
    B = labels.size(0)
    zeros = torch.zeros(B, dtype=torch.float32, device=hidden.device)
    return zeros.index_add(0, rows, nll), zeros.index_add(0, rows, correct.float()), scored.sum(1)


# ----------------------------------------------------------------------------- the task


@dataclass
class PerplexityOptions:
    """Options of `evaluate perplexity` (FinetuneConfig.options).

    Args:
        text_column: the text field of .jsonl / column of .csv, .tsv, .parquet (a .txt file is one document).
        stride: tokens each window moves; None: max_length // 2. stride = max_length is plain
            chunked evaluation (cheapest, least context).
        add_special_tokens: let the tokenizer add its special tokens (a BOS, which makes the
            first text token predicted too).
    """

    text_column: str | int = "text"
    stride: int | None = None
    add_special_tokens: bool = False


def read_documents(path: Path, field: str | int) -> list[str]:
    """The documents of FILE: a .txt file whole, else each record's `field`."""
    if not isinstance(field, str):
        raise ValueError(f"perplexity: the text field must be a name (text_column), got {field!r}")
    return list(iter_documents(path, field=field, doc_per_file=True))


def window_features(ids: list[int], max_length: int, stride: int) -> list[dict[str, Any]]:
    """One document's windows: {input_ids (L,), targets (L,) the next tokens, skip: how many
    leading targets the previous window already scored}."""
    t = torch.tensor(ids, dtype=torch.long)
    return [{"input_ids": t[b:e], "targets": t[b + 1:e + 1], "skip": s - b} for b, e, s in
            window_spans(len(ids), max_length, stride)]


def collate(features: list[dict[str, Any]], pad_id: int) -> dict[str, Tensor]:
    """input_ids, attention_mask, labels (B, L): right-padded; labels -100 at padding and at
    the targets a previous window scored."""
    ids = pad([f["input_ids"] for f in features], pad_id)
    labels = pad([f["targets"] for f in features], IGNORE_INDEX)
    for row, f in enumerate(features):
        labels[row, :f["skip"]] = IGNORE_INDEX
    return {"input_ids": ids, "attention_mask": attention_mask([len(f["input_ids"]) for f in features], ids.size(1)),
            "labels": labels}


def step(model: nn.Module, batch: dict[str, Tensor]) -> tuple[ObjectiveOutput, tuple[Tensor, Tensor]]:
    """Summed NLL of the scored tokens; per window (nll_sum, n_tokens) for `score`."""
    nll, _, count = row_token_stats(model, batch)
    return ObjectiveOutput(nll.sum(), count.sum(), {}), (nll, count)


def score(model: nn.Module, outputs: Outputs, *, stats: dict[str, Any]) -> dict[str, Any]:
    """Totals over every window of every document."""
    nll_sum = math.fsum(float(nll) for nll, _ in outputs.values())
    n_tokens = int(sum(float(n) for _, n in outputs.values()))
    mean = nll_sum / n_tokens
    return {"perplexity": perplexity(mean), "nll": mean, "nll_sum": nll_sum,
            "bits_per_char": bits_per_char(nll_sum, stats["n_chars"]),
            "bits_per_byte": bits_per_byte(nll_sum, stats["n_bytes"]), "n_tokens": n_tokens, **stats}


class Perplexity:
    """The perplexity task (see the module docstring): evaluation only."""

    name = "perplexity"
    options_type = PerplexityOptions
    evaluate_only = True
    metric = "loss"
    metrics: tuple[str, ...] = ()  # perplexity, nll, bits are lower-is-better: not selection metrics
    max_length = 1 << 30  # i.e. the model's max_seq_len (the driver takes the smaller)

    def setup(self, base: Base, config: FinetuneConfig, train: Path | None, valid: Path) -> Setup:
        if train is not None:
            raise ValueError("perplexity is an evaluation task (lmforge evaluate perplexity); to train a causal "
                             "language model use lmforge pretrain")
        if base.head is not None or base.family != "gpt":
            what = f"a {base.head.kind} head" if base.head is not None else f"a model of the {base.family} family"
            raise ValueError(f"{base.path}: perplexity needs a causal language model (GPT / Llama family without "
                             f"a task head); this is {what}")
        opts = task_options(self, config)
        max_length = config.max_length
        stride = opts.stride or max(1, max_length // 2)
        if not 1 <= stride <= max_length:
            raise ValueError(f"stride must be in 1..max_length ({max_length}), got {stride}")
        documents = read_documents(valid, opts.text_column)
        encoded = base.tokenizer.encode_batch(documents, add_special_tokens=opts.add_special_tokens)
        features: list[dict[str, Any]] = []
        kept = [(doc, ids) for doc, ids in zip(documents, encoded) if len(ids) >= 2]
        if not kept:
            raise ValueError(f"{valid}: no document has the 2 tokens needed to score one")
        for _, ids in kept:
            features += window_features(ids, max_length, stride)
        stats = {"n_chars": sum(len(d) for d, _ in kept), "n_bytes": sum(len(d.encode("utf-8")) for d, _ in kept),
                 "n_documents": len(kept), "n_windows": len(features), "max_length": max_length, "stride": stride}
        notes = [f"{len(kept)} document(s), {len(features)} windows of at most {max_length} tokens, stride {stride}"]
        if len(kept) < len(documents):
            notes.append(f"{valid}: skipped {len(documents) - len(kept)} document(s) of fewer than 2 tokens")
        return Setup(model=base.model, head=None, train=[], valid=features,
                     collate=functools.partial(collate, pad_id=base.pad_id), step=step,
                     score=functools.partial(score, stats=stats), notes=notes)
