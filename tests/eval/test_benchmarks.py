"""Benchmark tasks: few-shot draws, metrics and standard errors as lm-evaluation-harness
computes them (its sampler and statistics are the reference), results files, and the
`lmforge evaluate <benchmark>` command with its bad-input errors."""

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from lm_eval.api import metrics as lm_eval_metrics
from lm_eval.api.samplers import ContextSampler

import lmforge
from lmforge.cli import main
from lmforge.eval.benchmark_data import Doc
from lmforge.eval.benchmarks import (
    BENCHMARKS,
    aggregate,
    doc_requests,
    evaluate_benchmark,
    fewshot_prefixes,
    write_results,
)
from lmforge.eval.metrics import bootstrap_stderr, mean_stderr
from lmforge.interop.model_dir import save_model_dir
from lmforge.models import GPT, GPTConfig
from lmforge.tokenizer import train_tokenizer


def _docs(n: int) -> list[Doc]:
    return [Doc({"i": i}, i + 1, (f"Question: q{i}\nAnswer:",), (f"a{i}", f"b{i}", f"c{i}"), i % 3) for i in range(n)]


@pytest.mark.parametrize("task,k", [("hellaswag", 3), ("arc_easy", 2), ("winogrande", 1), ("lambada_openai", 4)])
def test_fewshot_draws_are_lm_evals(task, k):
    """The same examples, in the same order, as lm-evaluation-harness's ContextSampler seeded
    1234, over a pool that is the evaluated file itself."""
    bench, docs = BENCHMARKS[task], _docs(9)
    sampler = ContextSampler([d.record for d in docs], rnd=1234)
    by_record = {d.record["i"]: d for d in docs}
    prefixes = fewshot_prefixes(bench, docs, docs, k, seed=1234)
    for doc, prefix in zip(docs, prefixes):
        drawn = sampler.sample(n=k, eval_doc=doc.record if bench.exclude_self else None)
        shots = [by_record[r["i"]] for r in drawn]
        assert prefix == "".join(f"{s.queries[0]} {s.answers[s.gold]}\n\n" for s in shots)
        if bench.exclude_self:
            assert doc not in shots


def test_requests_per_kind():
    mc, partial = _docs(1)[0], Doc({}, 1, ("The cat", "The dog"), ("sat down.",), 1)
    assert doc_requests(BENCHMARKS["arc_easy"], mc, "P ") == [
        ("P Question: q0\nAnswer:", " a0"), ("P Question: q0\nAnswer:", " b0"), ("P Question: q0\nAnswer:", " c0")]
    assert doc_requests(BENCHMARKS["winogrande"], partial, "") == [("The cat", " sat down."), ("The dog", " sat down.")]
    last_word = Doc({}, 1, ("he said",), (" hello",))
    assert doc_requests(BENCHMARKS["lambada_openai"], last_word, "") == [("he said", " hello")]


def test_fewshot_pool_too_small_and_wikitext_shots_are_errors():
    with pytest.raises(ValueError, match="num_fewshot 3 draws 4 examples, but the few-shot pool has only 3"):
        fewshot_prefixes(BENCHMARKS["hellaswag"], _docs(3), _docs(3), 3, 1234)
    with pytest.raises(ValueError, match="wikitext scores whole documents and takes no few-shot"):
        fewshot_prefixes(BENCHMARKS["wikitext"], _docs(3), _docs(3), 1, 1234)


def test_accuracy_metrics_and_stderr():
    samples = [{"acc": a, "acc_norm": b} for a, b in [(1.0, 0.0), (0.0, 0.0), (1.0, 1.0), (1.0, 0.0)]]
    out = aggregate(BENCHMARKS["hellaswag"], samples, 0)
    assert out["acc"] == 0.75 and out["acc_norm"] == 0.25
    assert out["acc_stderr"] == pytest.approx(lm_eval_metrics.mean_stderr([1.0, 0.0, 1.0, 1.0]), rel=1e-12)
    assert out["acc_norm_stderr"] == pytest.approx(math.sqrt(0.25 * 0.75 * 4 / 3 / 4), rel=1e-12)
    assert mean_stderr([1.0]) is None
    assert list(aggregate(BENCHMARKS["winogrande"], samples, 0)) == ["acc", "acc_stderr"]


def test_lambada_perplexity_bootstrap_is_lm_evals(monkeypatch):
    monkeypatch.setenv("DISABLE_MULTIPROC", "1")
    lls = [-1.5, -0.2, -3.0, -0.7, -2.2, -0.05, -4.1]
    samples = [{"loglikelihoods": [ll], "acc": float(ll > -1)} for ll in lls]
    out = aggregate(BENCHMARKS["lambada_openai"], samples, 2000)
    assert out["perplexity"] == pytest.approx(lm_eval_metrics.perplexity(lls), rel=1e-12)
    theirs = lm_eval_metrics.bootstrap_stderr(lm_eval_metrics.perplexity, lls, iters=2000)
    assert out["perplexity_stderr"] == pytest.approx(theirs, rel=1e-9)
    assert bootstrap_stderr(lls, lambda x: np.exp(-x.mean(1)), 0) is None


def test_wikitext_corpus_ratios():
    samples = [{"loglikelihood": -30.0, "words": 10, "bytes": 50}, {"loglikelihood": -12.0, "words": 4, "bytes": 20}]
    out = aggregate(BENCHMARKS["wikitext"], samples, 100)
    assert out["word_perplexity"] == pytest.approx(lm_eval_metrics.weighted_perplexity([(-30.0, 10), (-12.0, 4)]))
    assert out["byte_perplexity"] == pytest.approx(math.exp(42 / 70))
    assert out["bits_per_byte"] == pytest.approx(lm_eval_metrics.bits_per_byte([(-30.0, 50), (-12.0, 20)]))
    assert out["bits_per_byte_stderr"] is None


def test_results_json_keeps_other_tasks_and_refuses_foreign_files(tmp_path):
    write_results(tmp_path, {"task": "piqa", "metrics": {"acc": 0.5, "acc_stderr": 0.1}, "samples": [{"doc_id": 0}]})
    write_results(tmp_path, {"task": "arc_easy", "metrics": {"acc": 0.25, "acc_stderr": None}, "samples": []})
    assert json.loads((tmp_path / "results.json").read_text()) == {
        "piqa": {"acc": 0.5, "acc_stderr": 0.1}, "arc_easy": {"acc": 0.25, "acc_stderr": None}}
    assert (tmp_path / "samples_piqa.jsonl").read_text() == '{"doc_id": 0}\n'
    other = tmp_path / "other"
    other.mkdir()
    (other / "results.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="results.json exists and is not a results file"):
        write_results(other, {"task": "piqa", "metrics": {}, "samples": []})
    assert (other / "results.json").read_text() == "[1, 2]"


# ----------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    tok = train_tokenizer(texts=["the cat sat on the mat and the dog ran to the park"] * 30, kind="bpe",
                          vocab_size=300, min_frequency=1)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, max_seq_len=64, dim=32, n_layers=2, n_heads=2, vocab_multiple=8))
    model.init_weights(std=0.3)
    return save_model_dir(tmp_path_factory.mktemp("model") / "gpt", model.eval(), tokenizer=tok, format="hf")


HELLASWAG = [{"activity_label": "Cats", "ctx_a": "The cat sat on the mat.", "ctx_b": "then the cat",
              "endings": ["ran to the park.", "sat.", "the dog [title] ran.", "on the mat."], "label": i % 4}
             for i in range(5)]


def _write(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_evaluate_command_writes_results_and_prints_one_line(model_dir, tmp_path, capsys):
    data = _write(tmp_path / "hellaswag_val.jsonl", HELLASWAG)
    main(["evaluate", "hellaswag", "--model", str(model_dir), "--data", str(data), "--limit", "3",
          "--num-fewshot", "1", "--out", str(tmp_path / "out"), "--device", "cpu"])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("hellaswag | n=3 | acc ") and " acc_norm " in line
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert list(results) == ["hellaswag"]
    assert list(results["hellaswag"]) == ["acc", "acc_stderr", "acc_norm", "acc_norm_stderr"]
    samples = [json.loads(s) for s in (tmp_path / "out" / "samples_hellaswag.jsonl").read_text().splitlines()]
    assert [s["line"] for s in samples] == [1, 2, 3]  # --limit: the first examples in file order
    assert all(len(s["loglikelihoods"]) == 4 and s["requests"][0][0].count("\n\n") == 1 for s in samples)
    lm = lmforge.load(model_dir)
    direct = evaluate_benchmark(lm.model, lm.tokenizer, "hellaswag", data, limit=3, num_fewshot=1)
    assert direct["metrics"] == results["hellaswag"]


def _run(argv: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        main(argv)
    return e.value.code, capsys.readouterr().err.strip()


@pytest.mark.parametrize("task,files,message", [
    ("hellaswag", {"hellaswag_val.jsonl": '{"activity_label": "a", "ctx_a": "b", "ctx_b": "c", "label": 0}\n'},
     r"hellaswag_val.jsonl:1: missing field 'endings'"),
    ("arc_easy", {"ARC-Easy-Test.jsonl": '{"question": "q", "choices": {"text": ["a"], "label": ["A"]}, '
                                         '"answerKey": "A"}\n{"question": \n'},
     r"ARC-Easy-Test.jsonl:2: invalid JSON"),
    ("piqa", {"valid.jsonl": '{"goal": "g", "sol1": "a", "sol2": "b"}\n'}, r"valid-labels.lst: no such file"),
    ("winogrande", {"dev.jsonl": '{"sentence": "a _ b", "option1": "x", "option2": "y", "answer": "3"}\n'},
     r"dev.jsonl:1: field 'answer' = '3' names none of the 2 choices"),
])
def test_bad_input_is_one_line_and_exit_2(model_dir, tmp_path, capsys, monkeypatch, task, files, message):
    monkeypatch.delenv("LMFORGE_DEBUG", raising=False)
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    code, err = _run(["evaluate", task, "--model", str(model_dir), "--data", str(tmp_path / next(iter(files))),
                      "--device", "cpu"], capsys)
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith("lmforge: error: ") and re.search(message, err)


def test_unknown_task_exits_2(model_dir, capsys):
    code, err = _run(["evaluate", "hellaswagg", "--model", str(model_dir), "--data", "x.jsonl"], capsys)
    assert code == 2 and "invalid choice: 'hellaswagg'" in err


def test_needs_a_causal_lm_and_positive_limit(model_dir, tmp_path):
    data = _write(tmp_path / "h.jsonl", HELLASWAG)
    with pytest.raises(ValueError, match="needs a causal language model"):
        evaluate_benchmark(object(), None, "hellaswag", data)
    lm = lmforge.load(model_dir)
    with pytest.raises(ValueError, match="limit must be positive"):
        evaluate_benchmark(lm.model, lm.tokenizer, "hellaswag", data, limit=0)
    with pytest.raises(ValueError, match="unknown benchmark 'mmlu'"):
        evaluate_benchmark(lm.model, lm.tokenizer, "mmlu", data)


def test_bf16_command_runs_close_to_fp32(model_dir, tmp_path, capsys):
    data = _write(tmp_path / "hellaswag_val.jsonl", HELLASWAG)
    for dtype in ("float32", "bfloat16"):
        main(["evaluate", "hellaswag", "--model", str(model_dir), "--data", str(data), "--dtype", dtype,
              "--device", "cpu", "--out", str(tmp_path / dtype)])
    fp32, bf16 = ([json.loads(s)["loglikelihoods"] for s in (tmp_path / d / "samples_hellaswag.jsonl").open()]
                  for d in ("float32", "bfloat16"))
    assert np.allclose(bf16, fp32, rtol=0.02, atol=0.2)
