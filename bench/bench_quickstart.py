"""`lmforge quickstart` against a minimal character-level GPT given the same wall time on
the same machine, both scored in bits per character on the last 10% of Tiny Shakespeare.

    python bench/bench_quickstart.py                  # 5 minutes each (10 in all)
    python bench/bench_quickstart.py --minutes 2
    python bench/bench_quickstart.py --ablation       # each training option alone and all together, 3 runs each
    python bench/bench_quickstart.py --ablation --runs 5 --only muon wsd --json ablation.json

The baseline follows nanoGPT's CPU recipe for Shakespeare (characters as tokens, 4 layers,
4 heads, width 128, context 64, batch 12, AdamW lr 1e-3 with betas (0.9, 0.99), 100 warmup
steps then cosine decay to 1e-4, weight decay 0.1, gradient clipping 1.0, no dropout), as
a plain PyTorch loop; its model is lmforge's GPT class configured like nanoGPT's. Its
schedule is stretched over the steps that fit in the budget (timed on its first steps).
The quickstart runs as the user would run it: `lmforge quickstart --minutes M`, in a
subprocess, its whole wall time counted (tokenizer, data, training, evaluation, samples).

--ablation runs, in one process on one machine, the character-level baseline, the quickstart
as it is, the quickstart with each training option of `lmforge pretrain` alone (its --set
options, ABLATIONS) and with all of them together; each --runs times (seeds 1337, 1338, ...),
interleaved run by run so that a change in the machine's load spreads over all of them, and
reports the median bits per character of each. About (2 + len(ABLATIONS)) * runs * minutes of
wall time: 3 runs of 5 minutes take 2.5 hours. Numbers from a machine shared with other work
are not results: record the load average with them (printed).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import lmforge
from lmforge.models import GPTConfig, build
from lmforge.quickstart import default_corpus, split_text


def char_baseline(text: str, minutes: float, seed: int = 1337) -> dict:
    started = time.monotonic()
    torch.manual_seed(seed)
    train_text, val_text = split_text(text)
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    train = torch.tensor([index[c] for c in train_text])
    val = torch.tensor([index[c] for c in val_text])
    T, B = 64, 12
    model = build(GPTConfig(vocab_size=len(chars), max_seq_len=T, dim=128, n_layers=4, n_heads=4, dropout=0.0))
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.99))

    def batch():
        starts = torch.randint(len(train) - T - 1, (B,))
        rows = torch.stack([train[s:s + T + 1] for s in starts])
        return rows[:, :-1], rows[:, 1:]

    def lr_at(step: int, total: int) -> float:
        if step < 100:
            return 1e-3 * (step + 1) / 100
        progress = min(1.0, (step - 100) / max(1, total - 100))
        return 1e-4 + 0.5 * (1 + math.cos(math.pi * progress)) * (1e-3 - 1e-4)

    def train_step(step: int, total: int) -> None:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total)
        x, y = batch()
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    eval_reserve = 20.0
    t0 = time.monotonic()
    for step in range(20):  # time the first steps to size the schedule
        train_step(step, 10**9)
    per_step = (time.monotonic() - t0) / 20
    total = 20 + int((minutes * 60 - (time.monotonic() - started) - eval_reserve) / per_step)
    step = 20
    deadline = started + minutes * 60 - eval_reserve
    while step < total and time.monotonic() < deadline:
        train_step(step, total)
        step += 1
    model.eval()
    nll, n = 0.0, 0
    with torch.no_grad():  # disjoint windows of T characters over the held-out text
        for s in range(0, len(val) - 1, T * 32):
            chunk = val[s:s + T * 32 + 1]
            rows = (len(chunk) - 1) // T
            if rows == 0:
                break
            x = chunk[: rows * T].view(rows, T)
            y = chunk[1: rows * T + 1].view(rows, T)
            nll += F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="sum").item()
            n += y.numel()
    return {"bits_per_char": nll / n / math.log(2), "nats_per_char": nll / n, "steps": step,
            "seconds": time.monotonic() - started}


# Each training option alone, as the quickstart's --set options (the pretraining config's keys).
ABLATIONS: dict[str, dict] = {
    "Muon (matrices), AdamW (rest)": {"optim.optimizer": "muon"},
    "warmup-stable-decay schedule": {"optim.schedule": "wsd"},
    "ReLU^2 MLP": {"model.overrides.act": "relu2"},
    "QK-norm": {"model.overrides.qk_norm": True},
    "untied head": {"model.overrides.tie_embeddings": False},
    "logit soft-capping (30)": {"model.overrides.logit_softcap": 30.0},
    "zero-initialised output projections": {"model.overrides.zero_init_proj": True},
    "value embeddings (2 tables, all 4 layers)": {"model.overrides.value_embeds": 2},
}


def quickstart_run(minutes: float, out: Path, overrides: dict | None = None, seed: int = 1337) -> dict:
    started = time.monotonic()
    cmd = [sys.executable, "-m", "lmforge", "quickstart", "--minutes", str(minutes), "--out", str(out),
           "--seed", str(seed)]
    if overrides:
        cmd += ["--set", *(f"{k}={json.dumps(v)}" for k, v in overrides.items())]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"quickstart failed:\n{r.stderr[-3000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    return {**metrics, "wall_seconds": time.monotonic() - started}


def ablation_variants(only: list[str] | None = None) -> dict[str, dict]:
    """Name -> --set options: the quickstart as it is, each option alone, and all together.
    only: keep the options whose name or --set options contain one of these words (all otherwise)."""
    picked = {name: o for name, o in ABLATIONS.items()
              if not only or any(word.lower() in f"{name} {json.dumps(o)}".lower() for word in only)}
    together = {k: v for o in picked.values() for k, v in o.items()}
    return {"quickstart as it is": {}, **picked, **({"all of the above together": together} if len(picked) > 1 else {})}


def ablation(text: str, minutes: float, runs: int, only: list[str] | None) -> dict:
    """{name: [metrics of each run]}, the character baseline under "baseline"; runs interleaved."""
    variants = ablation_variants(only)
    results: dict[str, list[dict]] = {"baseline": [], **{name: [] for name in variants}}
    loads = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(runs):
            seed = 1337 + r
            results["baseline"].append(char_baseline(text, minutes, seed))
            for i, (name, overrides) in enumerate(variants.items()):
                results[name].append(quickstart_run(minutes, Path(tmp) / f"qs{r}-{i}", overrides, seed))
                print(f"run {r + 1}/{runs} {name}: {results[name][-1]['bits_per_char']:.3f} bits per char",
                      file=sys.stderr)
            loads.append(os.getloadavg()[0])
    return {"results": results, "variants": variants, "load_averages": loads}


def print_ablation(report: dict, minutes: float) -> None:
    results, base = report["results"], report["results"]["baseline"]
    ref = statistics.median(m["bits_per_char"] for m in results["quickstart as it is"])
    print(f"| run ({minutes:g} minutes each) | --set | median bits per char | runs | median steps | vs as it is |")
    print("|---|---|---|---|---|---|")
    base_bpc = [m["bits_per_char"] for m in base]
    print(f"| character-level GPT, nanoGPT CPU recipe | | {statistics.median(base_bpc):.3f} | "
          f"{', '.join(f'{b:.3f}' for b in base_bpc)} | {statistics.median(m['steps'] for m in base):,.0f} | |")
    for name, overrides in report["variants"].items():
        bpc = [m["bits_per_char"] for m in results[name]]
        options = " ".join(f"{k}={json.dumps(v)}" for k, v in overrides.items())
        print(f"| {name} | {options} | {statistics.median(bpc):.3f} | {', '.join(f'{b:.3f}' for b in bpc)} | "
              f"{statistics.median(m['steps'] for m in results[name]):,.0f} | "
              f"{statistics.median(bpc) - ref:+.3f} |")
    loads = ", ".join(f"{x:.1f}" for x in report["load_averages"])
    print(f"torch {torch.__version__}, lmforge {lmforge.__version__}, {os.cpu_count()} cores, "
          f"{torch.get_num_threads()} threads, load average (1 min) before and after each round: {loads}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=5.0)
    p.add_argument("--ablation", action="store_true", help="each training option alone and together (see above)")
    p.add_argument("--runs", type=int, default=3, help="--ablation: runs of each (the median is reported)")
    p.add_argument("--only", nargs="+", default=None,
                   help="--ablation: the options whose name or --set options have one of these words (muon, relu2)")
    p.add_argument("--json", default=None, help="--ablation: also write every run's metrics to this file")
    a = p.parse_args()
    text = default_corpus().read_text()
    if a.ablation:
        report = ablation(text, a.minutes, a.runs, a.only)
        print_ablation(report, a.minutes)
        if a.json:
            Path(a.json).write_text(json.dumps(report, indent=1, default=str))
        return
    load_before = os.getloadavg()[0]
    base = char_baseline(text, a.minutes)
    with tempfile.TemporaryDirectory() as tmp:
        ours = quickstart_run(a.minutes, Path(tmp) / "qs")
    load = os.getloadavg()[0]
    print("| run | wall time | steps | bits per char (last 10%) |")
    print("|---|---|---|---|")
    print(f"| lmforge quickstart (BPE, {ours['params']:,} params) | {ours['wall_seconds']:.0f} s | {ours['steps']:,} | "
          f"{ours['bits_per_char']:.3f} |")
    print(f"| character-level GPT, nanoGPT CPU recipe | {base['seconds']:.0f} s | {base['steps']:,} | "
          f"{base['bits_per_char']:.3f} |")
    print(f"torch {torch.__version__}, lmforge {lmforge.__version__}, {os.cpu_count()} cores, "
          f"{torch.get_num_threads()} threads, load average {load_before:.1f} before, {load:.1f} after")


if __name__ == "__main__":
    main()
