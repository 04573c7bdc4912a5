"""Benchmark fixture files in each dataset's published layout, tiny random-init GPT-2 and
Llama-style model directories in Hugging Face's format, and lm-evaluation-harness runs on
them (fixtures: test modules cannot import conftest under importlib mode)."""

from __future__ import annotations

import json
import os
import random
from importlib import resources
from pathlib import Path

import pytest
import torch
from tokenizers import processors

from lmforge.api import LM
from lmforge.models import GPT, GPTConfig
from lmforge.tokenizer import train_tokenizer

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TEXT = (resources.files("lmforge") / "corpus" / "tinyshakespeare.txt").read_text(encoding="utf-8")
LINES = [s.strip() for s in TEXT.splitlines() if len(s.strip()) > 12]
ACTIVITIES = ["Baking cookies", "Sailing [title] Rigging a small boat", "Playing the lute", "Caf\u00e9 work"]


def _jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def _phrase(rnd: random.Random, words: int) -> str:
    line = rnd.choice(LINES).split()
    return " ".join(line[:words]) if len(line) > words else " ".join(line)


def _hellaswag(rnd: random.Random, n: int, split: str) -> list[dict]:
    out = []
    for i in range(n):
        endings = [_phrase(rnd, rnd.randint(2, 9)) + (" [step] " + _phrase(rnd, 3) if rnd.random() < 0.3 else "")
                   for _ in range(4)]
        ctx_a, ctx_b = _phrase(rnd, 8), _phrase(rnd, 4).lower()
        out.append({"ind": i, "activity_label": rnd.choice(ACTIVITIES), "ctx_a": ctx_a, "ctx_b": ctx_b,
                    "ctx": f"{ctx_a} {ctx_b}", "endings": endings, "source_id": f"wikihow~{i}", "split": split,
                    "split_type": "indomain", "label": rnd.randrange(4)})
    return out


def _arc(rnd: random.Random, n: int) -> tuple[list[dict], list[dict]]:
    """The same questions in AI2's layout and in Hugging Face's ai2_arc layout."""
    ai2, hf = [], []
    for i in range(n):
        k = rnd.choice([3, 4, 4, 5])
        labels = list("ABCDE"[:k]) if i % 3 else [str(j + 1) for j in range(k)]
        texts = [_phrase(rnd, rnd.randint(1, 6)) for _ in range(k)]
        stem, key = _phrase(rnd, 9) + "?", rnd.choice(labels)
        ai2.append({"id": f"Q{i}", "question": {"stem": stem, "choices": [{"text": t, "label": lab}
                                                                          for t, lab in zip(texts, labels)]},
                    "answerKey": key})
        hf.append({"id": f"Q{i}", "question": stem, "choices": {"text": texts, "label": labels}, "answerKey": key})
    return ai2, hf


def _piqa(rnd: random.Random, n: int) -> list[dict]:
    return [{"id": f"p{i}", "goal": _phrase(rnd, 7), "sol1": _phrase(rnd, rnd.randint(3, 10)),
             "sol2": _phrase(rnd, rnd.randint(3, 10)), "label": rnd.randrange(2)} for i in range(n)]


def _winogrande(rnd: random.Random, n: int) -> list[dict]:
    out = []
    for i in range(n):
        head, tail = _phrase(rnd, 6), _phrase(rnd, rnd.randint(2, 7))
        out.append({"qID": f"w{i}", "sentence": f"{head} _ {tail}.", "option1": _phrase(rnd, 2),
                    "option2": _phrase(rnd, 1), "answer": rnd.choice(["1", "2"])})
    return out


def _wikitext_pages(rnd: random.Random, n: int) -> list[list[str]]:
    """Articles as lists of lines in WikiText's raw tokenized style."""
    pages = []
    for i in range(n):
        lines = [f" = {_phrase(rnd, 3)} {i} = ", " "]
        for s in range(rnd.randint(1, 3)):
            if s:
                lines += [f" = = {_phrase(rnd, 2)} = = ", " "]
            words = " ".join(_phrase(rnd, 10) for _ in range(rnd.randint(2, 8)))
            lines += [f" {words} , 1 @,@ 000 @-@ odd ( see \" here \" ) . It 's {rnd.randint(2, 90)} \u00b0 N . ",
                      " "]
        pages.append(lines)
    return pages


def write_benchmark_files(root: Path, n: int = 12, seed: int = 0) -> dict[str, Path]:
    """Every benchmark's files, in its published layout(s), plus the equivalent Hugging Face
    layouts lm-evaluation-harness's task configs read."""
    rnd = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    f = {"hellaswag": _jsonl(root / "hellaswag_val.jsonl", _hellaswag(rnd, n, "val")),
         "hellaswag_train": _jsonl(root / "hellaswag_train.jsonl", _hellaswag(rnd, n, "train"))}
    ai2, hf = _arc(rnd, n)
    f["arc_ai2"], f["arc_hf"] = _jsonl(root / "ARC-Easy-Test.jsonl", ai2), _jsonl(root / "arc_hf.jsonl", hf)
    piqa = _piqa(rnd, n)
    f["piqa_hf"] = _jsonl(root / "piqa_hf.jsonl", piqa)
    f["piqa"] = _jsonl(root / "valid.jsonl", [{k: v for k, v in r.items() if k != "label"} for r in piqa])
    (root / "valid-labels.lst").write_text("".join(f"{r['label']}\n" for r in piqa))
    f["winogrande"] = _jsonl(root / "dev.jsonl", _winogrande(rnd, n))
    f["lambada"] = _jsonl(root / "lambada_test.jsonl",
                          [{"text": " ".join(_phrase(rnd, 9) for _ in range(rnd.randint(1, 4)))} for _ in range(n)])
    pages = _wikitext_pages(rnd, max(3, n // 3))
    raw_lines = [" ", *[line for page in pages for line in page], ""]
    (root / "wiki.test.raw").write_text("\n".join(raw_lines), encoding="utf-8")
    f["wikitext"] = root / "wiki.test.raw"
    truth = ["\n".join(p) for p in pages]
    truth[-1] += "\n"  # the file's final line break stays with the last article
    f["wikitext_pages"] = _jsonl(root / "wikitext_pages.jsonl", [{"page": p} for p in truth])
    return f


@pytest.fixture(scope="session")
def benchmark_files(tmp_path_factory) -> dict[str, Path]:
    return write_benchmark_files(tmp_path_factory.mktemp("benchmarks"))


def make_model_dir(path: Path, family: str, *, max_seq_len: int = 64, dim: int = 32, seed: int = 0) -> Path:
    """A random-init GPT-2 (byte-level BPE) or Llama-style (RMSNorm, RoPE, SwiGLU, grouped-query
    attention; a Unigram tokenizer that prepends <s> as Llama's does) saved in HF format.
    Weights of std 0.3 make predictions far from uniform, so choices differ clearly."""
    texts = TEXT[:60_000].split("\n\n")
    if family == "gpt2":
        tok = train_tokenizer(texts=texts, kind="bpe", vocab_size=500, min_frequency=1)
        arch = {}
    else:
        tok = train_tokenizer(texts=texts, kind="unigram", vocab_size=500)
        tok.backend.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.bos_id)])
        arch = dict(norm="rmsnorm", positions="rope", mlp="swiglu", bias=False, n_kv_heads=1, tie_embeddings=False)
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, max_seq_len=max_seq_len, dim=dim, n_layers=2, n_heads=2,
                          vocab_multiple=8, **arch))
    model.init_weights(std=0.3)
    return LM(model.eval(), tok).save(path, format="hf")


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {family: make_model_dir(root / family, family) for family in ("gpt2", "llama")}
