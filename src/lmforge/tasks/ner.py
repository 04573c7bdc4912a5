"""ner: named-entity recognition as token classification over BIO (IOB2) tags.

    words           the CoNLL file's tokens, fed to the tokenizer pre-split (is_pretokenized),
                    so every sub-token knows its word (word_ids)
    labels          each word's tag on its FIRST sub-token; the other sub-tokens, [CLS],
                    [SEP] and padding get -100 (no loss), as in BERT's NER recipe
    head            hidden state -> dropout -> linear, at every position (TokenClassifier)
    predictions     each word takes the tag predicted at its first sub-token; a word the
                    tokenizer dropped or truncation cut off is predicted O. An I-X that
                    starts an entity is read as B-X (IOB1 repair) so that a tagging which
                    only slips on the prefix still yields the entity
    metrics         entity-level precision / recall / F1 (seqeval, strict IOB2), token accuracy
"""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.data.batching import IGNORE_INDEX, collate_inputs, pad
from lmforge.data.readers import NerData, _to_iob2, read_conll
from lmforge.eval.metrics import ner_metrics
from lmforge.models import HeadSpec
from lmforge.tasks.base import (
    Base,
    FinetuneConfig,
    LabelOptions,
    OnDevice,
    Outputs,
    Setup,
    class_weight_vector,
    declared_labels,
    log_truncation,
    model_with_head,
    require_head,
    task_options,
    truncating,
    warn_rare_labels,
)
from lmforge.train.objectives import ObjectiveOutput

KIND = "token-classification"


@dataclass
class NerOptions(LabelOptions):
    """Options of ner.

    Args:
        scheme: tagging scheme of the files: iob2 (BIO) or iob1 (converted to IOB2).
    """

    scheme: Literal["iob1", "iob2"] = "iob2"


def encode(base: Base, data: NerData, max_length: int, what: str, notes: list[str]) -> list[dict[str, Any]]:
    """Sentences -> features {input_ids, type_ids, labels (first sub-token: tag id, else -100),
    starts (token position of each word's first sub-token), words (the word of each start)}."""
    backend = truncating(base.tokenizer, max_length)
    encodings = backend.encode_batch(data.tokens, is_pretokenized=True)
    log_truncation(what, sum(1 for e in encodings if e.overflowing), len(encodings), max_length, notes)
    features, lost = [], 0
    for e, tags in zip(encodings, data.labels):
        labels, starts, words, previous = [IGNORE_INDEX] * len(e.ids), [], [], None
        for t, w in enumerate(e.word_ids):
            if w is not None and w != previous:
                labels[t] = tags[w]
                starts.append(t)
                words.append(w)
            previous = w
        lost += len(tags) - len(words)
        features.append({"input_ids": e.ids, "type_ids": e.type_ids, "labels": labels, "starts": starts,
                         "words": words})
    if lost:
        line = f"{what}: {lost} words have no token in the model's input (truncated or dropped by the tokenizer)"
        notes.append(line + "; they are predicted O")
    return features


class Ner:
    """The ner task (see the module docstring)."""

    name = "ner"
    options_type = NerOptions
    evaluate_only = False
    metric = "f1"
    metrics = ("f1", "precision", "recall", "accuracy")
    max_length = 128

    def setup(self, base: Base, config: FinetuneConfig, train: Path | None, valid: Path) -> Setup:
        notes: list[str] = []
        opts: NerOptions = task_options(self, config)
        read = functools.partial(read_conll, scheme=opts.scheme, skip_bad=config.skip_bad, columns=config.columns)
        types = declared_labels(opts.labels)
        tags = ["O"] + [f"{p}-{t}" for t in sorted(types) for p in "BI"] if types is not None else None
        train_data = read(train, label_names=tags) if train is not None else None
        if train_data is not None and types is None:
            entities = Counter(t[2:] for sentence in train_data.tags for t in sentence if t.startswith("B-"))
            warn_rare_labels(train, "entity types", dict(entities), notes)
        if train_data is not None:
            head = HeadSpec(KIND, train_data.label_names)
            model = model_with_head(base, head)
        else:
            head, model = require_head(base, KIND), base.model
        valid_data = read(valid, label_names=head.labels)
        for path, data in ((train, train_data), (valid, valid_data)):
            if data is not None and data.skipped:
                notes.append(f"{path}: skipped {data.skipped} malformed sentences")
            if data is not None and data.repaired:
                notes.append(f"{path}: {data.repaired} I- tags that began an entity were read as B-")
        features, weights = [], None
        if train_data is not None:
            features = encode(base, train_data, config.max_length, str(train), notes)
            counts = np.bincount([y for f in features for y in f["labels"] if y != IGNORE_INDEX],
                                 minlength=len(head.labels))
            weights = class_weight_vector(opts.class_weights, counts, head.labels)
        valid_features = encode(base, valid_data, config.max_length, str(valid), notes)
        return Setup(
            model=model, head=head, train=features, valid=valid_features,
            collate=functools.partial(collate, pad_id=base.pad_id),
            step=functools.partial(step, weights=OnDevice(weights)),
            score=functools.partial(score, data=valid_data, features=valid_features),
            report=report, notes=notes)


def collate(features: list[dict[str, Any]], pad_id: int) -> dict[str, Tensor]:
    batch = collate_inputs(features, pad_id)
    batch["labels"] = pad([f["labels"] for f in features], IGNORE_INDEX)  # (B, T)
    return batch


def step(model: nn.Module, batch: dict[str, Tensor], weights: OnDevice) -> tuple[ObjectiveOutput, Tensor]:
    """Summed cross-entropy over the labelled (first sub-)tokens; outputs: predicted ids (B, T)."""
    logits = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]).float()  # (B, T, L)
    labels = batch["labels"]
    per_token = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                                reduction="none")  # (B*T,), 0 where ignored
    w = weights.on(logits.device)
    if w is not None:
        per_token = per_token * w[labels.flatten().clamp(min=0)]
    labelled = labels != IGNORE_INDEX
    predicted = logits.argmax(-1)  # (B, T)
    n = labelled.sum()
    return ObjectiveOutput(per_token.sum(), n, {"token_acc": (((predicted == labels) & labelled).sum(), n)}), predicted


def word_tags(predicted: Tensor, feature: dict[str, Any], n_words: int, names: list[str]) -> list[str]:
    """A sentence's predicted token ids -> one well-formed IOB2 tag per word."""
    tags = ["O"] * n_words
    ids = predicted.long().tolist()
    for t, w in zip(feature["starts"], feature["words"]):
        tags[w] = names[ids[t]]
    return _to_iob2(tags)[0]


def score(model: nn.Module, outputs: Outputs, data: NerData, features: list[dict[str, Any]]) -> dict[str, Any]:
    names = data.label_names
    predicted = [word_tags(outputs[i], features[i], len(data.tags[i]), names) for i in range(len(data))]
    rows = [{"tokens": w, "tags": t, "predicted": p} for w, t, p in zip(data.tokens, data.tags, predicted)]
    return {**ner_metrics(data.tags, predicted), "predictions": rows}


def report(metrics: dict[str, Any], out: Path) -> dict[str, object]:
    return {"per entity type": metrics["per_type"]} if metrics["per_type"] else {}
