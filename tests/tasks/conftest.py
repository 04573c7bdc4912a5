"""Small real task data (AG News, WNUT-17) and tiny random-init model directories, shared
by the fine-tuning tests (fixtures: test modules cannot import conftest under importlib mode)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from lmforge.interop.model_dir import save_model_dir
from lmforge.models import BertConfig, GPTConfig, build
from lmforge.tokenizer import train_tokenizer

AG_CLASSES = ["World", "Sports", "Business", "Sci/Tech"]


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


@pytest.fixture
def write_csv():
    return _write_csv


@pytest.fixture
def ag_news(shared_data, tmp_path) -> dict[str, Path]:
    """AG News: 400 train / 200 valid rows as text,label CSVs (label = the class name).
    The rows are the canonical test split's first 600 (classes are shuffled in it)."""
    with open(shared_data / "ag_news" / "test.csv", newline="", encoding="utf-8") as f:
        rows = [[f"{title}. {body}", AG_CLASSES[int(c) - 1]] for c, title, body in csv.reader(f)][:600]
    return {"train": _write_csv(tmp_path / "train.csv", ["text", "label"], rows[:400]),
            "valid": _write_csv(tmp_path / "valid.csv", ["text", "label"], rows[400:]),
            "texts": [r[0] for r in rows[:400]]}


def _make_model(path: Path, texts: list[str], family: str = "bert", *, vocab_size: int = 2000,
                max_seq_len: int = 128, dim: int = 32, n_layers: int = 2, seed: int = 0, fmt: str = "hf") -> Path:
    """Train a tokenizer on `texts`, build a random-init tiny model, save both."""
    kind = "wordpiece" if family == "bert" else "bpe"
    tok = train_tokenizer(texts=texts, kind=kind, vocab_size=vocab_size, lowercase=True)
    torch.manual_seed(seed)
    cls = BertConfig if family == "bert" else GPTConfig
    model = build(cls(vocab_size=tok.vocab_size, max_seq_len=max_seq_len, dim=dim, n_layers=n_layers, n_heads=2))
    return save_model_dir(path, model, tokenizer=tok, format=fmt)


@pytest.fixture
def make_model():
    """make_model(path, texts, family="bert", ...) -> a model directory (HF format by default)."""
    return _make_model


@pytest.fixture
def fast():
    """Options that keep a test run small and quiet."""
    return {"progress": False, "tensorboard": False, "log_every": 1000}
