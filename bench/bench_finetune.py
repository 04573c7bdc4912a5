"""Fine-tuning: `lmforge finetune` (classify, ner) against transformers' Trainer.

Both start from the same small BERT (random init, saved once in Hugging Face format with
a WordPiece tokenizer trained on the benchmark's texts; or a pretrained one with --init DIR),
see the same data (an AG News subset; a WNUT-17 subset), the same hyperparameters (epochs, batch size, lr, linear warmup
then linear decay, weight decay, grad clip 1, max length, seed) and device, and both
evaluate every epoch, save a checkpoint every epoch and keep the best one, as a practitioner
would run them. Scores are computed by the same functions (lmforge.eval.metrics) from
each framework's predictions: accuracy / macro-F1 for AG News; for WNUT-17 entity F1
(seqeval, strict IOB2) of word tags taken at each word's first sub-token, I-X starting an
entity read as B-X. Throughput: training samples / seconds of the training call (its
per-epoch evaluations and checkpoints included, as in the Trainer's train_runtime).

Run:  .venv/bin/python bench/bench_finetune.py [--quick] [--seeds 42 43 44] [--threads N] [--device cpu|cuda]
Needs `accelerate` (transformers' Trainer requires it). Prints a Markdown table with versions,
device, load average and the command. A model trained from random init varies by a few
points from seed to seed (dropout masks, data order), so each framework runs once per seed
and the table gives mean ± std; runs alternate who goes first, and the best throughput of
each is kept, wall-clock and per CPU-second (less sensitive to other processes on the machine).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import (
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    DataCollatorForTokenClassification,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)

import lmforge
from lmforge.data.readers import _to_iob2, read_classification, read_conll
from lmforge.eval.metrics import classification_metrics, ner_metrics
from lmforge.interop.model_dir import save_model_dir
from lmforge.models import BertConfig, HeadSpec, attach_head, build
from lmforge.tasks import finetune
from lmforge.tokenizer import train_tokenizer

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
AG_CLASSES = ["World", "Sports", "Business", "Sci/Tech"]


# ----------------------------------------------------------------------------- data and the starting model


def write_ag_news(root: Path, n_train: int, n_valid: int) -> tuple[Path, Path]:
    with open(DATA / "ag_news" / "test.csv", newline="", encoding="utf-8") as f:
        rows = [[f"{title}. {body}", AG_CLASSES[int(c) - 1]] for c, title, body in csv.reader(f)]
    paths = []
    for name, part in (("train", rows[:n_train]), ("valid", rows[n_train:n_train + n_valid])):
        path = root / f"ag_{name}.csv"
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["text", "label"])
            w.writerows(part)
        paths.append(path)
    return paths[0], paths[1]


def write_wnut(root: Path, n_train: int, n_valid: int) -> tuple[Path, Path]:
    paths = []
    for name, source, n in (("train", "wnut17train.conll", n_train), ("valid", "emerging.dev.conll", n_valid)):
        text = (DATA / "wnut17" / source).read_text(encoding="utf-8")
        blocks = [b.strip("\n") for b in re.split(r"\n\s*\n", text) if b.strip()][:n]
        path = root / f"wnut_{name}.conll"
        path.write_text("\n\n".join(blocks) + "\n", encoding="utf-8")
        paths.append(path)
    return paths[0], paths[1]


def make_bases(root: Path, texts: list[str], labels: dict[str, list[str]], dim: int, layers: int,
               init: Path | None = None) -> dict[str, Path]:
    """One BERT and its WordPiece tokenizer, saved in HF format once per task with that task's
    head already on it (BertForSequenceClassification, BertForTokenClassification): both sides
    start from exactly the same weights, head included. The BERT is a pretrained one from
    `init` (an lmforge or HF model directory with a tokenizer), else a random-init one with a
    cased WordPiece tokenizer trained on the benchmark's texts."""
    if init is not None:
        lm = lmforge.load(init)
        if lm.tokenizer is None or lm.config.__class__ is not BertConfig:
            raise SystemExit(f"{init}: --init needs a BERT model directory with its tokenizer")
        tok, backbone = lm.tokenizer, lm.model
    else:
        tok = train_tokenizer(texts=texts, kind="wordpiece", vocab_size=8000, lowercase=False)
        torch.manual_seed(0)
        backbone = build(BertConfig(vocab_size=tok.vocab_size, max_seq_len=128, dim=dim, n_layers=layers,
                                    n_heads=max(2, dim // 64)))
    bases = {}
    for task, kind in (("classify", "sequence-classification"), ("ner", "token-classification")):
        head = HeadSpec(kind, labels[task])
        torch.manual_seed(1)
        bases[task] = save_model_dir(root / f"base_{task}", attach_head(backbone, head), head=head, tokenizer=tok,
                                     format="hf")
    return bases


# ----------------------------------------------------------------------------- transformers' side


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process, all threads) of fn()."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def hf_args(out: Path, hp: dict, metric: str, steps: int) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(out), num_train_epochs=hp["epochs"], per_device_train_batch_size=hp["batch_size"],
        per_device_eval_batch_size=hp["batch_size"], learning_rate=hp["lr"], weight_decay=hp["weight_decay"],
        warmup_steps=round(hp["warmup"] * steps), lr_scheduler_type="linear", max_grad_norm=1.0, seed=hp["seed"],
        eval_strategy="epoch", save_strategy="epoch", save_total_limit=1, load_best_model_at_end=True,
        metric_for_best_model=metric, greater_is_better=True, logging_strategy="no", report_to="none",
        disable_tqdm=True, use_cpu=hp["device"] == "cpu", dataloader_num_workers=0)


def hf_classify(base: Path, train: Path, valid: Path, out: Path, hp: dict) -> dict:
    tok = AutoTokenizer.from_pretrained(base)
    tr, va = read_classification(train), None
    va = read_classification(valid, label_names=tr.label_names)

    def features(data):
        enc = tok(data.texts, truncation=True, max_length=hp["max_length"], return_token_type_ids=True)
        return [{"input_ids": i, "token_type_ids": t, "attention_mask": m, "labels": y}
                for i, t, m, y in zip(enc["input_ids"], enc["token_type_ids"], enc["attention_mask"], data.labels)]

    transformers.set_seed(hp["seed"])
    model = AutoModelForSequenceClassification.from_pretrained(base)  # the head is in the checkpoint
    assert list(model.config.id2label.values()) == tr.label_names

    def compute(p):
        m = classification_metrics(p.label_ids.tolist(), p.predictions.argmax(-1).tolist(), tr.label_names)
        return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"]}

    steps = hp["epochs"] * -(-len(tr) // hp["batch_size"])
    trainer = Trainer(model=model, args=hf_args(out, hp, "accuracy", steps), train_dataset=features(tr),
                      eval_dataset=features(va), data_collator=DataCollatorWithPadding(tok), compute_metrics=compute)
    seconds, cpu = timed(trainer.train)
    final = trainer.evaluate()
    return {"accuracy": final["eval_accuracy"], "macro_f1": final["eval_macro_f1"],
            "samples": len(tr) * hp["epochs"], "seconds": seconds, "cpu_seconds": cpu}


def hf_ner(base: Path, train: Path, valid: Path, out: Path, hp: dict) -> dict:
    tok = AutoTokenizer.from_pretrained(base)
    tr = read_conll(train)
    va = read_conll(valid, label_names=tr.label_names)
    names = tr.label_names

    def features(data):
        enc = tok(data.tokens, is_split_into_words=True, truncation=True, max_length=hp["max_length"],
                  return_token_type_ids=True)
        rows = []
        for i, tags in enumerate(data.labels):
            words, labels, previous = enc.word_ids(i), [], None
            for w in words:
                labels.append(tags[w] if w is not None and w != previous else -100)
                previous = w
            rows.append({"input_ids": enc["input_ids"][i], "token_type_ids": enc["token_type_ids"][i],
                         "attention_mask": enc["attention_mask"][i], "labels": labels})
        return rows

    valid_features = features(va)

    def word_tags(predictions: np.ndarray) -> list[list[str]]:
        out = []
        for p, f, gold in zip(predictions, valid_features, va.tags):
            tags = ["O"] * len(gold)
            w = 0
            for t, y in enumerate(f["labels"]):
                if y != -100:  # the first sub-token of word w (words in order)
                    tags[w] = names[int(p[t])]
                    w += 1
            out.append(_to_iob2(tags)[0])
        return out

    def compute(p):
        m = ner_metrics(va.tags, word_tags(p.predictions.argmax(-1)))
        return {"f1": m["f1"], "precision": m["precision"], "recall": m["recall"]}

    transformers.set_seed(hp["seed"])
    model = AutoModelForTokenClassification.from_pretrained(base)  # the head is in the checkpoint
    assert list(model.config.id2label.values()) == names
    steps = hp["epochs"] * -(-len(tr) // hp["batch_size"])
    trainer = Trainer(model=model, args=hf_args(out, hp, "f1", steps), train_dataset=features(tr),
                      eval_dataset=valid_features, data_collator=DataCollatorForTokenClassification(tok),
                      compute_metrics=compute)
    seconds, cpu = timed(trainer.train)
    final = trainer.evaluate()
    return {"f1": final["eval_f1"], "precision": final["eval_precision"], "recall": final["eval_recall"],
            "samples": len(tr) * hp["epochs"], "seconds": seconds, "cpu_seconds": cpu}


# ----------------------------------------------------------------------------- lmforge's side


def lmforge_run(task: str, base: Path, train: Path, valid: Path, out: Path, hp: dict, n_train: int) -> dict:
    steps = hp["epochs"] * -(-n_train // hp["batch_size"])
    metrics = finetune(task, base, train, valid, out, epochs=hp["epochs"], batch_size=hp["batch_size"], lr=hp["lr"],
                       weight_decay=hp["weight_decay"], warmup=round(hp["warmup"] * steps),
                       max_length=hp["max_length"], seed=hp["seed"], device=hp["device"], precision="fp32",
                       progress=False, tensorboard=False, log_every=10_000)
    run = metrics["run"]
    keys = ("accuracy", "macro_f1") if task == "classify" else ("f1", "precision", "recall")
    return {**{k: metrics[k] for k in keys}, "samples": run["train_samples"], "seconds": run["train_seconds"],
            "cpu_seconds": run["train_cpu_seconds"]}


# ----------------------------------------------------------------------------- main


TASKS = {"classify": ("accuracy", "macro_f1"), "ner": ("f1", "precision", "recall")}


def _head(path: Path, n: int) -> str:
    """The first n records of a CSV (header kept) or CoNLL file."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".csv":
        return "".join(text.splitlines(keepends=True)[:n + 1])
    return "\n\n".join(text.split("\n\n")[:n]) + "\n"


def summary(runs: list[dict], task: str) -> dict:
    """Mean and standard deviation of each score over the seeds, and the best throughput over
    all runs (other processes on a shared machine can only slow a run down)."""
    out = {"samples_per_s": max(r["samples"] / r["seconds"] for r in runs),
           "samples_per_cpu_s": max(r["samples"] / r["cpu_seconds"] for r in runs)}
    for metric in TASKS[task]:
        values = np.array([r[metric] for r in runs])
        out[metric], out[f"{metric}_std"] = float(values.mean()), float(values.std())
    return out


def table(rows, sizes, hp, a, loads) -> None:
    device = a.device if a.device != "cpu" else f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"
    start = f"BERT pretrained in {a.init}" if a.init else f"BERT dim {a.dim}, {a.layers} layers, random init"
    print(f"\nFine-tuning, lmforge vs transformers Trainer: {start}, "
          f"same weights (head included); batch {hp['batch_size']}, warmup 10%, linear decay, max length 128, "
          f"weight decay 0.01; seeds {', '.join(map(str, a.seeds))} (scores: mean ± std over seeds; "
          "throughput: best run); "
          f"device {device}, load average {loads[0]:.1f} -> {loads[1]:.1f}; lmforge {lmforge.__version__}, "
          f"transformers {transformers.__version__}, torch {torch.__version__}, "
          f"Python {platform.python_version()}\n")
    print("| task (data, epochs, lr) | metric | lmforge | transformers | samples/s lmforge | transformers | ratio "
          "| samples/CPU-s lmforge | transformers | ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for task, ours, theirs in rows:
        n = sizes["ag" if task == "classify" else "wnut"]
        data = f"{'AG News' if task == 'classify' else 'WNUT-17'} {n[0]}/{n[1]}, {a.epochs[task]} ep, lr {a.lr[task]:g}"
        for metric in TASKS[task]:
            speed = " | | | | | "
            if metric == TASKS[task][0]:
                speed = " | ".join(f"{ours[k]:.1f} | {theirs[k]:.1f} | {ours[k] / theirs[k]:.2f}x"
                                   for k in ("samples_per_s", "samples_per_cpu_s"))
            cells = " | ".join(f"{100 * r[metric]:.2f} ± {100 * r[metric + '_std']:.2f}" for r in (ours, theirs))
            print(f"| {task} ({data}) | {metric} | {cells} | {speed} |")
    print(f"\ncommand: {' '.join([Path(sys.executable).name, *sys.argv])}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--epochs-classify", type=int, default=3)
    p.add_argument("--epochs-ner", type=int, default=5)
    p.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44], help="one run per seed and framework")
    p.add_argument("--lr-classify", type=float, default=5e-4)
    p.add_argument("--lr-ner", type=float, default=2e-3)
    p.add_argument("--init", type=Path, default=None,
                   help="start both sides from this pretrained BERT (model directory with a tokenizer) "
                        "instead of a random-init one")
    p.add_argument("--tasks", nargs="+", default=["classify", "ner"], choices=["classify", "ner"])
    p.add_argument("--ag", type=int, nargs=2, default=[1500, 500], metavar=("TRAIN", "VALID"),
                   help="AG News rows for training and validation (7,600 in all)")
    p.add_argument("--wnut", type=int, nargs=2, default=[1500, 500], metavar=("TRAIN", "VALID"),
                   help="WNUT-17 sentences for training and validation (3,394 / 1,009 in all)")
    a = p.parse_args()
    a.lr = {"classify": a.lr_classify, "ner": a.lr_ner}
    if a.threads:
        torch.set_num_threads(a.threads)
    sizes = {"ag": (300, 100), "wnut": (300, 100)} if a.quick else {"ag": tuple(a.ag), "wnut": tuple(a.wnut)}
    a.epochs = {"classify": 1 if a.quick else a.epochs_classify, "ner": 1 if a.quick else a.epochs_ner}
    hp = {"batch_size": 16, "warmup": 0.1, "weight_decay": 0.01, "device": a.device, "max_length": 128}
    loads, rows = [os.getloadavg()[0]], []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ag_train, ag_valid = write_ag_news(root, *sizes["ag"])
        wn_train, wn_valid = write_wnut(root, *sizes["wnut"])
        texts = read_classification(ag_train).texts + [" ".join(t) for t in read_conll(wn_train).tokens]
        labels = {"classify": read_classification(ag_train).label_names, "ner": read_conll(wn_train).label_names}
        bases = make_bases(root, texts, labels, a.dim, a.layers, a.init)
        for task, train, valid, n in (("classify", ag_train, ag_valid, sizes["ag"][0]),
                                      ("ner", wn_train, wn_valid, sizes["wnut"][0])):
            if task not in a.tasks:
                continue
            runs: dict[str, list[dict]] = {"lmforge": [], "transformers": []}
            hf_run = hf_classify if task == "classify" else hf_ner
            # Untimed warm-up of both (first imports, allocator, thread pools) on a slice of the data.
            small = {**hp, "lr": a.lr[task], "seed": 0, "epochs": 1}
            head_train = root / f"head_{train.name}"
            head_train.write_text(_head(train, 64), encoding="utf-8")
            lmforge_run(task, bases[task], head_train, valid, root / f"warm_lmforge_{task}", small, 64)
            hf_run(bases[task], head_train, valid, root / f"warm_hf_{task}", small)
            for r, seed in enumerate(a.seeds):
                h = {**hp, "lr": a.lr[task], "seed": seed, "epochs": a.epochs[task]}
                order = ("lmforge", "transformers") if r % 2 == 0 else ("transformers", "lmforge")
                for who in order:  # alternate who runs first: a slow period hurts both alike
                    out = root / f"{who}_{task}_{seed}"
                    if who == "lmforge":
                        runs[who].append(lmforge_run(task, bases[task], train, valid, out, h, n))
                    else:
                        runs[who].append(hf_run(bases[task], train, valid, out, h))
                    print(json.dumps({"task": task, "seed": seed, who: runs[who][-1]}), file=sys.stderr)
            rows.append((task, summary(runs["lmforge"], task), summary(runs["transformers"], task)))
    loads.append(os.getloadavg()[0])
    table(rows, sizes, hp, a, loads)


if __name__ == "__main__":
    main()
