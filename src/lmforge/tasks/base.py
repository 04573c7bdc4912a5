"""What every fine-tuning task shares: its options (FinetuneConfig), the interface a task
implements (Task -> Setup), the starting model (Base), batches over in-memory features,
and a few helpers for tokenizing with truncation.

The driver that uses all of this is lmforge.tasks.driver; its docstring describes the
task interface from a task author's side.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol

import numpy as np
import tokenizers
import torch
from torch import Tensor, nn

from lmforge.data.batching import with_index
from lmforge.data.loaders import same_position
from lmforge.interop.model_dir import LoadedModel, check_vocab, load_model
from lmforge.models import HeadSpec, attach_head
from lmforge.tokenizer import Tokenizer
from lmforge.train.objectives import ObjectiveOutput

log = logging.getLogger("lmforge.tasks")

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
SAVE_FORMATS = ("auto", "hf", "lmforge")


def _check(ok: bool, name: str, message: str, value: Any) -> None:
    if not ok:
        raise ValueError(f"{name} {message}, got {value!r}")


@dataclass
class FinetuneConfig:
    """Options of `lmforge finetune TASK` shared by every task (EVALUATE_FIELDS: the ones
    `lmforge evaluate TASK` uses); each task's own options are its `options_type`'s fields,
    held in `options`.

    Args:
        epochs: passes over the training data.
        batch_size: examples (QA: features) per optimizer micro-step, per process.
        lr: peak learning rate (AdamW), reached at the end of warmup, then linear decay to 0.
        warmup: warmup length: a fraction of all optimizer steps when < 1, else a number of steps.
        weight_decay: AdamW decoupled weight decay of matrices and embeddings.
        max_length: tokens per input; None: the task's default (classify/ner 128, qa 384). Longer
            inputs are truncated and counted in the log.
        seed: seed of head initialisation, data order and dropout.
        grad_accum: micro-batches per optimizer step.
        precision: fp32, bf16, fp16 or auto (bf16 on a GPU that supports it, else fp32).
        quantize: `lmforge evaluate` only: none, int8 or int4 weight-only linear layers (as
            lmforge.load(quantize=)), to measure what quantisation costs a fine-tuned model.
        device: auto, cpu, cuda or cuda:N.
        tokenizer: tokenizer directory or file; None: the one in the model directory.
        columns: rename the data's columns first, OLD=NEW separated by commas (e.g.
            sentence=text,coarse_label=label; words=tokens,tags=ner_tags for ner): for Parquet
            files, datasets save_to_disk directories and Hub ids (ID:SPLIT), and CSV/JSONL columns.
        freeze_backbone: train only the head.
        train_last_layers: train only the last K Transformer blocks (and what follows them: final
            norm, pooler) plus the head; embeddings and earlier blocks stay frozen.
        lora_rank: > 0: LoRA adapters of this rank on lora_targets; the backbone is frozen.
        lora_alpha: LoRA scale numerator (the update is scaled by alpha / rank).
        lora_dropout: dropout on the adapters' input.
        lora_targets: module names to adapt (wqkv, wo, wq, wkv, up, down, gate).
        merge_lora: LoRA runs write the adapter to out/adapter (PEFT's format) and, with this, the
            model with the adapter merged into its weights to out/model; False: out/adapter only.
        eval_every: evaluate every this many optimizer steps; 0: once per epoch.
        early_stopping_metric: validation metric for early stopping and the best model (e.g.
            accuracy, macro_f1, f1, exact_match, loss); None: the task's main metric.
        patience: stop after this many evaluations without improvement; None: never stop early.
        keep_best: export the weights of the best evaluation, not the last.
        skip_bad: skip (and count) malformed records instead of stopping at the first.
        save_format: model/ format: hf (transformers loads it), lmforge, or auto (hf where
            transformers has the class, else lmforge).
        keep_checkpoints: keep out/checkpoints (for resuming or inspection) after a finished run.
        resume: auto (continue from out/checkpoints when present), none, or a checkpoint directory.
        log_every: log the training loss every this many steps.
        progress: show progress bars.
        tensorboard: write TensorBoard events to out/tb.
        compile: torch.compile each Transformer block.
        strategy: under torchrun: ddp (each process holds the whole model) or fsdp (FSDP2: parameters,
            gradients and AdamW state sharded per block); ignored in a single process.
        options: the task's own options: a dict of its options_type's fields, or that dataclass.
    """

    epochs: int = 3
    batch_size: int = 16
    lr: float = 5e-5
    warmup: float = 0.1
    weight_decay: float = 0.01
    max_length: int | None = None
    seed: int = 42
    grad_accum: int = 1
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    quantize: Literal["none", "int8", "int4"] = "none"
    device: str = "auto"
    tokenizer: str | None = None
    columns: str | None = None
    freeze_backbone: bool = False
    train_last_layers: int | None = None
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: ["wqkv", "wo"])
    merge_lora: bool = True
    eval_every: int = 0
    early_stopping_metric: str | None = None
    patience: int | None = None
    keep_best: bool = True
    skip_bad: bool = False
    save_format: Literal["auto", "hf", "lmforge"] = "auto"
    keep_checkpoints: bool = False
    resume: str = "auto"
    log_every: int = 10
    progress: bool = True
    tensorboard: bool = True
    compile: bool = False
    strategy: Literal["ddp", "fsdp"] = "ddp"
    options: Any = field(default_factory=dict)

    # The fields that mean something when only evaluating (lmforge evaluate TASK).
    EVALUATE_FIELDS: ClassVar[tuple[str, ...]] = ("batch_size", "max_length", "precision", "quantize", "device",
                                                  "tokenizer",
                                                  "skip_bad", "progress")

    def __post_init__(self) -> None:
        if isinstance(self.lora_targets, str):
            self.lora_targets = [t.strip() for t in self.lora_targets.split(",") if t.strip()]
        _check(self.epochs >= 1, "epochs", "must be >= 1", self.epochs)
        _check(self.batch_size >= 1, "batch_size", "must be >= 1", self.batch_size)
        _check(self.lr > 0, "lr", "must be positive", self.lr)
        _check(self.warmup >= 0 and (self.warmup < 1 or float(self.warmup).is_integer()), "warmup",
               "must be a fraction in [0, 1) or a whole number of steps", self.warmup)
        _check(self.weight_decay >= 0, "weight_decay", "must be >= 0", self.weight_decay)
        _check(self.max_length is None or self.max_length >= 8, "max_length", "must be >= 8", self.max_length)
        _check(self.grad_accum >= 1, "grad_accum", "must be >= 1", self.grad_accum)
        _check(self.precision in PRECISIONS, "precision", f"must be one of {PRECISIONS}", self.precision)
        _check(self.quantize in ("none", "int8", "int4"), "quantize", "must be none, int8 or int4", self.quantize)
        _check(self.train_last_layers is None or self.train_last_layers >= 0, "train_last_layers", "must be >= 0",
               self.train_last_layers)
        _check(self.lora_rank >= 0, "lora_rank", "must be >= 0", self.lora_rank)
        _check(0.0 <= self.lora_dropout < 1.0, "lora_dropout", "must be in [0, 1)", self.lora_dropout)
        scopes = [self.freeze_backbone, self.train_last_layers is not None, self.lora_rank > 0]
        _check(sum(scopes) <= 1, "freeze_backbone", "train_last_layers and lora_rank exclude each other",
               {"freeze_backbone": self.freeze_backbone, "train_last_layers": self.train_last_layers,
                "lora_rank": self.lora_rank})
        _check(self.eval_every >= 0, "eval_every", "must be >= 0", self.eval_every)
        _check(self.patience is None or self.patience >= 1, "patience", "must be >= 1", self.patience)
        _check(self.save_format in SAVE_FORMATS, "save_format", f"must be one of {SAVE_FORMATS}", self.save_format)
        _check(self.log_every >= 1, "log_every", "must be >= 1", self.log_every)
        _check(bool(self.resume), "resume", "must be auto, none or a checkpoint directory", self.resume)
        _check(self.strategy in ("ddp", "fsdp"), "strategy", "must be ddp or fsdp", self.strategy)

    def to_dict(self) -> dict[str, Any]:
        opts = self.options
        return {**{f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "options"},
                "options": dataclasses.asdict(opts) if dataclasses.is_dataclass(opts) else dict(opts or {})}


@dataclass
class LabelOptions:
    """The label options of the tasks that classify (classify, ner).

    Args:
        labels: the label set (classify: the classes; ner: the entity types), names separated by
            commas or "@FILE" with one per line. A label outside it anywhere in the data is an error
            naming the file and line; None: the labels the training data has (a label seen there
            only rarely is warned about, by name and count).
        class_weights: "balanced" (n / (classes * count), scikit-learn's rule), a list of one
            weight per label in label order, or None. The loss of each example (token) is
            multiplied by its class's weight; multi-label: BCE pos_weight ("balanced": negatives / positives).
    """

    labels: str | list[str] | None = None
    class_weights: str | list[float] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.class_weights, str) and self.class_weights != "balanced":
            try:
                self.class_weights = [float(w) for w in self.class_weights.split(",")]
            except ValueError:
                raise ValueError(f"class_weights must be 'balanced' or numbers separated by commas, "
                                 f"got {self.class_weights!r}") from None


def column(value: str | int | None) -> str | int | None:
    """A column given as text on a command line: "0" means the first column of a header-less file."""
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return value


def task_options(task: Task, config: FinetuneConfig) -> Any:
    """The task's options dataclass from FinetuneConfig.options (an instance already, or a dict
    of its fields over the task's option_defaults); an unknown name is an error listing the
    known ones."""
    cls, given = task.options_type, config.options or {}
    if cls is None:
        if given:
            raise ValueError(f"task {task.name} has no options of its own, got {', '.join(sorted(given))}")
        return None
    if isinstance(given, cls):
        return given
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(given) - known)
    if unknown:
        raise ValueError(f"unknown option(s) for task {task.name}: {', '.join(unknown)}; "
                         f"known: {', '.join(sorted(known))}")
    return cls(**{**getattr(task, "option_defaults", {}), **given})


# ----------------------------------------------------------------------------- label sets


def declared_labels(labels: str | list[str] | None) -> list[str] | None:
    """FinetuneConfig.labels as a list: "a,b,c", "@FILE" (one label per line), or a list."""
    if labels is None or isinstance(labels, list):
        return labels
    if labels.startswith("@"):
        path = Path(labels[1:])
        if not path.is_file():
            raise FileNotFoundError(f"labels: {path}: no such file")
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        names = [name.strip() for name in labels.split(",") if name.strip()]
    if not names or len(set(names)) != len(names):
        raise ValueError(f"labels must name each label once, got {labels!r}")
    return names


def rare_labels(counts: dict[str, int], *, factor: float = 0.05) -> dict[str, int]:
    """Labels seen far less often than the typical one: count < max(2, factor x the median
    count). One mistyped label among thousands of examples is exactly such a label."""
    typical = float(np.median(list(counts.values()))) if counts else 0.0
    return {name: n for name, n in counts.items() if n < max(2.0, factor * typical)}


def warn_rare_labels(path: Path, what: str, counts: dict[str, int], notes: list[str]) -> None:
    """Warn by name and count about rare training labels (a typo adds a class silently otherwise)."""
    rare = rare_labels(counts)
    if rare and len(rare) < len(counts):
        shown = ", ".join(f"{name!r} ({n}x)" for name, n in sorted(rare.items(), key=lambda x: x[1]))
        line = (f"{path}: rare {what}: {shown}, against a median of {int(np.median(list(counts.values())))} per "
                f"{what.rstrip('s')}; a typo? declare the label set with --labels to make unknown labels an error")
        log.warning(line)
        notes.append(line)


# ----------------------------------------------------------------------------- the starting model


# The checkpoint a task starts from (or evaluates): what lmforge.load gives, below the api layer.
Base = LoadedModel


def load_base(path: str | os.PathLike, tokenizer: str | os.PathLike | None = None) -> Base:
    """Load a model directory (lmforge or Hugging Face) and its tokenizer, and check they fit."""
    base = load_model(path)
    path, model, head, tok, special = base.path, base.model, base.head, base.tokenizer, base.special
    if tokenizer is not None:
        tok = Tokenizer.from_pretrained(tokenizer)
    if tok is None:
        raise ValueError(f"{path}: no tokenizer in the model directory (tokenizer.json, vocab.json + merges.txt or "
                         "vocab.txt); pass tokenizer=DIR (--tokenizer)")
    if tokenizer is not None:  # the model directory's own was checked on load
        check_vocab(tok, model.backbone if head is not None else model, Path(tokenizer))
    if special.get("pad_token_id") is None and tok.pad_id is None and tok.eos_id is not None:
        special["pad_token_id"] = tok.eos_id  # exported GPT-2 classifiers find the last token by it
    return dataclasses.replace(base, tokenizer=tok, special=special)


def model_with_head(base: Base, spec: HeadSpec) -> nn.Module:
    """The base model when it already carries this very head (continued fine-tuning), else a
    freshly initialised head of `spec` on the base's backbone."""
    if base.head == spec:
        return base.model
    if base.head is not None:
        log.warning("%s: replacing its %s head (labels %s) with a new %s head", base.path, base.head.kind,
                    base.head.labels, spec.kind)
    return attach_head(base.backbone, spec)


def require_head(base: Base, kind: str) -> HeadSpec:
    """The base's head for evaluation; ValueError when it has none of this kind."""
    if base.head is None or base.head.kind != kind:
        has = "no task head" if base.head is None else f"a {base.head.kind} head"
        raise ValueError(f"{base.path}: the model has {has}, not a {kind} head; fine-tune it first "
                         "(lmforge finetune)")
    return base.head


# ----------------------------------------------------------------------------- the task interface


Outputs = dict[int, Any]  # feature position -> what Setup.step returned for it (CPU tensors)


@dataclass
class Setup:
    """What a task hands the driver for one run (see lmforge.tasks.driver).

    model: the model to train or evaluate, head attached (its backbone is the base's).
    head: the HeadSpec saved with the model (None for tasks without a head, e.g. seq2seq).
    train, valid: features, one dict per item the model sees (a QA window, a sentence, ...);
        train is [] when only evaluating.
    collate: a list of features -> a batch dict of CPU tensors (padded).
    step: (model, batch on the device) -> (ObjectiveOutput with the summed loss, per-item
        outputs (B, ...) as a tensor or a tuple of tensors, or None). The driver keeps the
        outputs of validation batches and hands them to `score`.
    score: (model, {feature position: its outputs}) -> metrics: flat numbers under the
        task's metric names, plus any nested detail (per-class tables, ...).
    report: (metrics, out directory) -> report.md sections (may write pictures there).
    notes: lines for report.md (truncation counts, skipped records, ...).
    """

    model: nn.Module
    head: HeadSpec | None
    train: list[dict[str, Any]]
    valid: list[dict[str, Any]]
    collate: Callable[[list[dict[str, Any]]], dict[str, Tensor]]
    step: Callable[[nn.Module, dict[str, Tensor]], tuple[ObjectiveOutput, Any]]
    score: Callable[[nn.Module, Outputs], dict[str, Any]]
    report: Callable[[dict[str, Any], Path], dict[str, object]] | None = None
    notes: list[str] = field(default_factory=list)


class Task(Protocol):
    """A fine-tuning task, registered by name in lmforge.tasks.TASKS.

    name: the command-line name; metric: the main validation metric (early stopping and the
    best model by default); metrics: every scalar metric `score` returns (all higher is
    better); max_length: default FinetuneConfig.max_length; options_type: the dataclass of
    the task's own options (FinetuneConfig.options; the CLI shows its fields as flags), or
    None; evaluate_only: the task only evaluates (e.g. perplexity).
    """

    name: str
    metric: str
    metrics: tuple[str, ...]
    max_length: int
    options_type: type | None
    evaluate_only: bool

    def setup(self, base: Base, config: FinetuneConfig, train: Path | None, valid: Path) -> Setup:
        """Read and tokenize the data, attach (or check) the head. train=None: evaluation
        only, the head must already be there and fit the data."""
        ...


TASKS: dict[str, Task] = {}


def register(task: Task) -> Task:
    """Make `task` available by its name (lmforge finetune NAME)."""
    TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name]


# ----------------------------------------------------------------------------- batches


class ExampleBatches:
    """Batches over in-memory features for `epochs` epochs, reshuffled every epoch: the
    loop's BatchIterator (exact state_dict / load_state_dict).

    Epoch e's order is a permutation drawn from (seed, e) alone, so the position (epoch,
    items of its order consumed by all processes together) is the whole state, whatever the
    number of processes. Under torchrun each process takes every world_size-th item of each
    global batch of batch_size * world_size; a last global batch too small to give every
    process an item is dropped there. `items` counts the features this process yielded (for
    samples/s).
    """

    def __init__(self, features: Sequence[dict[str, Any]], collate: Callable[[list[dict]], dict[str, Tensor]],
                 batch_size: int, *, epochs: int = 1, shuffle: bool = True, seed: int = 0, rank: int = 0,
                 world_size: int = 1) -> None:
        if not features:
            raise ValueError("no training examples")
        self.features, self.collate, self.batch_size = features, collate, batch_size
        self.epochs, self.shuffle, self.seed = epochs, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = self.offset = self.items = 0
        self._order: np.ndarray | None = None

    @property
    def batches_per_epoch(self) -> int:
        n, g = len(self.features), self.batch_size * self.world_size
        full, rest = divmod(n, g)
        return full + (1 if rest >= self.world_size else 0)

    def _epoch_order(self) -> np.ndarray:
        n = len(self.features)
        return np.random.default_rng([self.seed, self.epoch]).permutation(n) if self.shuffle else np.arange(n)

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        return self

    def __next__(self) -> dict[str, Tensor]:
        g = self.batch_size * self.world_size
        if len(self.features) - self.offset < self.world_size:  # the epoch is over
            self.epoch, self.offset, self._order = self.epoch + 1, 0, None
        if self.epoch >= self.epochs:
            raise StopIteration
        if self._order is None:
            self._order = self._epoch_order()
        chunk = self._order[self.offset:self.offset + g]
        mine = [int(i) for i in chunk[self.rank::self.world_size]]
        self.offset += g
        self.items += len(mine)
        return with_index(self.collate([self.features[i] for i in mine]), mine)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "offset": self.offset, "seed": self.seed, "n": len(self.features),
                "global_batch": self.batch_size * self.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "offset" not in state:  # written before positions were global: batches of this batch size
            state = {**state, "offset": state["batch"] * state["batch_size"] * self.world_size}
        mine = {"seed": self.seed, "n": len(self.features)}
        for key, value in mine.items():
            if state.get(key) != value:
                raise ValueError(f"cannot resume: the checkpoint's data has {key}={state.get(key)!r}, this run "
                                 f"{value!r} (resuming needs the same data and options, or resume=none)")
        self.epoch, self.offset, self._order = state["epoch"], state["offset"], None

    def load_state_dicts(self, states: list[dict[str, Any]]) -> None:
        """Continue where a run of len(states) processes stopped (the position is global)."""
        self.load_state_dict(same_position(states, "offset", "ExampleBatches"))


def eval_batches(features: Sequence[dict[str, Any]], collate: Callable[[list[dict]], dict[str, Tensor]],
                 batch_size: int, length: Callable[[dict], int] = lambda f: len(f["input_ids"])) -> list[dict]:
    """Validation batches, built once: features sorted by length so that each batch pads little
    (outputs are matched back by index, so the order does not matter)."""
    order = sorted(range(len(features)), key=lambda i: length(features[i]))
    return [with_index(collate([features[i] for i in order[s:s + batch_size]]), order[s:s + batch_size])
            for s in range(0, len(order), batch_size)]


# ----------------------------------------------------------------------------- tokenizing


def truncating(tokenizer: Tokenizer, max_length: int, *, stride: int = 0,
               strategy: str = "longest_first") -> tokenizers.Tokenizer:
    """A copy of the tokenizer's pipeline that truncates to max_length tokens (special tokens
    included); the user's tokenizer keeps its settings. Cut-off parts land in `overflowing`."""
    backend = tokenizers.Tokenizer.from_str(tokenizer.backend.to_str())
    backend.no_padding()
    backend.enable_truncation(max_length, stride=stride, strategy=strategy)
    return backend


def log_truncation(what: str, truncated: int, total: int, max_length: int, notes: list[str]) -> None:
    """Say how many inputs were cut (never silently)."""
    if truncated:
        line = f"{what}: truncated {truncated} of {total} examples to {max_length} tokens"
        log.warning(line)
        notes.append(line)


def class_weight_vector(weights: str | Sequence[float] | None, counts: np.ndarray, names: Sequence[str],
                        positives_of: int | None = None) -> Tensor | None:
    """FinetuneConfig.class_weights -> one weight per label (float32), or None.

    counts: examples (tokens) per label in the training data. "balanced": n / (K * count)
    (scikit-learn); for multi-label (positives_of = number of examples) negatives / positives,
    BCE's pos_weight. A label absent from the training data gets weight 1.
    """
    if weights is None:
        return None
    k = len(names)
    if isinstance(weights, str):
        if weights != "balanced":
            raise ValueError(f"class_weights must be 'balanced' or a list of numbers, got {weights!r}")
        counts = np.asarray(counts, dtype=np.float64)
        if positives_of is not None:
            w = np.where(counts > 0, (positives_of - counts) / np.maximum(counts, 1), 1.0)
        else:
            w = np.where(counts > 0, counts.sum() / (k * np.maximum(counts, 1)), 1.0)
        return torch.tensor(w, dtype=torch.float32)
    weights = [float(w) for w in weights]
    if len(weights) != k:
        raise ValueError(f"class_weights has {len(weights)} numbers but there are {k} labels ({', '.join(names)})")
    if any(not math.isfinite(w) or w < 0 for w in weights):
        raise ValueError(f"class_weights must be finite and >= 0, got {weights}")
    return torch.tensor(weights, dtype=torch.float32)


def count_of(n: int, device: torch.device) -> Tensor:
    """A () int64 count on the device, made there (no host-to-device copy)."""
    return torch.full((), n, dtype=torch.int64, device=device)


class OnDevice:
    """A small constant tensor (class weights) for a step function, copied to each device once."""

    def __init__(self, value: Tensor | None) -> None:
        self.value: Tensor | None = value
        self.copies: dict[torch.device, Tensor] = {}

    def on(self, device: torch.device) -> Tensor | None:
        if self.value is None:
            return None
        if device not in self.copies:
            self.copies[device] = self.value.to(device)
        return self.copies[device]
