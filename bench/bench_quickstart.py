"""`lmforge quickstart` against a minimal character-level GPT given the same wall time on
the same machine, both scored in bits per character on the last 10% of Tiny Shakespeare.

    python bench/bench_quickstart.py                  # 5 minutes each (10 in all)
    python bench/bench_quickstart.py --minutes 2

The baseline follows nanoGPT's CPU recipe for Shakespeare (characters as tokens, 4 layers,
4 heads, width 128, context 64, batch 12, AdamW lr 1e-3 with betas (0.9, 0.99), 100 warmup
steps then cosine decay to 1e-4, weight decay 0.1, gradient clipping 1.0, no dropout), as
a plain PyTorch loop; its model is lmforge's GPT class configured like nanoGPT's. Its
schedule is stretched over the steps that fit in the budget (timed on its first steps).
The quickstart runs as the user would run it: `lmforge quickstart --minutes M`, in a
subprocess, its whole wall time counted (tokenizer, data, training, evaluation, samples).
"""

from __future__ import annotations

import argparse
import json
import math
import os
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


def quickstart_run(minutes: float, out: Path) -> dict:
    started = time.monotonic()
    cmd = [sys.executable, "-m", "lmforge", "quickstart", "--minutes", str(minutes), "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"quickstart failed:\n{r.stderr[-3000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    return {**metrics, "wall_seconds": time.monotonic() - started}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=5.0)
    a = p.parse_args()
    text = default_corpus().read_text()
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
