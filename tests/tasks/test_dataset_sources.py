"""finetune / evaluate read task data from Hub ids (resolved offline from a `datasets` cache),
save_to_disk directories and Parquet files, through the CLI as a user types it."""

import json

import pytest

from lmforge.cli import main
from lmforge.tasks import evaluate, finetune

datasets = pytest.importorskip("datasets")
from datasets import ClassLabel, Dataset, DatasetDict, Features, List, Value  # noqa: E402

TOPICS = ["World", "Sports", "Business", "Sci/Tech"]
WORDS = {"World": "election minister war", "Sports": "match goal team", "Business": "shares market profit",
         "Sci/Tech": "software chip space"}


def news(n, offset=0, text="text"):
    labels = [(i + offset) % 4 for i in range(n)]
    return Dataset.from_dict({text: [f"{WORDS[TOPICS[y]]} report {i}" for i, y in enumerate(labels)],
                              "label": labels},
                             features=Features({text: Value("string"), "label": ClassLabel(names=TOPICS)}))


def test_classify_from_a_hub_id_and_a_save_to_disk_split(hub_cache, make_model, tmp_path, capsys):
    hub_cache("lmforge-tests/news", {"train": news(32)})
    DatasetDict({"validation": news(8, 1, text="sentence")}).save_to_disk(tmp_path / "valid")
    model = make_model(tmp_path / "base", list(news(32)["text"]), vocab_size=200, max_seq_len=32)
    out = tmp_path / "run"
    main(["finetune", "classify", "--model", str(model), "--train", "lmforge-tests/news:train", "--valid",
          f"{tmp_path / 'valid'}:validation", "--columns", "sentence=text", "--out", str(out), "--epochs", "1",
          "--max-length", "16", "--no-progress", "--no-tensorboard", "--device", "cpu", "--precision", "fp32"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == 8
    config = json.loads((out / "model" / "config.json").read_text())
    assert sorted(config["id2label"].values()) == sorted(TOPICS)  # ClassLabel names, not 0..3
    scored = evaluate("classify", out / "model", "lmforge-tests/news:train[:4]")
    assert scored["n"] == 4
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["evaluate", "classify", "--model", str(out / "model"), "--data", f"{tmp_path / 'valid'}:validation"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"lmforge: error: {tmp_path / 'valid'}:validation: no column 'text' (columns: sentence, label); "
                   "rename one with --columns OLD=text"]


def test_ner_from_parquet(make_model, tmp_path):
    tags = ["O", "B-city", "I-city"]
    rows = {"tokens": [["I", "live", "in", "New", "York"], ["Oslo", "is", "cold"]] * 8,
            "ner_tags": [[0, 0, 0, 1, 2], [1, 0, 0]] * 8}
    ds = Dataset.from_dict(rows, features=Features({"tokens": List(Value("string")),
                                                    "ner_tags": List(ClassLabel(names=tags))}))
    ds.to_parquet(tmp_path / "train.parquet")
    model = make_model(tmp_path / "base", [" ".join(t) for t in rows["tokens"]], vocab_size=100, max_seq_len=32)
    metrics = finetune("ner", model, tmp_path / "train.parquet", tmp_path / "train.parquet", tmp_path / "run",
                       epochs=1, max_length=16, progress=False, tensorboard=False, device="cpu", precision="fp32")
    assert 0.0 <= metrics["f1"] <= 1.0
    labels = json.loads((tmp_path / "run" / "model" / "config.json").read_text())["id2label"].values()
    assert sorted(labels) == ["B-city", "I-city", "O"]
