"""Planner accuracy: predicted vs measured peak memory and step time of real training steps.

Runs `lmforge.plan.verify_plan` for gpt2-124m, bert-base and llama-small at settings
that take seconds per step on a small CPU (or on the GPU with --device cuda), and prints
a markdown table. The prediction for a CPU comes from device "cpu" (this machine
measured: GEMM peak, the step's parts timed here); for CUDA from "measured" too, and
with --named-gpu from the H100 datasheet and its assumed MFU.

    python bench/bench_plan.py                 # CPU, the default grid
    python bench/bench_plan.py --device cuda   # on a GPU, bigger batches
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from lmforge.plan import make_plan
from lmforge.plan.verify import verify_plan

CPU_GRID = [
    ("gpt2-124m", dict(seq_len=256, batch_size=2, precision="fp32")),
    ("gpt2-124m", dict(seq_len=256, batch_size=2, precision="bf16")),
    ("bert-base", dict(seq_len=128, batch_size=2, precision="fp32")),
    ("bert-base", dict(seq_len=128, batch_size=4, precision="bf16")),
    ("llama-small", dict(seq_len=256, batch_size=1, precision="fp32")),
    ("llama-small", dict(seq_len=256, batch_size=2, precision="bf16", activation_checkpointing=True)),
]
CUDA_GRID = [
    ("gpt2-124m", dict(seq_len=1024, batch_size=16, precision="bf16")),
    ("gpt2-124m", dict(seq_len=1024, batch_size=8, precision="fp32")),
    ("bert-base", dict(seq_len=512, batch_size=32, precision="bf16")),
    ("llama-small", dict(seq_len=2048, batch_size=8, precision="bf16")),
    ("llama-small", dict(seq_len=2048, batch_size=16, precision="bf16", activation_checkpointing=True)),
]


def describe(kw: dict) -> str:
    parts = [f"B={kw['batch_size']}", f"T={kw['seq_len']}", kw["precision"]]
    if kw.get("activation_checkpointing"):
        parts.append("AC")
    return " ".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--named-gpu", default=None, help="predict CUDA runs from a datasheet device (h100, a100)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps (the fastest counts)")
    ap.add_argument("--only", default=None, help="run only this preset")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--clock", choices=("wall", "process"), default="wall",
                    help="process: CPU seconds, robust on a shared CPU (use with --threads 1)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    grid = CUDA_GRID if args.device == "cuda" else CPU_GRID
    device = args.named_gpu or ("measured" if args.device == "cuda" else "cpu")
    print(f"date {time.strftime('%Y-%m-%d')}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, {args.clock} clock, load average at start {os.getloadavg()[0]:.1f}")
    print()
    print("| preset | setting | predicted peak | measured peak | error | predicted step | measured step | error "
          "| peak at |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, kw in grid:
        if args.only and name != args.only:
            continue
        plan = make_plan(name, device=device, **kw)
        r = verify_plan(plan, steps=args.steps, device=args.device, clock=args.clock)
        mib = 2**20
        print(f"| {name} | {describe(kw)} | {r['predicted_peak_bytes'] / mib:.0f} MiB | "
              f"{r['measured_peak_bytes'] / mib:.0f} MiB | {r['peak_error'] * 100:+.1f}% | "
              f"{r['predicted_step_seconds']:.3f} s | {r['measured_step_seconds']:.3f} s | "
              f"{r['time_error'] * 100:+.1f}% | {r['predicted_peak_moment']} |", flush=True)
    print()
    print(f"load average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
