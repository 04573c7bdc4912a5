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
                max_seq_len: int = 128, dim: int = 32, n_layers: int = 2, seed: int = 0, fmt: str = "hf",
                cased: bool = False) -> Path:
    """Train a tokenizer on `texts`, build a random-init tiny model, save both."""
    kind = "wordpiece" if family == "bert" else "bpe"
    tok = train_tokenizer(texts=texts, kind=kind, vocab_size=vocab_size, lowercase=not cased, min_frequency=1)
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


# ----------------------------------------------------------------------------- a small SQuAD-format set

_FIRST = ["Anna", "Boris", "Clara", "David", "Elena", "Felix", "Greta", "Hugo", "Irene", "Jonas", "Karin", "Louis",
          "Maria", "Nils", "Olga", "Pavel", "Rosa", "Simon", "Tanja", "Viktor"]
_LAST = ["Adler", "Berg", "Castell", "Dorn", "Engel", "Falk", "Grimm", "Hahn", "Iversen", "Jung", "Keller", "Lang",
         "Moser", "Noack", "Ott", "Pohl", "Roth", "Stein", "Vogt", "Wolf"]
_CITIES = ["Lisbon", "Oslo", "Krakow", "Dublin", "Porto", "Vienna", "Zurich", "Riga", "Tallinn", "Bergen", "Lyon",
           "Turin", "Ghent", "Graz", "Malmo", "Brno"]
_COMPANIES = ["Nordwind", "Silverline", "Bluepeak", "Redstone", "Greenfield", "Ironbridge", "Sunvale", "Clearwater",
              "Highmoor", "Lakeshore"]
_THINGS = ["bicycles", "telescopes", "violins", "lanterns", "sailboats", "clocks", "printers", "kites"]
_YEARS = [str(y) for y in range(1901, 1999)]
# (sentence, question, answer key): each fact type asks for one slot of its sentence.
_FACTS = [
    ("{person} was born in {city}.", "Where was {person} born?", "city"),
    ("{company} was founded by {person}.", "Who founded {company}?", "person"),
    ("In {year}, {person} moved to {city}.", "When did {person} move to {city}?", "year"),
    ("{company} makes {thing} in a small workshop.", "What does {company} make?", "thing"),
]


def _fact(rng, kind: int) -> tuple[str, str, str]:
    slots = {"person": f"{rng.choice(_FIRST)} {rng.choice(_LAST)}", "city": rng.choice(_CITIES),
             "company": rng.choice(_COMPANIES), "thing": rng.choice(_THINGS), "year": rng.choice(_YEARS)}
    sentence, question, key = _FACTS[kind]
    return sentence.format(**slots), question.format(**slots), slots[key]


def squad_json(n: int, seed: int, *, v2: bool = False, facts: int = 4) -> dict:
    """n questions, each about one of `facts` sentences of its own context, in random order,
    so that the answer sentence is anywhere. v2: every 4th question asks about a fact whose
    sentence was left out (is_impossible)."""
    import random

    rng = random.Random(seed)
    paragraphs = []
    for q in range(n):
        kinds = rng.sample(range(len(_FACTS)), facts)
        made = [_fact(rng, k) for k in kinds]
        impossible = v2 and q % 4 == 3
        asked = made[0]
        shown = made[1:] if impossible else made
        rng.shuffle(shown)
        context = " ".join(s for s, _, _ in shown)
        entry = {"id": f"q{seed}-{q}", "question": asked[1],
                 "answers": [] if impossible else [{"text": asked[2], "answer_start": context.index(asked[0])
                                                    + asked[0].index(asked[2])}]}
        if v2:
            entry["is_impossible"] = impossible
        paragraphs.append({"context": context, "qas": [entry]})
    return {"version": "v2.0" if v2 else "1.1", "data": [{"title": "facts", "paragraphs": paragraphs}]}


@pytest.fixture
def make_squad():
    """make_squad(path, n, seed, v2=False) -> a SQuAD JSON file of generated facts."""
    import json

    def make(path: Path, n: int, seed: int, **kw) -> Path:
        path.write_text(json.dumps(squad_json(n, seed, **kw)))
        return path
    return make
