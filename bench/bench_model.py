"""Forward+backward throughput of lmforge's GPT against transformers' GPT2LMHeadModel,
same weights, same process, same device.

    python bench/bench_model.py                       # CUDA: gpt2-124m, bf16, seq 1024, batch 16
    python bench/bench_model.py --device cpu --threads 1 --batch 4 --seq 256 --preset gpt2-124m

Each side: forward, cross-entropy loss, backward, over the same random batch. lmforge's
loss is its training objective (`lmforge.train.objectives.clm`: chunked linear
cross-entropy on the hidden states, summed, divided by the token count); transformers'
is `labels=` (its own loss on full logits). After --warmup steps per side, --repeats
timed runs of --steps steps each, the two sides interleaved run by run (so that load
from other processes on a shared machine hits both alike); each run is timed by the
wall clock and by the process's CPU time (all threads), and the tables give medians.
No torch.compile on either side unless --compile is given.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import transformers

import lmforge
from lmforge.interop.hf import to_hf
from lmforge.models import build, count_params, preset
from lmforge.train.objectives import clm


def hf_model(ours: torch.nn.Module) -> torch.nn.Module:
    cfg, tensors = to_hf(ours)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config.from_dict(cfg))
    model.load_state_dict(tensors, strict=False)
    model.tie_weights()
    return model


def lmforge_loss(model, ids):
    out = clm(model, {"input_ids": ids[:, :-1], "labels": ids[:, 1:]})
    return out.loss / out.count


def hf_loss(model, ids):
    return model(input_ids=ids[:, :-1], labels=ids[:, :-1], use_cache=False).loss


def load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="gpt2-124m")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--dtype", default=None, help="bf16 autocast on CUDA by default, fp32 on CPU")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--compile", action="store_true", help="torch.compile both models")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    dtype = a.dtype or ("bf16" if a.device == "cuda" else "fp32")
    torch.manual_seed(0)
    ours = build(preset(a.preset)).to(a.device)
    theirs = hf_model(ours).to(a.device)
    if a.device == "cuda":
        theirs.config._attn_implementation = "sdpa"
    n_params = count_params(ours)
    ids = torch.randint(0, ours.config.vocab_size, (a.batch, a.seq + 1), device=a.device)
    if a.compile:
        ours, theirs = torch.compile(ours), torch.compile(theirs)
    amp = torch.autocast(a.device, dtype=torch.bfloat16, enabled=dtype == "bf16")

    def step(model, loss_fn):
        def run():
            with amp:
                loss = loss_fn(model, ids)
            loss.backward()
            model.zero_grad(set_to_none=True)
        return run

    sides = {"lmforge": step(ours, lmforge_loss), "transformers": step(theirs, hf_loss)}
    for run in sides.values():
        for _ in range(a.warmup):
            run()
    wall: dict[str, list[float]] = {k: [] for k in sides}
    cpu: dict[str, list[float]] = {k: [] for k in sides}
    labels = list(sides)
    for r in range(a.repeats):
        for name in labels[r % 2:] + labels[: r % 2]:
            if a.device == "cuda":
                torch.cuda.synchronize()
            w0, c0 = time.perf_counter(), time.process_time()
            for _ in range(a.steps):
                sides[name]()
            if a.device == "cuda":
                torch.cuda.synchronize()
            wall[name].append((time.perf_counter() - w0) / a.steps)
            cpu[name].append((time.process_time() - c0) / a.steps)
    tokens = a.batch * a.seq
    tok_s = {k: tokens / statistics.median(wall[k]) for k in sides}
    cpu_ms = {k: statistics.median(cpu[k]) * 1e3 for k in sides}
    dev = torch.cuda.get_device_name() if a.device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print("| model | device | dtype | batch x seq | lmforge tok/s | transformers tok/s | ratio (wall) | "
          "lmforge CPU ms/step | transformers CPU ms/step | ratio (CPU) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {a.preset} ({n_params / 1e6:.1f}M) | {dev} | {dtype} | {a.batch}x{a.seq} | "
          f"{tok_s['lmforge']:,.0f} | {tok_s['transformers']:,.0f} | {tok_s['lmforge'] / tok_s['transformers']:.2f}x | "
          f"{cpu_ms['lmforge']:.0f} | {cpu_ms['transformers']:.0f} | "
          f"{cpu_ms['transformers'] / cpu_ms['lmforge']:.2f}x |")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, lmforge {lmforge.__version__}, "
          f"compile={a.compile}, load average {load()}")


if __name__ == "__main__":
    main()
