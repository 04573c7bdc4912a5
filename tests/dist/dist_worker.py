"""One training process of the distributed tests (not collected by pytest).

usage: torchrun --nproc_per_node N dist_worker.py OUT_DIR STRATEGY MAX_STEPS
       python dist_worker.py OUT_DIR none MAX_STEPS           (the single-process reference)

Every process draws the same global micro-batches of 8 rows and keeps its contiguous
share, so N processes see exactly what one process sees. Labels are masked unevenly
across the shares: only a loss normalised by the global token count matches.

Rank 0 also counts the bytes of the collectives of each optimizer step (FSDP2's
all-gathers and reduce-scatters, DDP's gradient buckets, the loop's scalar all-reduces)
and writes them to OUT_DIR/comm.json (with the options DDP was built with): the planner's
prediction is checked against them.
"""

import json
import os
import sys
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from lmforge.dist import parallel

from lmforge.config import load_config
from lmforge.models import GPTConfig, build
from lmforge.train.loop import train
from lmforge.train.objectives import clm

GLOBAL_ROWS, SEQ, V, ACCUM = 8, 16, 64, 2
COUNTS: dict[str, int] = defaultdict(int)


def _counted(name: str, kind: str, which: str, position: int) -> None:
    fn = getattr(dist, name)

    def counted(*args, **kwargs):
        t = kwargs[which] if which in kwargs else args[position]
        COUNTS[kind] += t.numel() * t.element_size()
        return fn(*args, **kwargs)
    setattr(dist, name, counted)  # FSDP2 and the loop call dist.<name> at call time


_counted("all_gather_single", "all_gather", "output_tensor", 0)  # the gathered whole
_counted("reduce_scatter_single", "reduce_scatter", "input", 1)  # the whole reduced
_counted("all_reduce", "scalars", "tensor", 0)


def _bucket_hook(state, bucket):
    n = bucket.buffer().numel() * bucket.buffer().element_size()
    COUNTS["all_reduce"] += n
    COUNTS["scalars"] -= n  # PyTorch's default hook below all-reduces the bucket through dist.all_reduce
    return default_hooks.allreduce_hook(None, bucket)


class CountingDDP(parallel.DistributedDataParallel):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.register_comm_hook(None, _bucket_hook)
        DDP_OPTIONS["find_unused_parameters"] = self.find_unused_parameters


parallel.DistributedDataParallel = CountingDDP
DDP_OPTIONS: dict[str, bool] = {}
STEP_COUNTS: list[dict[str, int]] = []


class ShardedBatches:
    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world, self.index = rank, world, 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self.index % ACCUM == 0:
            STEP_COUNTS.append(dict(COUNTS))
        g = torch.Generator().manual_seed(1000 + self.index)
        w = torch.randint(0, V, (GLOBAL_ROWS, SEQ + 1), generator=g)
        labels = w[:, 1:].clone()
        labels[:3, SEQ // 2:] = -100  # fewer labelled tokens in rank 0's share
        self.index += 1
        share = GLOBAL_ROWS // self.world
        rows = slice(self.rank * share, (self.rank + 1) * share)
        return {"input_ids": w[rows, :-1].contiguous(), "labels": labels[rows].contiguous()}

    def state_dict(self) -> dict:
        return {"index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.index = state["index"]

    def load_state_dicts(self, states: list[dict]) -> None:  # the position is global: every rank saved the same
        self.index = states[0]["index"]


torch.set_num_threads(1)
out_dir, strategy, max_steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
config = load_config(None, {
    "train.out_dir": out_dir, "train.device": "cpu", "train.precision": "fp32", "train.max_steps": max_steps,
    "train.grad_accum": ACCUM, "train.micro_batch_size": GLOBAL_ROWS // world, "train.resume": "auto",
    "optim.warmup_steps": 0, "optim.schedule": "constant", "optim.lr": 3e-3, "log.every": 1,
    "log.progress": False, "log.tensorboard": False, "log.plot": False, "log.peak_flops": 1e12,
    "eval.every": 0, "checkpoint.every": 2, "checkpoint.keep_last": 10, "checkpoint.keep_best": False,
    "data.seq_len": SEQ, "dist.strategy": strategy})
torch.manual_seed(0)
# No biases: the key bias gets a zero gradient up to rounding, which Adam would amplify into noise.
model = build(GPTConfig(vocab_size=V, max_seq_len=SEQ, dim=32, n_layers=2, n_heads=2, bias=False))
result = train(model, clm, ShardedBatches(rank, world), config)
print(f"rank {rank}: {result.stopped} {result.step}")
if rank == 0:  # the bytes of each step's collectives, by kind (steps started in this process)
    steps = [{k: b.get(k, 0) - a.get(k, 0) for k in b} for a, b in zip(STEP_COUNTS, STEP_COUNTS[1:])]
    Path(out_dir, "comm.json").write_text(json.dumps({"steps": steps, "ddp": DDP_OPTIONS}))
torch.distributed.destroy_process_group() if world > 1 else None
