"""`lmforge evaluate <benchmark>` against lm-evaluation-harness itself: its HF backend
(transformers) and its real task configs (prompts, preprocessing, few-shot sampler, metrics)
run on the same local fixture files and the same random-init GPT-2 and Llama-style models.
Also: lm-evaluation-harness driving lmforge through the "lmforge" adapter gives the HF
backend's numbers, for loglikelihood, loglikelihood_rolling and generate_until requests."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from importlib import resources
from pathlib import Path

import lm_eval
import pytest
from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model
from lm_eval.api.task import ConfigurableTask
from lm_eval.evaluator import evaluate
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks._yaml_loader import load_yaml

import lmforge
from lmforge.eval import harness
from lmforge.eval.benchmarks import evaluate_benchmark
from lmforge.generate.text import generate_text

pytestmark = pytest.mark.slow
os.environ["DISABLE_MULTIPROC"] = "1"  # lm-evaluation-harness's bootstrap in-process (same draws)

TASKS = Path(lm_eval.__file__).parent / "tasks"
YAML = {"hellaswag": "hellaswag/hellaswag.yaml", "arc_easy": "arc/arc_easy.yaml",
        "arc_challenge": "arc/arc_challenge.yaml", "piqa": "piqa/piqa.yaml", "winogrande": "winogrande/default.yaml",
        "lambada_openai": "lambada/lambada_openai.yaml", "wikitext": "wikitext/wikitext.yaml"}

# name: (task, our file, lm-eval's file, few-shot pool file (None: the evaluated file), k)
SPECS = {
    "hellaswag": ("hellaswag", "hellaswag", "hellaswag", None, 0),
    "hellaswag_2shot": ("hellaswag", "hellaswag", "hellaswag", "hellaswag_train", 2),
    "hellaswag_3shot_self": ("hellaswag", "hellaswag", "hellaswag", None, 3),
    "arc_easy": ("arc_easy", "arc_ai2", "arc_hf", None, 0),
    "arc_challenge_2shot": ("arc_challenge", "arc_hf", "arc_hf", None, 2),
    "piqa": ("piqa", "piqa", "piqa_hf", None, 0),
    "piqa_1shot": ("piqa", "piqa", "piqa_hf", None, 1),
    "winogrande": ("winogrande", "winogrande", "winogrande", None, 0),
    "winogrande_2shot": ("winogrande", "winogrande", "winogrande", None, 2),
    "lambada_openai": ("lambada_openai", "lambada", "lambada", None, 0),
    "lambada_openai_1shot": ("lambada_openai", "lambada", "lambada", None, 1),
    "lambada_greedy": ("lambada_openai", "lambada_greedy", "lambada_greedy", None, 0),
    "wikitext": ("wikitext", "wikitext", "wikitext_pages", None, 0),
}


def _splits(task: str, data: Path, pool: Path) -> dict[str, str]:
    """The splits lm-evaluation-harness's config reads: few-shot examples come from its
    training split, examples from its test split (else validation)."""
    if task == "lambada_openai":
        return {"test": str(data)}
    splits = {"train": pool, "validation": data}
    if task.startswith("arc") or task == "wikitext":
        splits["test"] = data
    return {k: str(v) for k, v in splits.items()}


def lm_eval_tasks(files: dict[str, Path], cache: Path) -> dict[str, ConfigurableTask]:
    tasks = {}
    for name, (task, _, theirs, pool, k) in SPECS.items():
        cfg = load_yaml(TASKS / YAML[task], resolve_func=True)
        cfg.pop("tag", None)
        cfg.update(task=name, dataset_path="json", dataset_name=None, dataset_kwargs={
            "data_files": _splits(task, files[theirs], files[pool or theirs]), "cache_dir": str(cache)})
        tasks[name] = ConfigurableTask(config=cfg)
        tasks[name].set_config(key="num_fewshot", value=k)
        tasks[name].set_fewshot_seed(seed=1234)
    return tasks


@pytest.fixture(scope="session")
def runs(model_dirs, benchmark_files, tmp_path_factory):
    """lm-evaluation-harness (HF backend, then the lmforge adapter) and lmforge on every spec."""
    out = {}
    for family, model_dir in model_dirs.items():
        files = dict(benchmark_files)
        files["lambada_greedy"] = greedy_lambada(model_dir, tmp_path_factory.mktemp(f"greedy_{family}"))
        cache = tmp_path_factory.mktemp(f"datasets_{family}")
        hf = evaluate(lm=HFLM(pretrained=str(model_dir), batch_size=8, device="cpu"),
                      task_dict={"tasks": lm_eval_tasks(files, cache), "groups": {}}, log_samples=True)
        adapter_lm = get_model("lmforge").create_from_arg_string(f"pretrained={model_dir}",
                                                                 {"batch_size": 8, "device": "cpu"})
        adapter = evaluate(lm=adapter_lm, task_dict={"tasks": lm_eval_tasks(files, cache), "groups": {}},
                           log_samples=True)
        lm = lmforge.load(model_dir)
        ours = {name: evaluate_benchmark(lm.model, lm.tokenizer, task, files[mine], num_fewshot=k,
                                         fewshot_data=files[pool] if pool else None)
                for name, (task, mine, _, pool, k) in SPECS.items()}
        out[family] = {"hf": hf, "adapter": adapter, "ours": ours, "dir": model_dir}
    return out


def greedy_lambada(model_dir: Path, root: Path) -> Path:
    """LAMBADA-style texts, most ending in the model's own greedy next token where that token
    is a space and a word, so that a random model's acc is not trivially 0."""
    lm = lmforge.load(model_dir)
    corpus = (resources.files("lmforge") / "corpus" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    candidates = [s.split() for s in corpus.splitlines() if len(s.split()) > 8]
    rnd = random.Random(1)
    lines = [rnd.choice(candidates) for _ in range(60)]
    words = generate_text(lm.model, lm.tokenizer, [" ".join(w[:8]) for w in lines], max_new_tokens=1)
    greedy = [" ".join(w[:8]) + word for w, word in zip(lines, words) if word.startswith(" ") and word[1:].isalpha()]
    texts = greedy[:8] + [" ".join(w) for w in lines[:12 - len(greedy[:8])]]
    path = root / "lambada_greedy.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


def _theirs(result: dict, name: str) -> dict[str, float]:
    return {k.split(",")[0]: v for k, v in result["results"][name].items() if "," in k}


def _assert_metrics_equal(ours: dict, theirs: dict) -> None:
    assert set(ours) == set(theirs)
    for metric, value in ours.items():
        other = theirs[metric]
        if other == "N/A":  # lm-evaluation-harness computes none; lmforge writes null
            assert value in (None, "N/A"), metric
        elif metric.startswith("acc"):
            assert value == pytest.approx(other, abs=1e-12), metric  # identical decisions (promise: 0.2 points)
        else:  # perplexities and their stderrs: promise 0.5%
            assert value == pytest.approx(other, rel=1e-4), metric


FAMILIES = ["gpt2", "llama"]


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("family", FAMILIES)
def test_metrics_and_loglikelihoods_equal_lm_eval(runs, family, name):
    run = runs[family]
    ours = run["ours"][name]
    _assert_metrics_equal(ours["metrics"], _theirs(run["hf"], name))
    samples = sorted(run["hf"]["samples"][name], key=lambda s: s["doc_id"])
    assert len(samples) == len(ours["samples"])
    for mine, theirs in zip(ours["samples"], samples):
        if "loglikelihood" in mine:  # wikitext: one rolling log-likelihood per document
            assert mine["loglikelihood"] == pytest.approx(theirs["resps"][0][0], rel=1e-5, abs=1e-4)
            continue
        assert [tuple(r) for r in mine["requests"]] == [tuple(a) for a in theirs["arguments"]]
        theirs_ll = [r[0][0] for r in theirs["resps"]]
        assert mine["loglikelihoods"] == pytest.approx(theirs_ll, rel=1e-5, abs=1e-4)
        assert mine["is_greedy"] == [r[0][1] for r in theirs["resps"]]


@pytest.mark.parametrize("family", FAMILIES)
def test_fewshot_and_greedy_paths_are_exercised(runs, family):
    ours = runs[family]["ours"]
    assert all(s["requests"][0][0].count("\n\n") == 2 for s in ours["hellaswag_2shot"]["samples"])
    assert ours["hellaswag_2shot"]["samples"][0]["loglikelihoods"] != ours["hellaswag"]["samples"][0]["loglikelihoods"]
    if family == "gpt2":  # byte-level BPE: a greedy " word" token re-tokenizes to itself
        assert ours["lambada_greedy"]["metrics"]["acc"] > 0.3


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_gives_the_hf_backends_numbers(runs, family, name):
    _assert_metrics_equal(_theirs(runs[family]["adapter"], name), _theirs(runs[family]["hf"], name))


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_generate_until_equals_hf_backend(runs, family):
    model_dir = runs[family]["dir"]
    contexts = ["To be, or not to be", "Friends, Romans, countrymen", "the " * 70 + "end"]  # the last is truncated
    kwargs = [{"until": ["\n\n", "."], "max_gen_toks": 12, "do_sample": False}, {"until": ["e"], "max_gen_toks": 5}]
    requests = [Instance("generate_until", {}, (c, dict(k)), 0) for c in contexts for k in kwargs]
    theirs = HFLM(pretrained=str(model_dir), batch_size=2, device="cpu").generate_until(requests, disable_tqdm=True)
    ours = harness.LmforgeLM(pretrained=str(model_dir), batch_size=2, device="cpu").generate_until(requests)
    assert ours == theirs
    assert any(len(t) > 0 for t in ours)


def test_adapter_is_registered_and_runs_from_lm_evals_command_line(model_dirs, benchmark_files, tmp_path):
    """`python -m lmforge.eval.harness` is lm_eval's own command with "lmforge" registered."""
    assert get_model("lmforge") is harness.LmforgeLM and get_model("hf") is HFLM
    yaml_path = tmp_path / "arc_local.yaml"
    yaml_path.write_text(
        f"task: arc_local\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {benchmark_files['arc_hf']}\n"
        f"  cache_dir: {tmp_path / 'cache'}\noutput_type: multiple_choice\ntest_split: test\n"
        "doc_to_text: \"Question: {{question}}\\nAnswer:\"\ndoc_to_target: \"{{choices.label.index(answerKey)}}\"\n"
        "doc_to_choice: \"{{choices.text}}\"\nmetric_list:\n  - metric: acc\n    aggregation: mean\n"
        "    higher_is_better: true\n")
    src = Path(lmforge.__file__).parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "lmforge.eval.harness", "run", "--model", "lmforge", "--model_args",
               f"pretrained={model_dirs['gpt2']}", "--device", "cpu", "--tasks", str(yaml_path), "--batch_size", "4",
               "--output_path", str(tmp_path / "out")]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (results,) = (tmp_path / "out").rglob("results_*.json")
    theirs = json.loads(results.read_text())["results"]["arc_local"]["acc,none"]
    lm = lmforge.load(model_dirs["gpt2"])
    ours = evaluate_benchmark(lm.model, lm.tokenizer, "arc_easy", benchmark_files["arc_hf"])["metrics"]["acc"]
    assert theirs == pytest.approx(ours, abs=1e-12)
