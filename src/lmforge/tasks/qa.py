"""qa: extractive question answering, SQuAD v1.1 and v2.0 (questions that have no answer).

    input           [CLS] question [SEP] context window [SEP]; the question is cut to
                    max_query_length tokens, only the context is truncated. A context too long
                    for one window is split into several that share doc_stride tokens, so every
                    answer lies whole inside at least one window
    labels          the window's token positions of the answer's first and last characters;
                    the [CLS] position (0) when the answer is not whole inside the window or the
                    question has none (v2), so "no answer here" is a prediction like any other
    loss            (CE(start) + CE(end)) / 2 per window, padding masked out of the softmax
    prediction      per question, over all its windows: the best span (start + end logits) with
                    start and end among the window's n_best highest start / end logits, both
                    inside the context, end >= start, at most max_answer_length tokens, mapped
                    back to the context's characters by the tokenizer's offsets. v2: "" when the
                    smallest null score (start + end logit at [CLS]) beats the best span by more
                    than null_threshold
    metrics         exact_match and f1 of the official SQuAD script (percentages)
"""

from __future__ import annotations

import functools
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.data.batching import collate_inputs
from lmforge.data.readers import QAData, QAExample, read_squad
from lmforge.eval.metrics import squad_metrics
from lmforge.models import HeadSpec
from lmforge.tasks.base import (
    Base,
    FinetuneConfig,
    Outputs,
    Setup,
    _check,
    count_of,
    log,
    model_with_head,
    require_head,
    task_options,
    truncating,
)
from lmforge.train.objectives import ObjectiveOutput

KIND = "span"


@dataclass
class QAOptions:
    """Options of qa.

    Args:
        doc_stride: context tokens shared by consecutive windows of a long context; None:
            max_length // 3 (128 for the default 384, as transformers' run_qa).
        max_query_length: questions are cut to this many tokens.
        max_answer_length: longest answer span, in tokens.
        n_best: start and end candidates per window (the top-n logits of each).
        null_threshold: SQuAD v2: answer "" when null score - best span score > this.
    """

    doc_stride: int | None = None
    max_query_length: int = 64
    max_answer_length: int = 30
    n_best: int = 20
    null_threshold: float = 0.0

    def __post_init__(self) -> None:
        _check(self.doc_stride is None or self.doc_stride >= 0, "doc_stride", "must be >= 0", self.doc_stride)
        _check(self.max_query_length >= 1, "max_query_length", "must be >= 1", self.max_query_length)
        _check(self.max_answer_length >= 1, "max_answer_length", "must be >= 1", self.max_answer_length)
        _check(self.n_best >= 1, "n_best", "must be >= 1", self.n_best)
NO_SPAN = -1e9  # logit given to padding: outside every softmax


def cut_questions(base: Base, examples: list[QAExample], max_query_length: int,
                  notes: list[str]) -> tuple[list[str], int]:
    """Questions cut to max_query_length tokens (at a token's end, in characters), and the
    longest one's token count."""
    questions = [ex.question.lstrip() for ex in examples]  # leading blanks would only waste tokens
    encodings = base.tokenizer.encodings(questions, add_special_tokens=False)
    cut = 0
    for i, e in enumerate(encodings):
        if len(e.ids) > max_query_length:
            questions[i] = questions[i][:e.offsets[max_query_length - 1][1]]
            cut += 1
    if cut:
        line = f"cut {cut} of {len(questions)} questions to {max_query_length} tokens"
        log.warning(line)
        notes.append(line)
    return questions, min(max((len(e.ids) for e in encodings), default=0), max_query_length)


def answer_tokens(offsets: list[tuple[int, int]], context: tuple[int, int], start_char: int,
                  end_char: int) -> tuple[int, int] | None:
    """Token positions (first, last) of the characters [start_char, end_char) in one window,
    or None when the answer is not whole inside the window's context tokens c0..c1."""
    c0, c1 = context
    if not (offsets[c0][0] <= start_char and offsets[c1][1] >= end_char):
        return None
    first = c0
    while first <= c1 and offsets[first][0] <= start_char:
        first += 1
    last = c1
    while last >= c0 and offsets[last][1] >= end_char:
        last -= 1
    return first - 1, last + 1


def make_features(base: Base, data: QAData, config: FinetuneConfig, opts: QAOptions, what: str, notes: list[str],
                  keep_offsets: bool) -> list[dict[str, Any]]:
    """Question/context windows -> features {input_ids, type_ids, example, start, end, cls,
    context (c0, c1)} (+ offsets, for prediction)."""
    questions, longest = cut_questions(base, data.examples, opts.max_query_length, notes)
    stride = opts.doc_stride if opts.doc_stride is not None else config.max_length // 3
    backend = truncating(base.tokenizer, config.max_length)
    specials = backend.post_processor.num_special_tokens_to_add(True) if backend.post_processor else 0
    room = config.max_length - longest - specials  # context tokens per window beside the longest question
    if room <= stride:
        # checked here: tokenizers would abort the process (a Rust panic) on such a window
        raise ValueError(f"{what}: max_length {config.max_length} leaves {max(room, 0)} context tokens beside a "
                         f"question of {longest} tokens, not more than doc_stride {stride}: raise max_length, or "
                         "lower doc_stride or max_query_length")
    backend.enable_truncation(config.max_length, stride=stride, strategy="only_second")
    encodings = backend.encode_batch(list(zip(questions, [ex.context for ex in data.examples])))
    cls_id = base.tokenizer.cls_id
    features, split = [], 0
    for i, (ex, first_window) in enumerate(zip(data.examples, encodings)):
        windows = [first_window, *first_window.overflowing]
        split += len(windows) > 1
        for w in windows:
            sequence = w.sequence_ids
            ctx = [t for t, s in enumerate(sequence) if s == 1]
            if not ctx:
                continue
            cls = w.ids.index(cls_id) if cls_id in w.ids else 0
            span = None
            if ex.answers:
                a = ex.answers[0]
                span = answer_tokens(w.offsets, (ctx[0], ctx[-1]), a.start, a.start + len(a.text))
            f = {"input_ids": w.ids, "type_ids": w.type_ids, "example": i, "cls": cls, "context": (ctx[0], ctx[-1]),
                 "start": span[0] if span else cls, "end": span[1] if span else cls}
            if keep_offsets:
                f["offsets"] = w.offsets
            features.append(f)
    if split:
        line = (f"{what}: {split} of {len(data)} contexts longer than {config.max_length} tokens were split into "
                f"overlapping windows (doc_stride {stride})")
        log.info(line)
        notes.append(line)
    return features


class ExtractiveQA:
    """The qa task (see the module docstring)."""

    name = "qa"
    options_type = QAOptions
    evaluate_only = False
    metric = "f1"
    metrics = ("f1", "exact_match", "HasAns_f1", "HasAns_exact_match", "NoAns_f1", "NoAns_exact_match")
    max_length = 384

    def setup(self, base: Base, config: FinetuneConfig, train: Path | None, valid: Path) -> Setup:
        notes: list[str] = []
        opts: QAOptions = task_options(self, config)
        read = functools.partial(read_squad, skip_bad=config.skip_bad, columns=config.columns)
        train_data = read(train) if train is not None else None
        if train_data is not None:
            head = HeadSpec(KIND)
            model = model_with_head(base, head)
        else:
            head, model = require_head(base, KIND), base.model
        valid_data = read(valid)
        for path, data in ((train, train_data), (valid, valid_data)):
            if data is not None and data.skipped:
                notes.append(f"{path}: skipped {data.skipped} malformed questions")
        features = make_features(base, train_data, config, opts, str(train), notes, False) if train_data else []
        valid_features = make_features(base, valid_data, config, opts, str(valid), notes, True)
        return Setup(
            model=model, head=head, train=features, valid=valid_features,
            collate=functools.partial(collate, pad_id=base.pad_id), step=step,
            score=functools.partial(score, data=valid_data, features=valid_features, opts=opts),
            notes=notes)


def collate(features: list[dict[str, Any]], pad_id: int) -> dict[str, Tensor]:
    batch = collate_inputs(features, pad_id)
    batch["start_positions"] = torch.tensor([f["start"] for f in features], dtype=torch.int64)  # (B,)
    batch["end_positions"] = torch.tensor([f["end"] for f in features], dtype=torch.int64)  # (B,)
    return batch


def step(model: nn.Module, batch: dict[str, Tensor]) -> tuple[ObjectiveOutput, tuple[Tensor, Tensor]]:
    """Summed (CE(start) + CE(end)) / 2 over the windows; outputs: start and end logits (B, T)."""
    start, end = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    padding = batch["attention_mask"] == 0
    start = start.float().masked_fill(padding, NO_SPAN)  # (B, T)
    end = end.float().masked_fill(padding, NO_SPAN)  # (B, T)
    sp, ep = batch["start_positions"], batch["end_positions"]
    loss = (F.cross_entropy(start, sp, reduction="sum") + F.cross_entropy(end, ep, reduction="sum")) / 2
    n = count_of(sp.size(0), start.device)
    hit = ((start.argmax(-1) == sp) & (end.argmax(-1) == ep)).sum()
    return ObjectiveOutput(loss, n, {"span_acc": (hit, n)}), (start.detach(), end.detach())


def best_span(start: np.ndarray, end: np.ndarray, context: tuple[int, int], n_best: int,
              max_answer_length: int) -> tuple[float, int, int] | None:
    """(score, first, last) of the best span of one window: first among the n_best highest start
    logits and last among the n_best highest end logits of the context tokens, last >= first,
    at most max_answer_length tokens. None when no candidate pair is valid."""
    c0, c1 = context
    n = min(n_best, c1 - c0 + 1)
    starts = c0 + np.argpartition(-start[c0:c1 + 1], n - 1)[:n]
    ends = c0 + np.argpartition(-end[c0:c1 + 1], n - 1)[:n]
    length = ends[None, :] - starts[:, None] + 1  # (n, n)
    scores = np.where((length >= 1) & (length <= max_answer_length), start[starts][:, None] + end[ends][None, :],
                      -np.inf)
    k = int(np.argmax(scores))
    if not np.isfinite(scores.flat[k]):
        return None
    i, j = divmod(k, n)
    return float(scores.flat[k]), int(starts[i]), int(ends[j])


def predict(data: QAData, features: list[dict[str, Any]], outputs: Outputs, opts: QAOptions) -> dict[str, str]:
    """{question id: answer text} from the windows' start/end logits (see the module docstring)."""
    windows: dict[int, list[int]] = defaultdict(list)
    for position, f in enumerate(features):
        windows[f["example"]].append(position)
    v2 = data.version.startswith("2")
    answers = {}
    for i, ex in enumerate(data.examples):
        best, text, null = -np.inf, "", np.inf
        for position in windows[i]:
            f = features[position]
            start, end = (o[:len(f["input_ids"])].numpy() for o in outputs[position])
            null = min(null, float(start[f["cls"]] + end[f["cls"]]))
            span = best_span(start, end, f["context"], opts.n_best, opts.max_answer_length)
            if span is not None and span[0] > best:
                best = span[0]
                text = ex.context[f["offsets"][span[1]][0]:f["offsets"][span[2]][1]].strip()
        answers[ex.id] = "" if v2 and null - best > opts.null_threshold else text
    return answers


def score(model: nn.Module, outputs: Outputs, data: QAData, features: list[dict[str, Any]],
          opts: QAOptions) -> dict[str, Any]:
    predictions = predict(data, features, outputs, opts)
    references = {ex.id: [a.text for a in ex.answers] for ex in data.examples}
    return {**squad_metrics(predictions, references),
            "predictions": [{"id": i, "prediction": predictions[i], "answers": a} for i, a in references.items()]}
