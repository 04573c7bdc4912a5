"""The fine-tuning driver: batches and their resume, what trains (freezing, last K layers),
early stopping, the best model, class weights, options and bad input."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from lmforge.interop.model_dir import load_model_dir, save_model_dir
from lmforge.models import BertConfig, build
from lmforge.tasks import FinetuneConfig, evaluate, finetune
from lmforge.tasks.base import ExampleBatches, OnDevice, class_weight_vector, load_base
from lmforge.tasks.classify import Classify, ClassifyOptions, step


def _collate(features):
    return {"input_ids": torch.tensor([[f["x"]] for f in features])}


def test_batches_cover_each_epoch_and_resume_exactly():
    features = [{"x": i} for i in range(10)]
    full = ExampleBatches(features, _collate, 3, epochs=2, seed=7)
    assert full.batches_per_epoch == 4
    seen = [b["input_ids"].flatten().tolist() for b in full]
    assert len(seen) == 8 and full.items == 20
    assert sorted(sum(seen[:4], [])) == list(range(10)) == sorted(sum(seen[4:], []))
    assert sum(seen[:4], []) != sum(seen[4:], [])  # reshuffled per epoch
    assert all(b["index"].tolist() == b["input_ids"].flatten().tolist() for b in ExampleBatches(features, _collate, 3))
    # Resume from the middle of the first epoch, and across the epoch boundary.
    for cut in (2, 4, 5):
        first = ExampleBatches(features, _collate, 3, epochs=2, seed=7)
        for _ in range(cut):
            next(first)
        resumed = ExampleBatches(features, _collate, 3, epochs=2, seed=7)
        resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
        assert [b["input_ids"].flatten().tolist() for b in resumed] == seen[cut:]
    with pytest.raises(ValueError, match="cannot resume: the checkpoint's data has n=10, this run 9"):
        ExampleBatches(features[:9], _collate, 3, seed=7).load_state_dict(first.state_dict())


def test_batches_split_between_processes():
    features = [{"x": i} for i in range(11)]
    ranks = [list(ExampleBatches(features, _collate, 2, seed=1, rank=r, world_size=2)) for r in range(2)]
    one = list(ExampleBatches(features, _collate, 4, seed=1))
    assert len(ranks[0]) == len(ranks[1]) == 3  # 11 = 2 x 4 + 3: the last global batch of 3 still feeds both
    for step_, together in enumerate(one):
        mine = [ranks[r][step_]["input_ids"].flatten().tolist() for r in range(2)]
        assert sorted(sum(mine, [])) == sorted(together["input_ids"].flatten().tolist())


def test_batches_continue_on_another_number_of_processes():
    """Two processes with 2 examples each stop after 2 steps; one process with the same global
    batch of 4 continues with exactly the examples the two would have seen next."""
    features = [{"x": i} for i in range(11)]
    one = [sorted(b["input_ids"].flatten().tolist()) for b in ExampleBatches(features, _collate, 4, epochs=2, seed=1)]
    ranks = [ExampleBatches(features, _collate, 2, epochs=2, seed=1, rank=r, world_size=2) for r in range(2)]
    for loader in ranks:
        next(loader), next(loader)
    resumed = ExampleBatches(features, _collate, 4, epochs=2, seed=1)
    resumed.load_state_dicts([json.loads(json.dumps(r.state_dict())) for r in ranks])
    assert [sorted(b["input_ids"].flatten().tolist()) for b in resumed] == one[2:]
    ranks[1].offset += 4
    with pytest.raises(ValueError, match="the processes saved different positions"):
        resumed.load_state_dicts([r.state_dict() for r in ranks])


def _changed(before: dict, after: dict) -> set[str]:
    common = set(before) & set(after)
    assert len(common) > 30  # the backbone's tensors, under the same names
    return {k for k in common if not torch.equal(before[k], after[k])}


def test_freeze_backbone_trains_only_the_head(ag_news, make_model, fast, tmp_path):
    base = make_model(tmp_path / "base", ag_news["texts"])
    before = load_file(base / "model.safetensors")
    finetune("classify", base, ag_news["train"], ag_news["valid"], tmp_path / "run", epochs=1, lr=1e-2,
             max_length=32, freeze_backbone=True, **fast)
    after = load_file(tmp_path / "run" / "model" / "model.safetensors")
    assert _changed(before, after) == set()  # every backbone tensor bit-identical
    assert {"classifier.weight", "classifier.bias"} <= set(after) - set(before)


def test_train_last_layers_leaves_lower_layers_unchanged(ag_news, make_model, fast, tmp_path):
    base = make_model(tmp_path / "base", ag_news["texts"])
    before = load_file(base / "model.safetensors")
    finetune("classify", base, ag_news["train"], ag_news["valid"], tmp_path / "run", epochs=1, lr=1e-2,
             max_length=32, train_last_layers=1, **fast)
    after = load_file(tmp_path / "run" / "model" / "model.safetensors")
    changed = _changed(before, after)
    assert changed and all(k.startswith(("bert.encoder.layer.1.", "bert.pooler.")) for k in changed)
    assert any(k.startswith("bert.pooler.") for k in changed)
    assert sum(k.startswith("bert.encoder.layer.1.") for k in changed) >= 12


def test_early_stopping_stops_and_keeps_the_best(ag_news, make_model, fast, tmp_path, caplog):
    base = make_model(tmp_path / "base", ag_news["texts"])
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="lmforge.tasks"):
        metrics = finetune("classify", base, ag_news["train"], ag_news["valid"], out, epochs=20, lr=1e-9,
                           max_length=32, batch_size=50, early_stopping_metric="macro_f1", patience=2, **fast)
    evals = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "val_macro_f1" in r]
    assert [r["step"] for r in evals] == [8, 16, 24]  # lr ~ 0: no improvement after the first evaluation
    assert metrics["run"]["stopped"] == "early_stopping" and metrics["run"]["steps"] == 24
    assert metrics["run"]["best_step"] == 8
    assert "early stopping: val_macro_f1 did not improve for 2 evaluations" in caplog.text
    with pytest.raises(ValueError, match="early_stopping_metric 'bleu' is not a metric of task classify"):
        finetune("classify", base, ag_news["train"], ag_news["valid"], out, early_stopping_metric="bleu", **fast)


def test_best_evaluation_is_exported(ag_news, make_model, fast, tmp_path):
    base = make_model(tmp_path / "base", ag_news["texts"])
    out = tmp_path / "run"
    metrics = finetune("classify", base, ag_news["train"], ag_news["valid"], out, epochs=6, lr=1e-2, max_length=32,
                       **fast)
    evals = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "val_accuracy" in r]
    best = max(evals, key=lambda r: r["val_accuracy"])  # the first of equals: later ties do not replace it
    assert metrics["run"]["best_step"] == best["step"]
    assert metrics["accuracy"] == pytest.approx(best["val_accuracy"])
    assert evaluate("classify", out / "model", ag_news["valid"], max_length=32)["accuracy"] == metrics["accuracy"]


def test_class_weights_scale_each_example_loss():
    counts = np.array([6, 3, 1])
    balanced = class_weight_vector("balanced", counts, ["a", "b", "c"])
    assert torch.allclose(balanced, torch.tensor([10 / 18, 10 / 9, 10 / 3]))
    assert class_weight_vector(None, counts, ["a", "b", "c"]) is None
    pos = class_weight_vector("balanced", counts, ["a", "b", "c"], positives_of=10)
    assert torch.allclose(pos, torch.tensor([4 / 6, 7 / 3, 9.0]))
    with pytest.raises(ValueError, match="class_weights has 2 numbers but there are 3 labels"):
        class_weight_vector([1.0, 2.0], counts, ["a", "b", "c"])

    torch.manual_seed(0)
    model = build(BertConfig(vocab_size=50, max_seq_len=16, dim=16, n_layers=1, n_heads=2))
    from lmforge.models import HeadSpec, attach_head

    model = attach_head(model, HeadSpec("sequence-classification", ["a", "b", "c"])).eval()
    batch = {"input_ids": torch.randint(1, 50, (4, 6)), "attention_mask": torch.ones(4, 6, dtype=torch.long),
             "token_type_ids": torch.zeros(4, 6, dtype=torch.long), "labels": torch.tensor([0, 2, 1, 2])}
    w = torch.tensor([0.5, 2.0, 3.0])
    plain, logits = step(model, batch, False, OnDevice(None))
    weighted, _ = step(model, batch, False, OnDevice(w))
    ce = F.cross_entropy(logits, batch["labels"], reduction="none")
    assert torch.allclose(plain.loss, ce.sum()) and plain.count == 4
    assert torch.allclose(weighted.loss, (w[batch["labels"]] * ce).sum()) and weighted.count == 4


def test_options_and_config_validation(ag_news, make_model, fast, tmp_path):
    base = make_model(tmp_path / "base", ag_news["texts"])
    with pytest.raises(ValueError, match="unknown fine-tuning option\\(s\\): learning_rate"):
        finetune("classify", base, ag_news["train"], ag_news["valid"], tmp_path / "r", learning_rate=1.0)
    with pytest.raises(ValueError, match="unknown task 'sentiment'"):
        finetune("sentiment", base, ag_news["train"], ag_news["valid"], tmp_path / "r")
    with pytest.raises(ValueError, match="freeze_backbone train_last_layers and lora_rank exclude each other"):
        FinetuneConfig(freeze_backbone=True, lora_rank=4)
    with pytest.raises(ValueError, match="max_length 512 exceeds the model's max_seq_len 128"):
        finetune("classify", base, ag_news["train"], ag_news["valid"], tmp_path / "r", max_length=512)
    with pytest.raises(ValueError, match="train_last_layers 3 exceeds the model's 2 layers"):
        finetune("classify", base, ag_news["train"], ag_news["valid"], tmp_path / "r", train_last_layers=3, **fast)
    c, o = FinetuneConfig(lora_targets="wqkv, wo"), ClassifyOptions(text_column="1", label_column="0",
                                                                    class_weights="1,2.5")
    assert (o.text_column, o.label_column, c.lora_targets, o.class_weights) == (1, 0, ["wqkv", "wo"], [1.0, 2.5])


def test_bad_data_files(ag_news, make_model, fast, write_csv, tmp_path, caplog):
    base = make_model(tmp_path / "base", ag_news["texts"])
    run = tmp_path / "run"
    unseen = write_csv(tmp_path / "unseen.csv", ["text", "label"], [["a text", "World"], ["more", "Weather"]])
    with pytest.raises(ValueError, match=r"unseen\.csv:3: label 'Weather' is not among the known labels"):
        finetune("classify", base, ag_news["train"], unseen, run, **fast)
    with pytest.raises(ValueError, match=r"train\.csv: missing column 'sentence'"):
        finetune("classify", base, ag_news["train"], ag_news["valid"], run, text_column="sentence", **fast)
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(ValueError, match=r"empty\.csv: empty file"):
        finetune("classify", base, empty, ag_news["valid"], run, **fast)
    with pytest.raises(FileNotFoundError, match=r"nope\.csv: no such file"):
        finetune("classify", base, tmp_path / "nope.csv", ag_news["valid"], run, **fast)
    bad_conll = tmp_path / "bad.conll"
    bad_conll.write_text("Paris\tB-location\nis\tQ\n")
    with pytest.raises(ValueError, match=r"bad\.conll:2: bad tag 'Q'"):
        finetune("ner", base, bad_conll, bad_conll, run, **fast)
    # Over-long inputs are cut, and said so.
    with caplog.at_level(logging.WARNING, logger="lmforge.tasks"):
        finetune("classify", base, ag_news["train"], ag_news["valid"], run, epochs=1, max_length=16, **fast)
    assert "train.csv: truncated 400 of 400 examples to 16 tokens" in caplog.text
    assert "truncated 400 of 400 examples to 16 tokens" in (run / "report.md").read_text()


def test_bad_models(ag_news, make_model, fast, write_csv, tmp_path):
    base = make_model(tmp_path / "base", ag_news["texts"])
    with pytest.raises(ValueError, match="the model has no task head, not a sequence-classification head"):
        evaluate("classify", base, ag_news["valid"])
    finetune("classify", base, ag_news["train"], ag_news["valid"], tmp_path / "run", epochs=1, max_length=32, **fast)
    other = write_csv(tmp_path / "other.csv", ["text", "label"], [["good film", "positive"]])
    with pytest.raises(ValueError, match=r"other\.csv:2: label 'positive' is not among the known labels"):
        evaluate("classify", tmp_path / "run" / "model", other)
    with pytest.raises(ValueError, match="not a token-classification head"):
        evaluate("ner", tmp_path / "run" / "model", other)
    # A tokenizer that does not belong to the model (more ids than its vocabulary).
    model, head, tok, special = load_model_dir(base)
    small = build(BertConfig(vocab_size=100, max_seq_len=128, dim=32, n_layers=2, n_heads=2))
    save_model_dir(tmp_path / "small", small, tokenizer=tok, format="hf")
    with pytest.raises(ValueError, match=rf"tokenizer \(tokenizer.json\) has {tok.vocab_size} ids but the model's "
                                         "vocabulary has 100 rows"):
        finetune("classify", tmp_path / "small", ag_news["train"], ag_news["valid"], tmp_path / "r2", **fast)
    save_model_dir(tmp_path / "bare", model, format="hf")
    with pytest.raises(ValueError, match="no tokenizer in the model directory"):
        finetune("classify", tmp_path / "bare", ag_news["train"], ag_news["valid"], tmp_path / "r3", **fast)
    assert load_base(tmp_path / "bare", tokenizer=base).tokenizer.vocab_size == tok.vocab_size
    save_model_dir(tmp_path / "small-bare", small, format="hf")  # --tokenizer of another model: named too
    with pytest.raises(ValueError, match=rf"{base.name}: the tokenizer \(.*\) has {tok.vocab_size} ids"):
        load_base(tmp_path / "small-bare", tokenizer=base)


def test_classify_setup_pairs_and_multi_label(make_model, tmp_path):
    path = tmp_path / "nli.jsonl"
    rows = [{"premise": "a man plays", "hypothesis": "someone plays", "label": "entailment", "tags": ["x", "y"]},
            {"premise": "a dog runs", "hypothesis": "a cat sleeps", "label": "contradiction", "tags": ["y"]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = load_base(make_model(tmp_path / "m", ["a man plays someone a dog runs cat sleeps"] * 10, vocab_size=80))
    config = FinetuneConfig(max_length=32,
                            options=ClassifyOptions(text_column="premise", text_pair_column="hypothesis"))
    setup = Classify().setup(base, config, path, path)
    batch = setup.collate(setup.train)
    n = int(batch["attention_mask"][0].sum())
    first = [base.tokenizer.id_to_token(i) for i in batch["input_ids"][0, :n].tolist()]
    n_a = first.index("[SEP]") + 1
    assert first[0] == "[CLS]" and first[-1] == "[SEP]" and first.count("[SEP]") == 2
    assert batch["token_type_ids"][0, :n_a].eq(0).all() and batch["token_type_ids"][0, n_a:n].eq(1).all()
    assert batch["labels"].tolist() == [1, 0]  # labels in sorted order: contradiction, entailment
    multi = Classify().setup(base, FinetuneConfig(max_length=32, options=ClassifyOptions(
        text_column="premise", label_column="tags", multi_label=True)), path, path)
    assert multi.head.multi_label and multi.head.labels == ["x", "y"]
    assert multi.collate(multi.train)["labels"].tolist() == [[1.0, 1.0], [0.0, 1.0]]
