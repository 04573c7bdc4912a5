import importlib.resources
import json
import math
from pathlib import Path

import pytest
import torch

from lmforge.config import load_config
from lmforge.data.loaders import Documents, PooledExamples
from lmforge.data.prepare import prepare_corpus
from lmforge.data.pretraining import SyntheticBatches, _document_objective, _vocab_info
from lmforge.data.shards import TokenShards
from lmforge.data.tokenizer_training import train_tokenizer_files
from lmforge.models import build
from lmforge.pretrain import init_weights, model_config, pretrain
from lmforge.tokenizer import Tokenizer
from lmforge.train import checkpoint

TINY = {"dim": 32, "n_layers": 2, "n_heads": 2}


def _config(tmp_path, **overrides):
    base = {"train.out_dir": str(tmp_path / "run"), "train.device": "cpu", "train.precision": "fp32",
            "train.max_steps": 4, "train.micro_batch_size": 4, "train.resume": "none", "data.seq_len": 32,
            "log.every": 2, "log.progress": False, "log.tensorboard": False, "log.plot": False,
            "log.peak_flops": 1e12, "eval.every": 2, "eval.steps": 2, "checkpoint.every": 2,
            "optim.warmup_steps": 0}
    return load_config(None, {**base, **overrides})


def test_model_config_rederives_what_the_preset_derived(tmp_path):
    cfg = model_config(_config(tmp_path, **{"model.preset": "gpt-tiny", "model.overrides": TINY}))
    assert (cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.hidden_dim) == (32, 2, 2, 16, 128)
    llama = model_config(_config(tmp_path, **{"model.preset": "llama-tiny", "model.overrides": {"n_layers": 1}}))
    assert (llama.n_kv_heads, llama.hidden_dim) == (2, 352)  # chosen by the preset: kept
    cfg = model_config(_config(tmp_path, **{"model.preset": "gpt-tiny"}), vocab_size=100)
    assert cfg.vocab_size == 100 and cfg.padded_vocab_size == 128


@pytest.mark.parametrize("overrides, match", [
    ({"model.preset": "bert-tiny"}, "train.objective 'clm' trains a gpt model"),
    ({"model.overrides": {"dimm": 3}}, r"unknown gpt model field\(s\) \['dimm'\]"),
    ({"data.seq_len": 1024}, r"data.seq_len \(1024\) is longer than the model's max_seq_len \(256\)"),
    ({"model.preset": "gpt-tiny", "model.family": "bert"}, "model.family is 'bert'"),
    ({"model.preset": "roberta-base", "train.objective": "mlm+nsp"}, "'roberta-base' has not .*objective mlm"),
])
def test_model_config_errors_name_the_field(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        model_config(_config(tmp_path, **overrides))


@pytest.mark.parametrize("objective, preset", [("clm", "gpt-tiny"), ("mlm", "bert-tiny"), ("mlm+nsp", "bert-tiny"),
                                               ("denoise", "bart-tiny"), ("denoise", "t5-tiny")])
def test_pretrain_each_objective_on_synthetic_tokens(tmp_path, objective, preset):
    cfg = _config(tmp_path, **{"data.synthetic": True, "train.objective": objective, "model.preset": preset,
                               "model.overrides": {**TINY, "vocab_size": 96}})
    result = pretrain(cfg)
    assert result["step"] == 4 and result["stopped"] == "max_steps"
    # T5's initialisation gives unit-variance logits, whose log-sum-exp is ln V + 1/2 on average.
    excess = math.log(2) if objective == "mlm+nsp" else 0.5 if preset.startswith("t5") else 0
    assert abs(result["val_loss"] - math.log(96) - excess) < 0.3
    if objective.startswith("mlm"):
        assert 0 <= result["val_mlm_acc"] <= 1
    if objective == "mlm+nsp":
        assert 0 <= result["val_nsp_acc"] <= 1 and "val_nsp_loss" in result
    assert checkpoint.verify(result["checkpoint"])["step"] == 4


@pytest.mark.parametrize("preset, exported", [("roberta-base", "RobertaForMaskedLM"),
                                              ("distilbert-base", "DistilBertForMaskedLM")])
def test_pretrain_mlm_encoders_after_bert(tmp_path, preset, exported):
    cfg = _config(tmp_path, **{"data.synthetic": True, "train.objective": "mlm", "model.preset": preset,
                               "model.overrides": {**TINY, "vocab_size": 96}})
    result = pretrain(cfg)
    assert abs(result["val_loss"] - math.log(96)) < 0.3
    written = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert written["architectures"] == [exported]


def test_synthetic_batches_resume_exactly():
    a = SyntheticBatches("mlm", batch_size=2, seq_len=16, vocab_size=50, seed=3)
    for _ in range(3):
        next(a)
    state = a.state_dict()
    expected = [next(a) for _ in range(2)]
    b = SyntheticBatches("mlm", batch_size=2, seq_len=16, vocab_size=50, seed=3)
    b.load_state_dict(state)
    for x, y in zip(expected, [next(b) for _ in range(2)]):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A prepared slice of the packaged corpus, with a BPE and a WordPiece tokenizer."""
    root = tmp_path_factory.mktemp("corpus")
    text = (importlib.resources.files("lmforge") / "corpus" / "tinyshakespeare.txt").read_text()[:120_000]
    (root / "text.txt").write_text(text)
    for kind in ("bpe", "wordpiece"):
        train_tokenizer_files(root / "text.txt", kind=kind, vocab_size=400).save(root / f"tok-{kind}")
        tok = Tokenizer.from_pretrained(root / f"tok-{kind}")
        prepare_corpus(tok, root / "text.txt", root / f"data-{kind}", val_fraction=0.05, num_workers=1)
    return root


def test_pretrain_clm_on_prepared_shards_learns(tmp_path, corpus):
    cfg = _config(tmp_path, **{"data.train": str(corpus / "data-bpe"), "data.tokenizer": str(corpus / "tok-bpe"),
                               "model.overrides": TINY, "train.max_steps": 40, "eval.every": 20,
                               "checkpoint.every": 20, "optim.lr": 3e-3, "train.micro_batch_size": 8})
    result = pretrain(cfg)
    vocab = Tokenizer.from_pretrained(corpus / "tok-bpe").vocab_size
    assert result["val_loss"] < math.log(vocab) - 0.5  # it learned something about the text
    ck = Path(result["checkpoint"])
    assert (ck / "tokenizer.json").is_file() and "tokenizer.json" in checkpoint.verify(ck)["files"]
    model = build(model_config(cfg, vocab_size=vocab))
    init_weights(model, ck)  # a pretrained checkpoint starts another run (model.init_from)
    torch.testing.assert_close(model.tok_emb.weight, checkpoint.load(ck).model["tok_emb.weight"])


def test_pretrain_mlm_nsp_on_prepared_shards(tmp_path, corpus):
    cfg = _config(tmp_path, **{"data.train": str(corpus / "data-wordpiece"), "train.objective": "mlm+nsp",
                               "data.tokenizer": str(corpus / "tok-wordpiece"), "model.preset": "bert-tiny",
                               "model.overrides": TINY, "data.seq_len": 48})
    result = pretrain(cfg)
    assert math.isfinite(result["val_loss"]) and 0 <= result["val_nsp_acc"] <= 1


def test_document_objective_needs_a_tokenizer(tmp_path, corpus):
    cfg = _config(tmp_path, **{"data.train": str(corpus / "data-wordpiece"), "train.objective": "mlm",
                               "model.preset": "bert-tiny"})
    with pytest.raises(ValueError, match="data.tokenizer is required"):
        pretrain(cfg)


@pytest.mark.parametrize("objective", ["mlm", "mlm+nsp"])
def test_pooled_examples_resume_exactly(tmp_path, corpus, objective):
    cfg = _config(tmp_path, **{"train.objective": objective, "data.seq_len": 48})
    tok = Tokenizer.from_pretrained(corpus / "tok-wordpiece")
    shards = TokenShards(corpus / "data-wordpiece", "train")

    def loader():
        make, collate = _document_objective(cfg, tok, _vocab_info(tok, False), seed=1)
        docs = Documents(shards, shuffle=True, seed=0, epochs=None)
        return PooledExamples(docs, make, collate, 4, pool_docs=16)

    a = loader()
    for _ in range(7):  # crosses pool boundaries
        next(a)
    state = a.state_dict()
    expected = [next(a) for _ in range(6)]
    b = loader()
    b.load_state_dict(state)
    for x, y in zip(expected, [next(b) for _ in range(6)]):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
