"""Language-model benchmarks, scored as lm-evaluation-harness scores them.

    evaluate_benchmark(model, tokenizer, "hellaswag", "hellaswag_val.jsonl", num_fewshot=10)

Three kinds of task, each with lm-evaluation-harness's names for the task and its metrics:

    multiple choice   hellaswag, arc_easy, arc_challenge, piqa: the context, then each choice
                      after a space; acc = [argmax_i ll_i = gold], acc_norm = [argmax_i ll_i /
                      len(choice_i in characters) = gold]. winogrande (partial scoring): each
                      option completes the context, the shared rest of the sentence is scored;
                      acc only, as lm-evaluation-harness reports it
    last word         lambada_openai: perplexity = exp(-mean ll of the last word), acc = the
                      last word is what greedy decoding produces
    rolling           wikitext: every token of an article predicted once in windows of the
                      model's context (lmforge.eval.loglikelihood.rolling_pairs);
                      word_perplexity = exp(-sum ll / words), byte_perplexity = exp(-sum ll /
                      UTF-8 bytes), bits_per_byte = -sum ll / bytes / ln 2, words and bytes
                      counted on the raw article

Standard errors (metric_stderr) as lm-evaluation-harness computes them: sample stddev /
sqrt(n) for accuracies, its seeded bootstrap for LAMBADA's perplexity, none (null) for the
corpus-level WikiText ratios.

Few-shot examples (num_fewshot = k): for each example in file order, k examples drawn with
one random.Random(fewshot_seed) (seed 1234, lm-evaluation-harness's default) from the
few-shot file (the dataset's training split) or, without one, from the evaluated file itself;
each is "<prompt> <answer>\\n\\n" before the prompt. Where lm-evaluation-harness's task
keeps the evaluated example out of its own shots (hellaswag, piqa, winogrande), k + 1 are
drawn and the example removed, as it does; arc_* and lambada_openai draw k.
"""

from __future__ import annotations

import json
import math
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from lmforge.eval.benchmark_data import (
    Doc,
    read_arc,
    read_hellaswag,
    read_lambada,
    read_piqa,
    read_wikitext,
    read_winogrande,
    wikitext_detokenize,
)
from lmforge.eval.loglikelihood import loglikelihood, loglikelihood_rolling
from lmforge.eval.metrics import LN2, bootstrap_stderr, mean_stderr
from lmforge.eval.report import write_metrics_json
from lmforge.files import atomic_write_text
from lmforge.models.gpt import GPT

FEWSHOT_SEED = 1234  # lm-evaluation-harness's fewshot_random_seed
BOOTSTRAP_ITERS = 100_000  # lm-evaluation-harness's bootstrap_iters
_WHITESPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class Benchmark:
    """A task: how to read its file, what to ask the model, which metrics to report.
    kind: "multiple_choice", "loglikelihood" (one continuation) or "rolling" (whole documents);
    exclude_self: draw k + 1 shots and drop the evaluated example (see the module docstring)."""

    name: str
    read: Callable[[Path], list[Doc]]
    kind: str
    metrics: tuple[str, ...]
    exclude_self: bool
    help: str


BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (
    Benchmark("hellaswag", read_hellaswag, "multiple_choice", ("acc", "acc_norm"), True,
              "HellaSwag commonsense sentence completion (hellaswag_val.jsonl)"),
    Benchmark("arc_easy", read_arc, "multiple_choice", ("acc", "acc_norm"), False,
              "ARC-Easy science questions (AI2 or ai2_arc JSONL)"),
    Benchmark("arc_challenge", read_arc, "multiple_choice", ("acc", "acc_norm"), False,
              "ARC-Challenge science questions (AI2 or ai2_arc JSONL)"),
    Benchmark("piqa", read_piqa, "multiple_choice", ("acc", "acc_norm"), True,
              "PIQA physical commonsense (valid.jsonl + valid-labels.lst)"),
    Benchmark("winogrande", read_winogrande, "multiple_choice", ("acc",), True,
              "Winogrande pronoun resolution, partial scoring (dev.jsonl)"),
    Benchmark("lambada_openai", read_lambada, "loglikelihood", ("perplexity", "acc"), False,
              "LAMBADA last-word prediction (lambada_test.jsonl)"),
    Benchmark("wikitext", read_wikitext, "rolling", ("word_perplexity", "byte_perplexity", "bits_per_byte"), False,
              "WikiText document perplexity, bits per byte (wiki.test.raw)"),
)}


def get_benchmark(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; choose one of {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]


# ----------------------------------------------------------------------------- prompts


def _shot(bench: Benchmark, doc: Doc) -> str:
    """A solved example: its (gold) prompt, a space, its (gold) answer."""
    query = doc.queries[doc.gold if len(doc.queries) > 1 else 0]
    answer = doc.answers[doc.gold if len(doc.answers) > 1 else 0]
    return f"{query} {answer}\n\n"


def fewshot_prefixes(bench: Benchmark, docs: list[Doc], pool: list[Doc], k: int, seed: int) -> list[str]:
    """The few-shot text before each doc's prompt, drawn as the module docstring says."""
    if k == 0:
        return [""] * len(docs)
    if bench.kind == "rolling":
        raise ValueError(f"{bench.name} scores whole documents and takes no few-shot examples")
    need = k + 1 if bench.exclude_self else k
    if len(pool) < need:
        raise ValueError(f"num_fewshot {k} draws {need} examples, but the few-shot pool has only {len(pool)}")
    rnd = random.Random(seed)
    prefixes = []
    for doc in docs:
        if bench.exclude_self:
            shots = [d for d in rnd.sample(pool, k + 1) if d.record != doc.record][:k]
            if len(shots) < k:  # the pool repeats this example: draw again without any copy of it
                shots = rnd.sample([d for d in pool if d.record != doc.record], k)
        else:
            shots = rnd.sample(pool, k)
        prefixes.append("".join(_shot(bench, d) for d in shots))
    return prefixes


def doc_requests(bench: Benchmark, doc: Doc, prefix: str) -> list[tuple[str, str]]:
    """(context, continuation) strings for one doc: per choice for multiple choice (the choice,
    or with partial scoring the shared rest, after a space), one pair for a last-word task."""
    if bench.kind == "loglikelihood":
        return [(prefix + doc.queries[0], doc.answers[0])]
    if len(doc.queries) > 1:
        return [(prefix + q, " " + doc.answers[0]) for q in doc.queries]
    return [(prefix + doc.queries[0], " " + a) for a in doc.answers]


# ----------------------------------------------------------------------------- metrics


def _choice_metrics(bench: Benchmark, doc: Doc, scores: list[tuple[float, bool]]) -> dict[str, Any]:
    """acc and acc_norm of one example, ties going to the first choice (numpy's argmax, as
    lm-evaluation-harness). acc_norm divides by each choice's length in characters."""
    lls = np.array([ll for ll, _ in scores])
    choices = doc.queries if len(doc.queries) > 1 else doc.answers
    lengths = np.array([float(len(c)) for c in choices])
    out: dict[str, Any] = {"acc": float(np.argmax(lls) == doc.gold)}
    if "acc_norm" in bench.metrics:
        out["acc_norm"] = float(np.argmax(lls / lengths) == doc.gold)
    return out


def aggregate(bench: Benchmark, samples: list[dict[str, Any]], bootstrap_iters: int) -> dict[str, float | None]:
    """{metric: value, metric_stderr: value} over the per-example results."""
    out: dict[str, float | None] = {}
    if bench.kind == "rolling":
        ll = sum(s["loglikelihood"] for s in samples)
        words, n_bytes = sum(s["words"] for s in samples), sum(s["bytes"] for s in samples)
        values = {"word_perplexity": math.exp(-ll / words), "byte_perplexity": math.exp(-ll / n_bytes),
                  "bits_per_byte": -ll / n_bytes / LN2}
        for name, value in values.items():
            out[name], out[f"{name}_stderr"] = value, None
        return out
    for name in bench.metrics:
        if name == "perplexity":
            lls = [s["loglikelihoods"][0] for s in samples]
            out[name] = math.exp(-sum(lls) / len(lls))
            out[f"{name}_stderr"] = bootstrap_stderr(lls, lambda x: np.exp(-x.mean(1)), bootstrap_iters)
        else:
            values = [s[name] for s in samples]
            out[name], out[f"{name}_stderr"] = sum(values) / len(values), mean_stderr(values)
    return out


# ----------------------------------------------------------------------------- running


def _score_docs(bench: Benchmark, model: nn.Module, tokenizer, docs: list[Doc], prefixes: list[str],
                options: dict) -> list[dict[str, Any]]:
    if bench.kind == "rolling":
        pages = [d.record["page"] for d in docs]
        lls = loglikelihood_rolling(model, tokenizer, [wikitext_detokenize(p) for p in pages], desc=bench.name,
                                    **options)
        # Words as lm-evaluation-harness counts them: the pieces between whitespace runs.
        return [{"doc_id": i, "line": d.line, "loglikelihood": ll, "words": len(_WHITESPACE.split(p)),
                 "bytes": len(p.encode("utf-8"))} for i, (d, p, ll) in enumerate(zip(docs, pages, lls))]
    requests = [doc_requests(bench, d, p) for d, p in zip(docs, prefixes)]
    flat = [pair for group in requests for pair in group]
    scores = loglikelihood(model, tokenizer, flat, desc=bench.name, **options)
    samples, at = [], 0
    for i, (doc, group) in enumerate(zip(docs, requests)):
        mine, at = scores[at:at + len(group)], at + len(group)
        sample = {"doc_id": i, "line": doc.line, "gold": doc.gold, "loglikelihoods": [ll for ll, _ in mine],
                  "is_greedy": [g for _, g in mine]}
        if bench.kind == "loglikelihood":
            sample["acc"] = float(mine[0][1])
        else:
            sample.update(_choice_metrics(bench, doc, mine))
        samples.append({**sample, "requests": group})
    return samples


def evaluate_benchmark(model: nn.Module, tokenizer, task: str, data: str | Path, *, limit: int | None = None,
                       num_fewshot: int = 0, fewshot_data: str | Path | None = None, fewshot_seed: int = FEWSHOT_SEED,
                       batch_size: int = 16, max_length: int | None = None, bootstrap_iters: int = BOOTSTRAP_ITERS,
                       out: str | Path | None = None, progress: bool = False) -> dict[str, Any]:
    """Score a causal LM on one benchmark file.

    model, tokenizer: a GPT of any decoder family (lmforge.load(...).model) and its Tokenizer.
    task: a name in BENCHMARKS; data: the dataset's own file (see lmforge.eval.benchmark_data).
    limit: the first N examples (wikitext: documents) in file order. num_fewshot, fewshot_data,
    fewshot_seed: see the module docstring. batch_size: packed rows per forward pass;
    max_length: the window (default the model's max_seq_len). out: a directory for
    results.json ({task: {metric: value, metric_stderr: value}}, other tasks' entries kept)
    and samples_<task>.jsonl (each example's requests, log-likelihoods and metrics).
    Returns {"task", "metrics", "samples", "n", "seconds"}.
    """
    bench = get_benchmark(task)
    if not isinstance(model, GPT):
        raise ValueError(f"{task} needs a causal language model (a GPT / Llama-family model without a task head), "
                         f"got {type(model).__name__}")
    if tokenizer is None:
        raise ValueError(f"{task} needs the model's tokenizer, and there is none")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be positive, got {limit}")
    if num_fewshot < 0:
        raise ValueError(f"num_fewshot must be >= 0, got {num_fewshot}")
    start = time.perf_counter()
    every = bench.read(Path(data))
    docs = every[:limit]
    pool = bench.read(Path(fewshot_data)) if fewshot_data is not None and num_fewshot else every
    prefixes = fewshot_prefixes(bench, docs, pool, num_fewshot, fewshot_seed)
    options = {"batch_size": batch_size, "max_length": max_length, "progress": progress}
    samples = _score_docs(bench, model, tokenizer, docs, prefixes, options)
    metrics = aggregate(bench, samples, bootstrap_iters)
    result = {"task": task, "metrics": metrics, "samples": samples, "n": len(docs),
              "seconds": time.perf_counter() - start}
    if out is not None:
        write_results(out, result)
    return result


def write_results(out: str | Path, result: dict[str, Any]) -> Path:
    """Add the task's metrics to out/results.json (an earlier run's other tasks stay) and write
    out/samples_<task>.jsonl; both atomically. Returns results.json's path."""
    out = Path(out)
    path = out / "results.json"
    results: dict[str, Any] = {}
    if path.exists():
        try:
            results = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            results = None
        if not isinstance(results, dict):
            raise ValueError(f"{path} exists and is not a results file; choose another output directory")
    results[result["task"]] = result["metrics"]
    write_metrics_json(path, results)
    lines = (json.dumps(s, ensure_ascii=False) + "\n" for s in result["samples"])
    atomic_write_text(out / f"samples_{result['task']}.jsonl", "".join(lines))
    return path


def summary_line(result: dict[str, Any]) -> str:
    """One table line: task | n | each metric (± stderr) | time and examples/s."""
    cells = [result["task"], f"n={result['n']}"]
    metrics = result["metrics"]
    for name, value in metrics.items():
        if name.endswith("_stderr"):
            continue
        stderr = metrics.get(f"{name}_stderr")
        cells.append(f"{name} {value:.4f}" + (f" ± {stderr:.4f}" if stderr is not None else ""))
    cells.append(f"{result['seconds']:.1f}s, {result['n'] / max(result['seconds'], 1e-9):.1f} examples/s")
    return " | ".join(cells)
