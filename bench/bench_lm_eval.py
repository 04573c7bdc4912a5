"""Benchmark throughput: `lmforge evaluate hellaswag` against lm-evaluation-harness's HF
backend on the same model, the same examples, in the same process.

    python bench/bench_lm_eval.py                         # 300 examples, 0- and 5-shot, 2 threads
    python bench/bench_lm_eval.py --examples 100 --models gpt2-124m --shots 0

The model is a random-init GPT saved in Hugging Face's format (lm-evaluation-harness loads
it with transformers' GPT2LMHeadModel, lmforge with lmforge.load), with GPT-2's 50,257-token
vocabulary; the tokenizer is a byte-level BPE trained on Tiny Shakespeare. The examples are
HellaSwag-shaped (an activity label, a context of ~45 tokens, four endings of ~20 tokens),
written in HellaSwag's own layout, from Tiny Shakespeare lines; lm-evaluation-harness reads
them through its real hellaswag task config (dataset_path pointed at the local file).

Each side scores all examples once per round; rounds interleave the sides (rotating order)
and each side's time is the median over --repeats rounds after one warm-up round.
Examples/s = examples / wall seconds of the whole evaluation (prompt building, tokenization,
scoring, metrics). lm-evaluation-harness runs at each of --lm-eval-batch (requests per
forward pass) and its best is the one compared; lmforge at --batch packed rows (each
holds one example's context and its four endings). The accuracies of both sides and the
largest per-example log-likelihood difference are printed as a check that both computed
the same thing.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from importlib import resources
from pathlib import Path

import torch

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lm_eval  # noqa: E402
from lm_eval.api.task import ConfigurableTask  # noqa: E402
from lm_eval.evaluator import evaluate  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks._yaml_loader import load_yaml  # noqa: E402

import lmforge  # noqa: E402
from lmforge.api import LM  # noqa: E402
from lmforge.eval.benchmarks import evaluate_benchmark  # noqa: E402
from lmforge.models import build, count_params, preset  # noqa: E402
from lmforge.tokenizer import train_tokenizer  # noqa: E402

MODELS = {
    "gpt-small-50k": dict(vocab_size=50257, max_seq_len=1024, dim=256, n_layers=4, n_heads=4),
    "gpt2-124m": dict(),
}
TEXT = (resources.files("lmforge") / "corpus" / "tinyshakespeare.txt").read_text(encoding="utf-8")


def write_examples(path: Path, n: int, seed: int = 0) -> Path:
    rnd = random.Random(seed)
    words = TEXT.split()

    def phrase(k: int) -> str:
        i = rnd.randrange(len(words) - k)
        return " ".join(words[i:i + k])

    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps({"ind": i, "activity_label": phrase(2).title(), "ctx_a": phrase(25) + ".",
                                "ctx_b": phrase(6), "endings": [phrase(15) + "." for _ in range(4)],
                                "label": rnd.randrange(4), "split": "val", "split_type": "indomain",
                                "source_id": f"bench~{i}"}) + "\n")
    return path


def make_model(root: Path, name: str) -> Path:
    tok = train_tokenizer(texts=TEXT.split("\n\n"), kind="bpe", vocab_size=8192)
    torch.manual_seed(0)
    model = build(preset("gpt2-124m", **MODELS[name]))
    return LM(model.eval(), tok).save(root / name, format="hf")


def lm_eval_task(data: Path, k: int, cache: Path) -> ConfigurableTask:
    cfg = load_yaml(Path(lm_eval.__file__).parent / "tasks" / "hellaswag" / "hellaswag.yaml", resolve_func=True)
    cfg.pop("tag", None)
    cfg.update(dataset_path="json", dataset_name=None,
               dataset_kwargs={"data_files": {"train": str(data), "validation": str(data)}, "cache_dir": str(cache)})
    task = ConfigurableTask(config=cfg)
    task.set_config(key="num_fewshot", value=k)
    task.set_fewshot_seed(seed=1234)
    return task


def run_lm_eval(lm: HFLM, task: ConfigurableTask) -> dict:
    task.set_fewshot_seed(seed=1234)  # as simple_evaluate does per run: every run draws the same shots
    out = evaluate(lm=lm, task_dict={"tasks": {"hellaswag": task}, "groups": {}}, log_samples=True)
    samples = sorted(out["samples"]["hellaswag"], key=lambda s: s["doc_id"])
    return {"acc": out["results"]["hellaswag"]["acc,none"], "acc_norm": out["results"]["hellaswag"]["acc_norm,none"],
            "lls": [[r[0][0] for r in s["resps"]] for s in samples]}


def run_lmforge(lm, data: Path, k: int, batch: int) -> dict:
    out = evaluate_benchmark(lm.model, lm.tokenizer, "hellaswag", data, num_fewshot=k, batch_size=batch)
    return {"acc": out["metrics"]["acc"], "acc_norm": out["metrics"]["acc_norm"],
            "lls": [s["loglikelihoods"] for s in out["samples"]]}


def timed(runs: dict, repeats: int) -> dict[str, tuple[float, dict]]:
    """Median wall seconds per run after one warm-up call each, interleaved in rotating order."""
    results = {label: fn() for label, fn in runs.items()}
    times: dict[str, list[float]] = {label: [] for label in runs}
    labels = list(runs)
    for r in range(repeats):
        for label in labels[r % len(labels):] + labels[:r % len(labels)]:
            t0 = time.perf_counter()
            results[label] = runs[label]()
            times[label].append(time.perf_counter() - t0)
    return {label: (statistics.median(times[label]), results[label]) for label in runs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["gpt-small-50k"], choices=list(MODELS))
    ap.add_argument("--examples", type=int, default=300)
    ap.add_argument("--shots", nargs="+", type=int, default=[0, 5])
    ap.add_argument("--batch", type=int, default=16, help="lmforge: packed rows per forward pass")
    ap.add_argument("--lm-eval-batch", nargs="+", type=int, default=[16, 64], help="lm-eval: requests per forward")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, lm_eval {lm_eval.__version__ if hasattr(lm_eval, '__version__') else '?'}, "
          f"{args.threads} threads, load {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = write_examples(root / "hellaswag_val.jsonl", args.examples)
        for name in args.models:
            model_dir = make_model(root, name)
            ours = lmforge.load(model_dir)
            print(f"\n{name}: {count_params(ours.model) / 1e6:.1f}M parameters, {args.examples} examples")
            theirs = {b: HFLM(pretrained=str(model_dir), batch_size=b, device="cpu") for b in args.lm_eval_batch}
            for k in args.shots:
                task = lm_eval_task(data, k, root / "datasets")
                runs = {f"lm-eval bs={b}": (lambda lm=theirs[b], task=task: run_lm_eval(lm, task))
                        for b in args.lm_eval_batch}
                runs[f"lmforge bs={args.batch}"] = lambda lm=ours, k=k: run_lmforge(lm, data, k, args.batch)
                out = timed(runs, args.repeats)
                best = min((label for label in out if label.startswith("lm-eval")), key=lambda lab: out[lab][0])
                mine = f"lmforge bs={args.batch}"
                diff = max(abs(a - b) for x, y in zip(out[mine][1]["lls"], out[best][1]["lls"]) for a, b in zip(x, y))
                print(f"  {k}-shot  (load {os.getloadavg()[0]:.1f})")
                for label, (seconds, res) in out.items():
                    print(f"    {label:<16} {seconds:7.2f} s  {args.examples / seconds:7.1f} examples/s  "
                          f"acc {res['acc']:.4f}  acc_norm {res['acc_norm']:.4f}")
                print(f"    lmforge / best lm-eval ({best}): {out[best][0] / out[mine][0]:.2f}x; "
                      f"max |ll difference| {diff:.2e}")


if __name__ == "__main__":
    main()
