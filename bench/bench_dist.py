"""Scaling on this machine: one training process against two under torchrun (DDP and FSDP2,
gloo on CPU; NCCL on GPUs), the same global batch, and the communication each step sends
against the planner's prediction (lmforge.plan: `communication`).

    python bench/bench_dist.py                        # CPU: 1 process x 1 thread, 1 x 2 threads, 2 x 1 (ddp, fsdp)
    python bench/bench_dist.py --steps 20 --rounds 3

Every variant trains the same GPT (dim 128, 4 layers, 2048-token vocabulary, sequences of
128) with lmforge.train.loop.train on random tokens, global batch 16 sequences as micro-
batches x train.grad_accum 2 x processes, fp32. A step is timed from inside (the batch
iterator stamps the clocks when the loop takes a step's first micro-batch, on rank 0); the
first --warmup steps are dropped; variants are interleaved over --rounds rounds and the
tables give the median step. tokens/s counts every process's tokens; efficiency is the
two-process tokens/s over twice the one-process-one-thread tokens/s (1.0: perfect scaling).
cpu efficiency compares CPU time instead (one process's per step over the sum of the two
processes'): the work distribution adds, which a loaded shared machine disturbs less than
the wall clock (a process waiting for a core is not counted).

Communication is counted in the worker by wrapping the collectives (torch.distributed's
all_gather_single / all_gather_into_tensor, reduce_scatter_single / reduce_scatter_tensor
and all_reduce, which FSDP2 and lmforge's loop call; a DDP comm hook for DDP's gradient
buckets): the bytes of the tensors each collective moves, per optimizer step, by kind. The
planner predicts the same quantities from the architecture alone; "sent" converts both to
what each device sends in a ring ((d-1)/d of an all-gather or reduce-scatter, 2(d-1)/d of
an all-reduce), the NCCL bus-bandwidth convention, not a measurement of gloo's wire bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

DIM, LAYERS, HEADS, VOCAB, SEQ, GLOBAL_BATCH, ACCUM = 128, 4, 4, 2048, 128, 16, 2


# ----------------------------------------------------------------------------- the worker (one process)

COUNTS: dict[str, int] = defaultdict(int)


def _count_collectives() -> None:
    """Wrap the collectives FSDP2 and the loop call so that each adds its tensors' bytes."""
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel

    from lmforge.dist import parallel

    def wrap(name: str, kind: str, which: str):
        fn = getattr(dist, name, None)
        if fn is None:
            return

        def counted(*args, **kwargs):
            t = kwargs[which] if which in kwargs else args[0 if which in ("output", "output_tensor", "tensor") else 1]
            COUNTS[kind] += t.numel() * t.element_size()
            return fn(*args, **kwargs)
        setattr(dist, name, counted)

    wrap("all_gather_single", "all_gather", "output_tensor")  # the whole gathered tensor
    wrap("all_gather_into_tensor", "all_gather", "output_tensor")
    wrap("reduce_scatter_single", "reduce_scatter", "input")  # the whole tensor reduced
    wrap("reduce_scatter_tensor", "reduce_scatter", "input")
    wrap("all_reduce", "all_reduce_small", "tensor")  # the loop's scalars, the gradient norm

    def hook(state, bucket):  # DDP's own all-reduce of a gradient bucket, counted apart from the scalars
        buffer = bucket.buffer()
        COUNTS["all_reduce"] += buffer.numel() * buffer.element_size()
        COUNTS["all_reduce_small"] -= buffer.numel() * buffer.element_size()  # the hook's dist.all_reduce
        return default_hooks.allreduce_hook(None, bucket)

    class CountingDDP(DistributedDataParallel):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.register_comm_hook(None, hook)

    parallel.DistributedDataParallel = CountingDDP


class Batches:
    """Random tokens, this process's micro-batch of each global micro-batch; stamps the
    clocks and the collective counters at each step's first micro-batch."""

    def __init__(self, rank: int, world: int, micro: int) -> None:
        self.rank, self.world, self.micro, self.index = rank, world, micro, 0
        self.stamps: list[tuple[float, float, dict[str, int]]] = []

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        import torch

        if self.index % ACCUM == 0:
            self.stamps.append((time.perf_counter(), time.process_time(), dict(COUNTS)))
        g = torch.Generator().manual_seed(self.index * 1000 + self.rank)
        w = torch.randint(0, VOCAB, (self.micro, SEQ + 1), generator=g)
        self.index += 1
        return {"input_ids": w[:, :-1].contiguous(), "labels": w[:, 1:].contiguous()}

    def state_dict(self) -> dict:
        return {"index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.index = state["index"]


def worker(out: Path, strategy: str, steps: int, warmup: int) -> None:
    import torch

    from lmforge.config import load_config
    from lmforge.models import GPTConfig, build
    from lmforge.train.loop import train
    from lmforge.train.objectives import clm

    _count_collectives()
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    micro = GLOBAL_BATCH // ACCUM // world
    with tempfile.TemporaryDirectory() as tmp:
        config = load_config(None, {
            "train.out_dir": tmp, "train.device": "cpu", "train.precision": "fp32", "train.max_steps": steps + 1,
            "train.grad_accum": ACCUM, "train.micro_batch_size": micro, "train.resume": "none",
            "optim.warmup_steps": 0, "optim.lr": 1e-3, "log.every": 1000, "log.progress": False,
            "log.tensorboard": False, "log.plot": False, "eval.every": 0, "checkpoint.every": 0,
            "data.seq_len": SEQ, "dist.strategy": strategy})
        torch.manual_seed(0)
        model = build(GPTConfig(vocab_size=VOCAB, max_seq_len=SEQ, dim=DIM, n_layers=LAYERS, n_heads=HEADS))
        batches = Batches(rank, world, micro)
        train(model, clm, batches, config)
    if rank != 0:
        return
    s = batches.stamps[warmup:steps + 1]  # stamp k: the start of step k + 1
    wall = [b[0] - a[0] for a, b in zip(s, s[1:])]
    cpu = [b[1] - a[1] for a, b in zip(s, s[1:])]
    n = len(s) - 1
    comm = {k: (s[-1][2].get(k, 0) - s[0][2].get(k, 0)) / n for k in set(s[-1][2]) | set(s[0][2])}
    out.write_text(json.dumps({"wall": wall, "cpu": cpu, "comm": comm, "world": world}))


# ----------------------------------------------------------------------------- the driver

VARIANTS = {  # name: (processes, threads per process, strategy)
    "1 process x 1 thread": (1, 1, "none"),
    "1 process x 2 threads": (1, 2, "none"),
    "2 processes x 1 thread, DDP": (2, 1, "ddp"),
    "2 processes x 1 thread, FSDP2": (2, 1, "fsdp"),
}


def run_variant(name: str, steps: int, warmup: int) -> dict:
    nproc, threads, strategy = VARIANTS[name]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        launcher = [sys.executable] if nproc == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        subprocess.run([*launcher, __file__, "--worker", str(out), strategy, str(steps), str(warmup)], env=env,
                       check=True, capture_output=True, text=True)
        return json.loads(out.read_text())


def predicted(strategy: str, world: int) -> dict:
    from lmforge.models import GPTConfig
    from lmforge.plan import make_plan

    config = GPTConfig(vocab_size=VOCAB, max_seq_len=SEQ, dim=DIM, n_layers=LAYERS, n_heads=HEADS)
    plan = make_plan(config, seq_len=SEQ, batch_size=GLOBAL_BATCH // ACCUM // world, grad_accum=ACCUM,
                     precision="fp32", devices=world, strategy=strategy, device="cpu")
    return plan.communication


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=12, help="timed optimizer steps per round (after warmup)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    import torch

    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, load average {os.getloadavg()}")
    results: dict[str, list[dict]] = defaultdict(list)
    names = list(VARIANTS)
    for r in range(a.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            results[name].append(run_variant(name, a.steps + a.warmup, a.warmup))
    print(f"load average after: {os.getloadavg()}")
    tokens = GLOBAL_BATCH * SEQ
    base = base_cpu = None
    print(f"\nGPT dim {DIM}, {LAYERS} layers, vocab {VOCAB}, seq {SEQ}; global batch {GLOBAL_BATCH} "
          f"(grad_accum {ACCUM}); median over {a.rounds} x {a.steps} steps")
    print(f"{'variant':32} {'step (wall)':>12} {'tokens/s':>10} {'efficiency':>10} {'step (cpu/proc)':>16} "
          f"{'cpu efficiency':>15}")
    for name in names:
        wall = statistics.median([w for res in results[name] for w in res["wall"]])
        cpu = statistics.median([c for res in results[name] for c in res["cpu"]])
        tps = tokens / wall
        base, base_cpu = base or tps, base_cpu or cpu
        nproc = VARIANTS[name][0]
        eff = f"{tps / (2 * base):.2f}" if nproc == 2 else ""
        cpu_eff = f"{base_cpu / (nproc * cpu):.2f}" if nproc == 2 else ""
        print(f"{name:32} {wall * 1e3:10.1f}ms {tps:10.0f} {eff:>10} {cpu * 1e3:14.1f}ms {cpu_eff:>15}")
    print("\ncommunication per optimizer step (payload bytes by kind; sent = ring bytes per device)")
    for name in names:
        nproc, _, strategy = VARIANTS[name]
        if nproc == 1:
            continue
        measured = results[name][0]["comm"]
        plan = predicted(strategy, nproc)
        factor = {"all_reduce": 2 * plan["ring_factor"]}
        sent = sum(v * factor.get(k, plan["ring_factor"]) for k, v in measured.items() if k != "all_reduce_small")
        for kind, want in plan["payload"].items():
            got = measured.get(kind, 0)
            print(f"{name:32} {kind:15} measured {got / 2**20:8.3f} MiB  planner {want / 2**20:8.3f} MiB  "
                  f"({got / want:.4f}x)")
        print(f"{name:32} {'sent':15} measured {sent / 2**20:8.3f} MiB  planner "
              f"{plan['sent_per_device'] / 2**20:8.3f} MiB; scalars all-reduced "
              f"{measured.get('all_reduce_small', 0):.0f} B")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
    else:
        main()
