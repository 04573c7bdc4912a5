"""A training run in its own process, for the kill -9 / resume test (not collected by pytest).

usage: python resume_worker.py OUT_DIR [--slow]
--slow sleeps in every micro-batch so that the test can kill the run between checkpoints.
"""

import sys
import time

import torch

from lmforge.config import load_config
from lmforge.data.pretraining import SyntheticBatches
from lmforge.models import GPTConfig, build
from lmforge.train.loop import train
from lmforge.train.objectives import clm

torch.set_num_threads(1)
out_dir, slow = sys.argv[1], "--slow" in sys.argv
config = load_config(None, {
    "train.out_dir": out_dir, "train.device": "cpu", "train.precision": "fp32", "train.max_steps": 16,
    "train.grad_accum": 2, "train.micro_batch_size": 4, "train.resume": "auto", "optim.warmup_steps": 3,
    "optim.lr": 3e-3, "log.every": 1, "log.progress": False, "log.tensorboard": False, "log.plot": False,
    "log.peak_flops": 1e12, "eval.every": 0, "checkpoint.every": 4, "checkpoint.keep_last": 2,
    "checkpoint.keep_best": False, "data.seq_len": 16})
torch.manual_seed(config.train.seed)
model = build(GPTConfig(vocab_size=64, max_seq_len=16, dim=32, n_layers=2, n_heads=2, dropout=0.1))


def objective(model, batch):
    if slow:
        time.sleep(0.05)
    return clm(model, batch)


batches = SyntheticBatches("clm", batch_size=4, seq_len=16, vocab_size=64, seed=7)
result = train(model, objective, batches, config)
print(result.stopped, result.step)
