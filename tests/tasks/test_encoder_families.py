"""classify, ner and qa on a RoBERTa and a DistilBERT that transformers saved (random init,
tokenizers trained on the task text): a short run on real data (AG News, WNUT-17; QA on the
generated SQuAD-format set), and the exported model, read by transformers' Auto classes with
the tokenizer AutoTokenizer reads, gives lmforge's logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers as hf
from torch.testing import assert_close

from lmforge.cli import main
from lmforge.data.readers import read_squad
from lmforge.interop.model_dir import load_model_dir
from lmforge.tasks import finetune

hf.logging.set_verbosity_error()
def _wnut(shared_data: Path, tmp_path: Path, n: int) -> tuple[Path, list[str]]:
    """The first n sentences of WNUT-17's training file (as it is: its blank lines hold a tab),
    and their texts."""
    lines = (shared_data / "wnut17" / "wnut17train.conll").read_text(encoding="utf-8").splitlines(keepends=True)
    sentences, current = [], []
    for line in lines:
        current.append(line)
        if not line.strip():
            sentences.append(current)
            current = []
            if len(sentences) == n:
                break
    path = tmp_path / "wnut.conll"
    path.write_text("".join(line for s in sentences for line in s), encoding="utf-8")
    return path, [" ".join(line.split("\t")[0] for line in s if line.strip()) for s in sentences]


def _same_logits_in_transformers(model_dir: Path, auto_class, texts, pairs=None) -> None:
    """transformers' AutoTokenizer + Auto class on the export against lmforge on the same ids."""
    tok = hf.AutoTokenizer.from_pretrained(model_dir)
    theirs = auto_class.from_pretrained(model_dir).eval()
    enc = tok(texts, pairs, padding=True, return_tensors="pt")
    assert set(enc) == {"input_ids", "attention_mask"}  # neither family takes token types
    ours, head, lm_tok, _ = load_model_dir(model_dir)
    first = enc["input_ids"][0][enc["attention_mask"][0] == 1].tolist()
    assert lm_tok.encode(texts[0], pairs[0] if pairs else None) == first
    with torch.no_grad():
        out = theirs(**enc)
        got = ours.eval()(enc["input_ids"], enc["attention_mask"])
    keep = enc["attention_mask"].bool()
    if isinstance(got, tuple):  # QA: start and end logits at real positions
        assert_close(got[0][keep], out.start_logits[keep], atol=1e-4, rtol=1e-4)
        assert_close(got[1][keep], out.end_logits[keep], atol=1e-4, rtol=1e-4)
    elif got.dim() == 3:  # NER
        assert_close(got[keep], out.logits[keep], atol=1e-4, rtol=1e-4)
    else:
        assert_close(got, out.logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["roberta", "distilbert"])
def test_classify(family, ag_news, hf_encoder_dir, fast, tmp_path):
    base = hf_encoder_dir(tmp_path / "base", family, ag_news["texts"])
    out = tmp_path / "run"
    metrics = finetune("classify", base, ag_news["train"], ag_news["valid"], out, epochs=1, lr=1e-3, batch_size=32,
                       max_length=48, **fast)
    assert 0 <= metrics["accuracy"] <= 1
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["architectures"] == [{"roberta": "RobertaForSequenceClassification",
                                        "distilbert": "DistilBertForSequenceClassification"}[family]]
    _, head, _, _ = load_model_dir(out / "model")
    assert (head.pooling, head.hidden) == ("cls", "tanh" if family == "roberta" else "relu")
    texts = ["Stocks fell sharply on Wall Street today.", "The team won the final match.", "New chip is fast"]
    _same_logits_in_transformers(out / "model", hf.AutoModelForSequenceClassification, texts)


def test_classify_text_pairs_on_roberta(ag_news, hf_encoder_dir, write_csv, fast, tmp_path):
    """Pairs as RoBERTa writes them (<s> A </s></s> B </s>, no segments), through the CLI."""
    base = hf_encoder_dir(tmp_path / "base", "roberta", ag_news["texts"])
    rows = [[t[:60], t[60:120], label] for t, label in zip(ag_news["texts"][:96], ["a", "b"] * 48)]
    data = write_csv(tmp_path / "pairs.csv", ["text", "text_pair", "label"], rows)
    code = main(["finetune", "classify", "--model", str(base), "--train", str(data), "--valid", str(data),
                 "--out", str(tmp_path / "run"), "--epochs", "1", "--batch-size", "32", "--max-length", "64",
                 "--text-pair-column", "text_pair", "--no-progress", "--no-tensorboard"])
    assert code in (0, None)
    _same_logits_in_transformers(tmp_path / "run" / "model", hf.AutoModelForSequenceClassification,
                                 [r[0] for r in rows[:3]], [r[1] for r in rows[:3]])


@pytest.mark.parametrize("family", ["roberta", "distilbert"])
def test_ner(family, shared_data, hf_encoder_dir, fast, tmp_path):
    path, texts = _wnut(shared_data, tmp_path, 200)
    base = hf_encoder_dir(tmp_path / "base", family, texts)
    metrics = finetune("ner", base, path, path, tmp_path / "run", epochs=1, lr=1e-3, batch_size=32, max_length=64,
                       **fast)
    assert 0 <= metrics["f1"] <= 1
    config = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert config["architectures"][0].endswith("ForTokenClassification")
    assert "B-person" in config["label2id"]
    _same_logits_in_transformers(tmp_path / "run" / "model", hf.AutoModelForTokenClassification, texts[:3])


@pytest.mark.parametrize("family", ["roberta", "distilbert"])
def test_qa(family, make_squad, hf_encoder_dir, fast, tmp_path):
    path = make_squad(tmp_path / "squad.json", 64, 0)
    examples = read_squad(path).examples
    base = hf_encoder_dir(tmp_path / "base", family, [ex.context + " " + ex.question for ex in examples])
    metrics = finetune("qa", base, path, path, tmp_path / "run", epochs=1, lr=1e-3, batch_size=16, max_length=96,
                       **fast)
    assert 0 <= metrics["f1"] <= 100
    config = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert config["architectures"][0].endswith("ForQuestionAnswering")
    _same_logits_in_transformers(tmp_path / "run" / "model", hf.AutoModelForQuestionAnswering,
                                 [ex.question for ex in examples[:3]], [ex.context for ex in examples[:3]])
