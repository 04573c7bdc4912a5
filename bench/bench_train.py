"""Training throughput: lmforge's loop and objective against a plain PyTorch loop, same model,
same batches, same process, same device.

    python bench/bench_train.py                                  # CUDA: the quickstart's GPU model, bf16
    python bench/bench_train.py --device cpu --threads 1 2       # CPU: the quickstart's CPU model, fp32

Three ways to take one optimizer step of the same GPT on the same batch:
- "plain": model(input_ids) -> full (B, T, V) logits -> F.cross_entropy (mean), backward,
  clip the gradient norm to 1, torch.optim.AdamW (torch's default implementation) step,
  zero_grad -- the loop everyone writes first (nanoGPT's, without its extras);
- "plain + clm objective": the same loop around lmforge.train.objectives.clm (the chunked
  linear cross-entropy on the hidden states, summed, divided by the token count);
- "lmforge train()": lmforge.train.loop.train itself for --steps steps (its AdamW, gradient
  scaling by the step's token count, clipping, NaN skip, scheduler, logging every
  --log-every steps), timed from inside: the batch iterator stamps the clocks each time the
  loop takes a batch, so setup and the final checkpoint are not counted.

Each variant starts from the same initial weights and runs --steps steps per round; the
first --warmup steps of a round are dropped; rounds are interleaved (--rounds of them, in
rotating order) so that load from other processes on a shared machine hits all alike. A
step is timed by the wall clock and by the process's CPU time (all threads; steadier on a
loaded machine, where waiting for a core is not counted); the tables give medians. On CUDA
both sides run under bf16 autocast and every step ends with a synchronisation (so that a
step's time is its own, for both sides alike). The load average is printed before and after.

Models: "quickstart-cpu" (4 layers, dim 192, 2048-token vocabulary, sequences of 128,
batch 16: the quickstart's CPU recipe), "gpt-tiny-8k" (the gpt-tiny preset with an 8192-token
vocabulary, where the loss head is most of the work), "quickstart-gpu" (6 layers, dim 384, 4096
tokens, sequences of 256, batch 64), "gpt2-124m" (sequences of 1024, batch 8); --batch/--seq override.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time
from collections.abc import Container
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import lmforge
from lmforge.config import load_config
from lmforge.models import build, count_params, preset
from lmforge.train.loop import train
from lmforge.train.objectives import clm


@dataclass
class Setting:
    overrides: dict
    batch: int
    seq: int
    lr: float
    dropout: float


SETTINGS = {
    "quickstart-cpu": Setting(dict(vocab_size=2048, dim=192, n_layers=4, n_heads=4), 16, 128, 2e-3, 0.0),
    "gpt-tiny-8k": Setting(dict(vocab_size=8192, dim=128, n_layers=4, n_heads=4), 16, 128, 1e-3, 0.0),
    "quickstart-gpu": Setting(dict(vocab_size=4096, dim=384, n_layers=6, n_heads=6), 64, 256, 1e-3, 0.2),
    "gpt2-124m": Setting(dict(vocab_size=50257, dim=768, n_layers=12, n_heads=12), 8, 1024, 6e-4, 0.0),
}


def load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


class StampedBatches:
    """The loop's BatchIterator over a fixed list of batches, cycled; every `next` records
    (wall, CPU) clock readings, so that the loop's steps can be timed from inside.

    sync: True waits for the GPU before every stamp (each step's time is its own); a set of
    positions waits only before those stamps (the first timed step and the end of a round),
    so that the host runs ahead of the device between them as in real training, and only
    the round's total time is exact; False never waits (CPU)."""

    def __init__(self, batches: list[dict], sync: bool | Container[int]) -> None:
        self.batches, self.sync, self.pos, self.stamps = batches, sync, 0, []

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self.sync is True or (self.sync is not False and self.pos in self.sync):
            torch.cuda.synchronize()
        self.stamps.append((time.perf_counter(), time.process_time()))
        batch = self.batches[self.pos % len(self.batches)]
        self.pos += 1
        return batch

    def state_dict(self) -> dict:
        return {"pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.pos = state["pos"]


def step_times(stamps: list[tuple[float, float]], warmup: int) -> list[tuple[float, float]]:
    """(wall, CPU) seconds of each step after the first `warmup` ones, from consecutive stamps."""
    return [(b[0] - a[0], b[1] - a[1]) for a, b in zip(stamps[warmup:], stamps[warmup + 1:])]


def round_sync(a: argparse.Namespace) -> set[int]:
    """StampedBatches' sync positions that time a round as a whole: its first timed step's
    stamp and its last stamp (pass as `sync=` to run_lmforge / run_plain)."""
    return {a.warmup, a.steps}


def random_batches(vocab_size: int, batch: int, seq: int, n: int = 4) -> list[dict]:
    """n causal-LM batches of random tokens: input_ids and labels (the next tokens), (batch, seq)."""
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(n):
        w = torch.randint(0, vocab_size, (batch, seq + 1), generator=gen)
        batches.append({"input_ids": w[:, :-1].contiguous(), "labels": w[:, 1:].contiguous()})
    return batches


def run_lmforge(model, batches, a, setting: Setting, out_dir: str, objective=clm,
                sync: bool | Container[int] | None = None) -> list[tuple[float, float]]:
    """lmforge's train() for --steps steps (+1, see below) -> (wall, CPU) seconds of each step
    after the warm-up. sync: as StampedBatches (None: every step on CUDA, never on CPU)."""
    config = load_config(None, {
        "model.preset": "gpt-tiny", "data.seq_len": setting.seq, "optim.lr": setting.lr,
        "optim.warmup_steps": 2, "train.micro_batch_size": setting.batch, "train.max_steps": a.steps + 1,
        "train.device": a.device, "train.precision": "bf16" if a.device == "cuda" else "fp32",
        "train.compile": a.compile, "train.out_dir": out_dir, "train.resume": "none",
        "eval.every": 0, "eval.at_end": False, "checkpoint.every": 0, "log.every": a.log_every,
        "log.progress": False, "log.tensorboard": False, "log.plot": False, "dist.strategy": "none"})
    stamped = StampedBatches(batches, a.device == "cuda" if sync is None else sync)
    train(model, objective, stamped, config)
    # Stamps: one per step (the step's batch); the last step ends at the stamp of a batch that is
    # never trained on, as max_steps is one more than --steps.
    return step_times(stamped.stamps, a.warmup)


def plain_loss(model, batch) -> torch.Tensor:
    logits = model(batch["input_ids"])  # (B, T, V)
    return F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten())


def objective_loss(model, batch) -> torch.Tensor:
    out = clm(model, batch)
    return out.loss / out.count


def run_plain(model, batches, a, setting: Setting, loss_fn, fused: bool = False,
              sync: bool | Container[int] | None = None) -> list[tuple[float, float]]:
    """The plain loop for --steps steps, timed as run_lmforge; fused: torch's fused AdamW
    kernel instead of its default implementation."""
    model = model.to(a.device).train()
    if a.compile:
        model = torch.compile(model)
    opt = torch.optim.AdamW(model.parameters(), lr=setting.lr, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=fused or None)
    amp = torch.autocast(a.device, dtype=torch.bfloat16, enabled=a.device == "cuda")
    stamped = StampedBatches(batches, a.device == "cuda" if sync is None else sync)
    for batch in stamped:
        if stamped.pos > a.steps:
            break
        batch = {k: v.to(a.device, non_blocking=True) for k, v in batch.items()}
        with amp:
            loss = loss_fn(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step_times(stamped.stamps, a.warmup)


def bench(name: str, threads: int, a: argparse.Namespace) -> list[dict]:
    torch.set_num_threads(threads)
    s = SETTINGS[name]
    batch, seq = a.batch or s.batch, a.seq or s.seq
    torch.manual_seed(0)
    cfg = preset("gpt-tiny", **s.overrides, max_seq_len=seq, dropout=s.dropout)
    initial = build(cfg)
    batches = random_batches(cfg.vocab_size, batch, seq)
    setting = Setting(s.overrides, batch, seq, s.lr, s.dropout)
    variants = {
        "plain": lambda out: run_plain(copy.deepcopy(initial), batches, a, setting, plain_loss),
        "plain + clm objective": lambda out: run_plain(copy.deepcopy(initial), batches, a, setting, objective_loss),
        "lmforge train()": lambda out: run_lmforge(copy.deepcopy(initial), batches, a, setting, out),
    }
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in variants}
    labels = list(variants)
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            for label in labels[r % len(labels):] + labels[: r % len(labels)]:
                times[label] += variants[label](os.path.join(tmp, f"run{r}"))
    rows = []
    base_wall = statistics.median(t[0] for t in times["plain"])
    base_cpu = statistics.median(t[1] for t in times["plain"])
    for label, ts in times.items():
        wall, cpu = statistics.median(t[0] for t in ts), statistics.median(t[1] for t in ts)
        rows.append(dict(model=name, params=count_params(initial), threads=threads, shape=f"{batch}x{seq}",
                         impl=label, tok_s=batch * seq / wall, wall_ms=wall * 1e3, cpu_ms=cpu * 1e3,
                         speedup=base_wall / wall, cpu_speedup=base_cpu / cpu, n=len(ts)))
        print(f"  {name} threads {threads} {label}: {batch * seq / wall:,.0f} tok/s, {wall * 1e3:.1f} ms/step wall, "
              f"{cpu * 1e3:.1f} ms/step CPU ({len(ts)} steps; load {load()})", flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    p.add_argument("--models", nargs="+", default=None, choices=list(SETTINGS),
                   help="default: quickstart-gpu on CUDA, quickstart-cpu on CPU")
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads()],
                   help="torch CPU thread counts to measure (each a separate set of rounds)")
    p.add_argument("--batch", type=int, default=None, help="sequences per step (default: the model's setting)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (default: the model's setting)")
    p.add_argument("--steps", type=int, default=12, help="steps per round")
    p.add_argument("--warmup", type=int, default=2, help="steps dropped at the start of each round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--log-every", type=int, default=10, help="lmforge's log.every (its only host syncs)")
    p.add_argument("--compile", action="store_true", help="torch.compile: lmforge's blocks, the plain model")
    a = p.parse_args()
    models = a.models or (["quickstart-gpu"] if a.device == "cuda" else ["quickstart-cpu"])
    device_name = torch.cuda.get_device_name() if a.device == "cuda" else "CPU"
    print(f"torch {torch.__version__}, lmforge {lmforge.__version__}, {device_name}, "
          f"{'bf16 autocast' if a.device == 'cuda' else 'fp32'}, {a.rounds} rounds x {a.steps} steps "
          f"({a.warmup} dropped), compile={a.compile}, load average {load()}")
    rows = [row for name in models for threads in a.threads for row in bench(name, threads, a)]
    print(f"\nload average at the end: {load()}")
    print("\n| model | params | threads | batch x seq | implementation | tokens/s (wall) | ms/step (wall) | "
          "ms/step (CPU) | vs plain (wall) | vs plain (CPU) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['params'] / 1e6:.1f}M | {r['threads']} | {r['shape']} | {r['impl']} | "
              f"{r['tok_s']:,.0f} | {r['wall_ms']:.1f} | {r['cpu_ms']:.1f} | {r['speedup']:.2f}x | "
              f"{r['cpu_speedup']:.2f}x |")


if __name__ == "__main__":
    main()
