"""classify: text (or text-pair) classification, single- or multi-label.

    one text        [CLS] text [SEP]                   (BERT; a GPT reads the text as is)
    a text pair     [CLS] A [SEP] B [SEP], token types 0 then 1 (NLI: premise, hypothesis)
    head            pooled vector -> dropout -> linear: BERT's pooler (tanh(W h_[CLS])), a GPT's
                    last real token (the only position that has read the whole text); RoBERTa's
                    and DistilBERT's first token through a hidden layer (tanh; ReLU) first:
                    by default the head of the model's transformers class, so the export matches
    loss            single-label: cross-entropy (each example times its class weight);
                    multi-label: binary cross-entropy with logits per label (pos_weight),
                    a label is predicted when its sigmoid is > 0.5 (logit > 0)
    metrics         accuracy (multi-label: every label of an example right), macro_f1,
                    weighted_f1 / micro_f1, per-class precision/recall/F1, confusion matrix
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.data.batching import collate_inputs
from lmforge.data.readers import ClassificationData, read_classification
from lmforge.eval.metrics import classification_metrics, multilabel_metrics
from lmforge.eval.report import confusion_matrix_png
from lmforge.interop.hf import ConversionError, classifier_layout, model_type_of_model
from lmforge.models import HeadSpec
from lmforge.tasks.base import (
    Base,
    FinetuneConfig,
    LabelOptions,
    OnDevice,
    Outputs,
    Setup,
    class_weight_vector,
    column,
    count_of,
    declared_labels,
    log_truncation,
    model_with_head,
    require_head,
    task_options,
    truncating,
    warn_rare_labels,
)
from lmforge.train.objectives import ObjectiveOutput

KIND = "sequence-classification"
# The pooling of models transformers has no classifier for.
DEFAULT_POOLING = {"bert": "pooler", "gpt": "last", "encdec": "mean", "t5": "mean"}


def head_layout(base: Base, pooling: str | None) -> tuple[str, str | None]:
    """(pooling, hidden layer) of the new head: those of transformers' sequence classifier
    for this model (so that the export is that class), unless `pooling` asks for another."""
    try:
        layout = classifier_layout(model_type_of_model(base.backbone))
    except ConversionError:
        layout = None
    layout = layout or (DEFAULT_POOLING[base.family], None)
    if pooling is None or pooling == layout[0]:
        return layout
    return pooling, None


@dataclass
class ClassifyOptions(LabelOptions):
    """Options of classify.

    Args:
        text_column: text column (name, or 0-based index for a header-less CSV/TSV).
        text_pair_column: second text of a pair (NLI premise/hypothesis), or None.
        label_column: label column (name or index).
        multi_label: several labels per example (a JSON list or labels joined by label_sep):
            independent sigmoids, BCE-with-logits, threshold 0.5.
        label_sep: separator of multi-label labels.
        pooling: sequence vector: pooler, cls, last or mean; None: what the model's transformers
            class does, so that the export matches (pooler for BERT, last for GPT, cls through a
            hidden layer for RoBERTa and DistilBERT).
    """

    text_column: str | int = "text"
    text_pair_column: str | int | None = None
    label_column: str | int = "label"
    multi_label: bool = False
    label_sep: str = ","
    pooling: Literal["pooler", "cls", "last", "mean"] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.text_column, self.label_column = column(self.text_column), column(self.label_column)
        self.text_pair_column = column(self.text_pair_column)


def encode(base: Base, data: ClassificationData, max_length: int, what: str, notes: list[str]) -> list[dict]:
    """Tokenize texts (and pairs) with truncation -> features {input_ids, type_ids, label}."""
    backend = truncating(base.tokenizer, max_length)
    inputs = data.texts if data.text_pairs is None else list(zip(data.texts, data.text_pairs))
    encodings = backend.encode_batch(inputs)
    log_truncation(what, sum(1 for e in encodings if e.overflowing), len(encodings), max_length, notes)
    features = []
    for e, label in zip(encodings, data.labels):
        ids, types = (e.ids, e.type_ids) if e.ids else ([base.pad_id], [0])  # a text of no tokens still gets one
        features.append({"input_ids": ids, "type_ids": types, "label": label})
    return features


def label_counts(data: ClassificationData) -> np.ndarray:
    k = len(data.label_names)
    if data.multi_label:
        return np.bincount([i for labels in data.labels for i in labels], minlength=k)
    return np.bincount(data.labels, minlength=k)


class Classify:
    """The classify task (see the module docstring)."""

    name = "classify"
    options_type = ClassifyOptions
    evaluate_only = False
    metric = "accuracy"
    metrics = ("accuracy", "macro_f1", "weighted_f1", "micro_f1")
    max_length = 128

    def setup(self, base: Base, config: FinetuneConfig, train: Path | None, valid: Path) -> Setup:
        notes: list[str] = []
        opts: ClassifyOptions = task_options(self, config)
        if train is not None:
            train_data = self.read(train, config, opts, opts.multi_label, declared_labels(opts.labels))
            if opts.labels is None:
                counts = label_counts(train_data)
                warn_rare_labels(train, "labels", dict(zip(train_data.label_names, counts.tolist())), notes)
            pooling, hidden = head_layout(base, opts.pooling)
            head = HeadSpec(KIND, train_data.label_names, pooling, opts.multi_label, bias=base.family != "gpt",
                            hidden=hidden)
            model = model_with_head(base, head)
        else:
            head, model = require_head(base, KIND), base.model
        valid_data = self.read(valid, config, opts, head.multi_label, head.labels)
        for path, data in ((train, train_data if train is not None else None), (valid, valid_data)):
            if data is not None and data.skipped:
                notes.append(f"{path}: skipped {data.skipped} malformed records")
        features = encode(base, train_data, config.max_length, str(train), notes) if train is not None else []
        weights = None
        if train is not None:
            weights = class_weight_vector(opts.class_weights, label_counts(train_data), head.labels,
                                          len(train_data) if head.multi_label else None)
        return Setup(
            model=model, head=head, train=features,
            valid=encode(base, valid_data, config.max_length, str(valid), notes),
            collate=functools.partial(collate, pad_id=base.pad_id, n_labels=len(head.labels),
                                      multi_label=head.multi_label),
            step=functools.partial(step, multi_label=head.multi_label, weights=OnDevice(weights)),
            score=functools.partial(score, data=valid_data),
            report=report, notes=notes)

    @staticmethod
    def read(path: Path, config: FinetuneConfig, opts: ClassifyOptions, multi_label: bool,
             label_names: list[str] | None = None) -> ClassificationData:
        return read_classification(path, text_col=opts.text_column, label_col=opts.label_column,
                                   text_pair_col=opts.text_pair_column, multi_label=multi_label,
                                   label_sep=opts.label_sep, label_names=label_names, skip_bad=config.skip_bad,
                                   columns=config.columns)


def collate(features: list[dict[str, Any]], pad_id: int, n_labels: int, multi_label: bool) -> dict[str, Tensor]:
    batch = collate_inputs(features, pad_id)
    if multi_label:
        labels = torch.zeros(len(features), n_labels)
        for i, f in enumerate(features):
            labels[i, f["label"]] = 1.0
        batch["labels"] = labels  # (B, L) multi-hot
    else:
        batch["labels"] = torch.tensor([f["label"] for f in features], dtype=torch.int64)  # (B,)
    return batch


def step(model: nn.Module, batch: dict[str, Tensor], multi_label: bool,
         weights: OnDevice) -> tuple[ObjectiveOutput, Tensor]:
    """Summed loss over the batch's examples (multi-label: over example x label cells)."""
    logits = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]).float()  # (B, L)
    labels = batch["labels"]
    w = weights.on(logits.device)
    n = count_of(labels.size(0), logits.device)
    if multi_label:
        loss = F.binary_cross_entropy_with_logits(logits, labels, pos_weight=w, reduction="sum")
        correct = ((logits > 0) == labels.bool()).all(-1).sum()
        return ObjectiveOutput(loss, count_of(labels.numel(), logits.device), {"acc": (correct, n)}), logits.detach()
    per_example = F.cross_entropy(logits, labels, reduction="none")  # (B,)
    if w is not None:
        per_example = per_example * w[labels]
    correct = (logits.argmax(-1) == labels).sum()
    return ObjectiveOutput(per_example.sum(), n, {"acc": (correct, n)}), logits.detach()


def score(model: nn.Module, outputs: Outputs, data: ClassificationData) -> dict[str, Any]:
    """Metrics of the validation examples (one output per example, by position)."""
    logits = torch.stack([outputs[i] for i in range(len(data))])  # (N, L)
    names = data.label_names
    if data.multi_label:
        true = np.zeros(tuple(logits.shape), dtype=bool)
        for i, labels in enumerate(data.labels):
            true[i, labels] = True
        chosen = (logits > 0).numpy()
        multi = multilabel_metrics(true, chosen, names)
        metrics = {"accuracy": multi["subset_accuracy"], **multi}
        labels = [[names[j] for j in ids] for ids in data.labels]
        predicted: list[Any] = [[names[j] for j in np.flatnonzero(row)] for row in chosen]
    else:
        ids = logits.argmax(-1).tolist()
        metrics = classification_metrics(data.labels, ids, names)
        labels, predicted = [names[j] for j in data.labels], [names[j] for j in ids]
    pairs = data.text_pairs or [None] * len(data)
    metrics["predictions"] = [{"text": t, **({"text_pair": p} if p is not None else {}), "label": y, "prediction": q}
                              for t, p, y, q in zip(data.texts, pairs, labels, predicted)]
    return metrics


def report(metrics: dict[str, Any], out: Path) -> dict[str, object]:
    """Per-class table; the confusion matrix as out/confusion_matrix.png (single-label)."""
    sections: dict[str, object] = {"per class": metrics["per_class"]}
    if "confusion_matrix" in metrics:
        names = list(metrics["per_class"])
        confusion_matrix_png(metrics["confusion_matrix"], names, out / "confusion_matrix.png",
                             title="validation confusion matrix")
        sections["confusion matrix"] = "![confusion matrix](confusion_matrix.png)"
    return sections
