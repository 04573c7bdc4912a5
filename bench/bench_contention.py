"""Training beside a busy process: how much lmforge and transformers' Trainer each slow down
when another CPU-bound process holds a core.

    python bench/bench_contention.py --quick            # small sizes, a few minutes on 2 cores
    python bench/bench_contention.py --rounds 3         # the sizes below

Two jobs, each run by both frameworks from the same weights and data:
- finetune: a small random-init BERT classifying AG News (bench_finetune.py's setup: same base
  model with its head, same hyperparameters; lmforge.tasks.finetune against the Trainer);
- pretrain: a GPT-2-shaped model (gpt-tiny, 256 byte tokens) on Tiny Shakespeare, the same
  fixed batches: lmforge's train() loop with the clm objective against the Trainer on
  GPT2LMHeadModel of the same shape.

Every run is a fresh process, as a user starts it: the lmforge worker imports lmforge first
(so its thread defaults apply), the Trainer's worker imports torch and transformers first.
Each job runs quiet and then "busy": beside a competing process (pure-Python busy loop, one
core's worth, `--competitor-nice` to nice it) that the benchmark starts just before the run
and stops right after it (and that stops itself after --competitor-max-s in any case).
Rounds interleave (lmforge, Trainer, rotating who goes first); the table gives the median
wall time of each (framework, job, condition) and the slowdown busy / quiet. The load average
is printed before and after: on a shared machine, "quiet" is only as quiet as the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BUSY = "import time\nend = time.time() + {limit}\nwhile time.time() < end:\n    pass\n"


def load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


# ----------------------------------------------------------------------------- the workers (one per process)


def pretrain_batches(steps: int, batch: int, seq: int) -> list[dict]:
    import torch

    text = (HERE.parent.parent / "shared" / "data" / "tinyshakespeare.txt").read_bytes()
    data = torch.tensor(list(text), dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    starts = torch.randint(0, len(data) - seq - 1, (steps, batch), generator=g)
    return [{"input_ids": torch.stack([data[s: s + seq] for s in row.tolist()]),
             "labels": torch.stack([data[s + 1: s + seq + 1] for s in row.tolist()])} for row in starts]


def _imports(framework: str) -> None:
    """As a user's program starts: lmforge first (its thread defaults apply before torch loads
    OpenMP); "lmforge-torch-first": torch first, so OpenMP keeps its own defaults (spinning idle
    threads), as lmforge ran before it set them; transformers' users import torch first."""
    if framework == "lmforge":
        import lmforge  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import lmforge  # noqa: F401, F811


def worker_pretrain(framework: str, a: argparse.Namespace) -> float:
    shape = dict(vocab_size=256, dim=a.dim, n_layers=a.layers, n_heads=max(2, a.dim // 64), max_seq_len=a.seq)
    _imports(framework)
    if framework.startswith("lmforge"):

        sys.path.insert(0, str(HERE))
        import torch

        from bench_train import Setting, run_lmforge
        from lmforge.models import build, preset
        from lmforge.train.objectives import clm

        torch.manual_seed(0)
        model = build(preset("gpt-tiny", **shape))
        batches = pretrain_batches(a.steps, a.batch, a.seq)
        ns = argparse.Namespace(steps=a.steps, warmup=0, device="cpu", compile=False, log_every=10_000)
        with tempfile.TemporaryDirectory() as out:
            steps = run_lmforge(model, batches, ns, Setting({}, a.batch, a.seq, 1e-3, 0.0), out, objective=clm)
        return sum(w for w, _ in steps)
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=256, n_positions=a.seq, n_embd=a.dim, n_layer=a.layers, n_head=shape["n_heads"],
                        bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config)
    rows = [{"input_ids": b["input_ids"][i], "labels": b["input_ids"][i]}  # the model shifts the labels itself
            for b in pretrain_batches(a.steps, a.batch, a.seq) for i in range(a.batch)]
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, max_steps=a.steps, per_device_train_batch_size=a.batch,
                                 learning_rate=1e-3, warmup_steps=2, lr_scheduler_type="cosine", max_grad_norm=1.0,
                                 weight_decay=0.1, save_strategy="no", logging_steps=10_000, report_to=[],
                                 use_cpu=True, dataloader_num_workers=0, disable_tqdm=True, seed=0)
        trainer = Trainer(model=model, args=args, train_dataset=rows)
        t0 = time.perf_counter()
        trainer.train()
        return time.perf_counter() - t0


def worker_finetune(framework: str, a: argparse.Namespace) -> float:
    _imports(framework)
    sys.path.insert(0, str(HERE))
    import bench_finetune as bf

    root = Path(a.root)
    hp = {"batch_size": 16, "warmup": 0.1, "weight_decay": 0.01, "device": "cpu", "max_length": 128,
          "lr": 5e-4, "seed": 42, "epochs": a.epochs}
    out = Path(tempfile.mkdtemp(dir=root))
    if framework.startswith("lmforge"):
        return bf.lmforge_run("classify", root / "base_classify", root / "ag_train.csv", root / "ag_valid.csv", out,
                              hp, a.ag[0])["seconds"]
    return bf.hf_classify(root / "base_classify", root / "ag_train.csv", root / "ag_valid.csv", out, hp)["seconds"]


# ----------------------------------------------------------------------------- the driver


def prepare(root: Path, a: argparse.Namespace) -> None:
    """The fine-tuning data and its base model, once (both frameworks start from them)."""
    sys.path.insert(0, str(HERE))
    import bench_finetune as bf

    train, _ = bf.write_ag_news(root, *a.ag)
    data = bf.read_classification(train)
    bf.make_bases(root, data.texts, {"classify": data.label_names, "ner": ["O", "B-X", "I-X"]}, a.bert_dim, 2)


def run_one(job: str, framework: str, busy: bool, a: argparse.Namespace, root: Path) -> float:
    argv = [sys.executable, __file__, "--worker", job, framework, "--root", str(root), *a.passthrough]
    competitor = None
    if busy:
        competitor = subprocess.Popen(["nice", "-n", str(a.competitor_nice), sys.executable, "-c",
                                       BUSY.format(limit=a.competitor_max_s)])
        time.sleep(0.5)  # let it take its core
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=a.competitor_max_s)
    finally:
        if competitor is not None:
            competitor.kill()
            competitor.wait()
    if done.returncode != 0:
        raise SystemExit(f"{job}/{framework} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["seconds"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes (a few minutes on 2 cores)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--jobs", nargs="+", default=["finetune", "pretrain"], choices=["finetune", "pretrain"])
    p.add_argument("--frameworks", nargs="+", default=["lmforge", "transformers"],
                   choices=["lmforge", "lmforge-torch-first", "transformers"],
                   help="lmforge-torch-first: lmforge without its OpenMP defaults (torch imported first), for an A/B")
    p.add_argument("--competitor-nice", type=int, default=0, help="niceness of the competing process")
    p.add_argument("--competitor-max-s", type=int, default=1800, help="the competitor stops itself after this")
    p.add_argument("--steps", type=int, default=60, help="pretraining steps")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--dim", type=int, default=192, help="the pretrained GPT's width")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--bert-dim", type=int, default=128)
    p.add_argument("--ag", type=int, nargs=2, default=[1500, 500], metavar=("TRAIN", "VALID"))
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--worker", nargs=2, default=None, help=argparse.SUPPRESS)
    p.add_argument("--root", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.quick:
        a.steps, a.dim, a.layers, a.ag, a.epochs = 20, 128, 2, [300, 100], 1
    if a.worker is not None:
        job, framework = a.worker
        seconds = (worker_finetune if job == "finetune" else worker_pretrain)(framework, a)
        print(json.dumps({"seconds": seconds}))
        return
    a.passthrough = ["--steps", str(a.steps), "--batch", str(a.batch), "--seq", str(a.seq), "--dim", str(a.dim),
                     "--layers", str(a.layers), "--ag", *map(str, a.ag), "--epochs", str(a.epochs)]
    loads = [load()]
    times: dict[tuple[str, str, bool], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if "finetune" in a.jobs:
            prepare(root, a)
        for r in range(a.rounds):
            for job in a.jobs:
                for busy in (False, True):
                    k = r % len(a.frameworks)
                    for framework in a.frameworks[k:] + a.frameworks[:k]:  # rotating who goes first
                        t = run_one(job, framework, busy, a, root)
                        times.setdefault((job, framework, busy), []).append(t)
                        print(json.dumps({"round": r, "job": job, "framework": framework, "busy": busy,
                                          "seconds": round(t, 2), "load": load()}), file=sys.stderr)
    loads.append(load())
    report(times, a, loads)


def report(times: dict, a: argparse.Namespace, loads: list[str]) -> None:
    import torch
    import transformers

    import lmforge

    print(f"\nTraining beside a busy process ({'nice ' + str(a.competitor_nice) if a.competitor_nice else 'not niced'}"
          f"), {a.rounds} rounds, medians; {platform.machine()}, {os.cpu_count()} CPUs "
          f"({len(os.sched_getaffinity(0))} usable), load average (1/5/15 min) {loads[0]} -> {loads[1]}; "
          f"lmforge {lmforge.__version__}, transformers {transformers.__version__}, torch {torch.__version__}\n")
    print("| job | framework | quiet s | busy s | slowdown (busy / quiet) |")
    print("|---|---|---|---|---|")
    for job in a.jobs:
        what = (f"finetune (BERT dim {a.bert_dim}, AG News {a.ag[0]}, {a.epochs} ep)" if job == "finetune" else
                f"pretrain (GPT dim {a.dim}, {a.layers} layers, {a.steps} steps of {a.batch}x{a.seq})")
        for framework in a.frameworks:
            quiet, busy = (statistics.median(times[job, framework, b]) for b in (False, True))
            print(f"| {what} | {framework} | {quiet:.1f} | {busy:.1f} | {busy / quiet:.2f}x |")
    print(f"\ncommand: {' '.join([Path(sys.executable).name, *sys.argv])}")


if __name__ == "__main__":
    main()
