"""The command line end to end, in-process: each command parses, calls the library and
reports; a user's mistake exits with status 2 and one line, no traceback."""

import csv
import json

import pytest
import torch

from lmforge.cli import main
from lmforge.interop.model_dir import save_model_dir
from lmforge.models import build as build_model
from lmforge.models import preset
from lmforge.tokenizer import train_tokenizer

TEXT = ("the cat sat on the mat. the dog ran in the park. a bird sang in the tree. "
        "sport is fun to watch. markets fell on monday. a new phone was released. ") * 20


def run(capsys, *argv):
    """main(argv) -> (exit status, stdout, stderr)."""
    try:
        main(list(argv))
        code = 0
    except SystemExit as e:
        code = e.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


def tokenizer_of(model_dir):
    from lmforge.tokenizer import Tokenizer

    return Tokenizer.from_pretrained(model_dir)


def last_json(out: str) -> dict:
    """The JSON object a command prints last (training logs come before it)."""
    return json.loads(out[out.rindex("\n{") + 1:] if "\n{" in out else out)


@pytest.fixture(scope="module")
def gpt_dir(tmp_path_factory):
    tok = train_tokenizer(texts=[TEXT], kind="bpe", vocab_size=300, min_frequency=1)
    torch.manual_seed(0)
    model = build_model(preset("gpt-tiny", vocab_size=tok.vocab_size, dim=32, n_layers=2, n_heads=2, max_seq_len=64))
    return save_model_dir(tmp_path_factory.mktemp("gpt") / "model", model.eval(), tokenizer=tok, format="hf")


def test_tokenizer_train_and_data_prepare(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT.replace(". ", ".\n\n"))
    code, out, err = run(capsys, "tokenizer", "train", "--input", str(corpus), "--kind", "wordpiece",
                         "--vocab-size", "200", "--out", str(tmp_path / "tok"), "--lowercase")
    assert code == 0, err
    assert json.loads(out)["vocab_size"] <= 200 and (tmp_path / "tok" / "tokenizer.json").exists()
    code, out, err = run(capsys, "data", "prepare", "--tokenizer", str(tmp_path / "tok"), "--input", str(corpus),
                         "--out", str(tmp_path / "shards"), "--val-fraction", "0.1", "--workers", "1")
    assert code == 0, err
    assert "tokens from" in out and (tmp_path / "shards" / "meta.json").exists()
    code, out, err = run(capsys, "data", "prepare", "--tokenizer", str(tmp_path / "tok"), "--input",
                         str(tmp_path / "missing.txt"), "--out", str(tmp_path / "x"))
    assert code == 2 and "missing.txt" in err and "Traceback" not in err


def test_generate_inspect_and_plan(gpt_dir, tmp_path, capsys):
    code, out, err = run(capsys, "generate", "--model", str(gpt_dir), "--prompt", "the cat", "the dog",
                         "--max-new-tokens", "5", "--device", "cpu")
    assert code == 0, err
    assert out.count("the cat") == 1 and out.count("the dog") == 1
    code, out, err = run(capsys, "generate", "--model", str(gpt_dir), "--prompt", "the cat", "--max-new-tokens", "3",
                         "--device", "cpu", "--dtype", "bfloat16", "--quantize", "int8")
    assert code == 0, err
    code, out, err = run(capsys, "generate", "--model", str(gpt_dir), "--prompt", "the cat", "--quantize", "int3")
    assert code == 2 and "--quantize" in err
    plain = run(capsys, "generate", "--model", str(gpt_dir), "--prompt", "the cat sat. the cat", "--device", "cpu",
                "--max-new-tokens", "16")
    fast = run(capsys, "generate", "--model", str(gpt_dir), "--prompt", "the cat sat. the cat", "--device", "cpu",
               "--max-new-tokens", "16", "--prompt-lookup", "4", "--prefill-chunk", "2")
    assert fast == plain and plain[0] == 0
    code, out, err = run(capsys, "generate", "--model", str(gpt_dir), "--prompt", "a", "--prompt-lookup", "-1")
    assert code == 2 and "prompt_lookup" in err and err.count("\n") == 1
    code, out, err = run(capsys, "inspect", "next-token", "--model", str(gpt_dir), "--text", "the cat sat",
                         "--device", "cpu", "--json")
    assert code == 0, err
    rows = json.loads(out)
    assert len(rows) == len(tokenizer_of(gpt_dir).encode("the cat sat"))  # one row per token
    for r in rows:
        probs = [c["prob"] for c in r["top"]]
        assert len(probs) == 5 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
        assert r["entropy_bits"] > 0
    code, out, err = run(capsys, "inspect", "attention", "--model", str(gpt_dir), "--text", "the cat sat",
                         "--out", str(tmp_path / "att"), "--device", "cpu")
    assert code == 0, err
    assert any(p.suffix == ".html" for p in (tmp_path / "att").iterdir())
    code, out, err = run(capsys, "plan", "--model", "gpt2-124m", "--seq-len", "1024", "--batch-size", "8", "--json")
    assert code == 0, err
    plan = json.loads(out)
    assert plan["params"]["total"] == 124_475_904 and plan["memory"]["fits"]


def test_finetune_then_evaluate_classify(tmp_path, capsys):
    rows = [(s.strip(), ["animals", "news"][i % 2]) for i, s in enumerate(TEXT.split(". ")) if s.strip()]
    for name, part in (("train", rows[:80]), ("valid", rows[80:])):
        with open(tmp_path / f"{name}.csv", "w", newline="") as f:
            csv.writer(f).writerows([("text", "label"), *part])
    tok = train_tokenizer(texts=[TEXT], kind="wordpiece", vocab_size=200, lowercase=True, min_frequency=1)
    bert = build_model(preset("bert-tiny", vocab_size=tok.vocab_size, dim=32, n_heads=2, max_seq_len=64))
    save_model_dir(tmp_path / "bert", bert, tokenizer=tok, format="hf")
    code, out, err = run(capsys, "finetune", "classify", "--model", str(tmp_path / "bert"),
                         "--train", str(tmp_path / "train.csv"), "--valid", str(tmp_path / "valid.csv"),
                         "--out", str(tmp_path / "run"), "--epochs", "1", "--batch-size", "16", "--lr", "1e-3",
                         "--text-column", "text", "--no-progress", "--no-tensorboard", "--device", "cpu")
    assert code == 0, err
    metrics = last_json(out)
    assert {"accuracy", "macro_f1"} <= set(metrics)
    assert (tmp_path / "run" / "model" / "config.json").exists()
    code, out, err = run(capsys, "evaluate", "classify", "--model", str(tmp_path / "run" / "model"),
                         "--data", str(tmp_path / "valid.csv"), "--device", "cpu")
    assert code == 0, err
    assert last_json(out)["accuracy"] == pytest.approx(metrics["accuracy"])
    code, out, err = run(capsys, "finetune", "classify", "--model", str(tmp_path / "bert"),
                         "--train", str(tmp_path / "train.csv"), "--valid", str(tmp_path / "valid.csv"),
                         "--out", str(tmp_path / "run2"), "--label-column", "category")
    assert code == 2 and "category" in err and "Traceback" not in err
    # The run's finetune.yaml runs it again (here into another directory, both flag spellings).
    written = (tmp_path / "run" / "finetune.yaml").read_text()
    assert written.startswith("# lmforge finetune classify --config finetune.yaml\n") and "text_column: text" in written
    code, out, err = run(capsys, "finetune", "classify", "--config", str(tmp_path / "run" / "finetune.yaml"),
                         "--out", str(tmp_path / "again"), "--batch_size", "16", "--no_progress")
    assert code == 0, err
    assert last_json(out)["accuracy"] == pytest.approx(metrics["accuracy"])
    assert (tmp_path / "again" / "finetune.yaml").read_text() == written.replace(str(tmp_path / "run"),
                                                                               str(tmp_path / "again"))


def _leaf_commands(table, prefix=()):
    for name, entry in table.items():
        yield from _leaf_commands(entry, (*prefix, name)) if isinstance(entry, dict) else [(*prefix, name)]


def test_every_command_prints_its_config_and_takes_both_spellings(capsys):
    from lmforge.cli import COMMANDS

    for command in _leaf_commands(COMMANDS):
        code, out, err = run(capsys, *command, "--print-config")
        assert code == 0 and out.strip(), (command, err)
    code, out, _ = run(capsys, "pretrain", "--train.max-steps", "7", "--optim.warmup_steps=3", "--print_config")
    assert "max_steps: 7" in out and "warmup_steps: 3" in out
    code, out, _ = run(capsys, "generate", "--model", "m", "--max_new_tokens", "5", "--print-config")
    assert code == 0 and "max_new_tokens: 5" in out
    code, _, err = run(capsys, "generate", "--model", "m", "--max_new_tokenz", "5")
    assert code == 2 and "--max_new_tokenz" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv", [["generate", "--prompt", "x"], ["generate", "--chat"], ["serve"],
                                  ["evaluate", "wikitext", "--data", "w.raw"]])
def test_dtype_and_quantize_flags_on_every_decoding_command(argv, capsys):
    from lmforge.cli import COMMANDS, _resolve, build_parser

    def parsed(*extra):
        return _resolve(COMMANDS, build_parser().parse_args([*argv, "--model", "m", *extra]))[1]

    a = parsed("--dtype", "bfloat16", "--quantize", "int8")
    assert (a.dtype, a.quantize) == ("bfloat16", "int8")
    a = parsed()
    assert (a.dtype, a.quantize) == (None, None)  # float32, unquantised
    for bad in (["--quantize", "int3"], ["--dtype", "float8"]):
        code, out, err = run(capsys, *argv, "--model", "m", *bad)
        assert code == 2 and err.count("\n") == 1 and bad[0] in err and "Traceback" not in err
