"""Forward+backward throughput of lmforge's GPT against transformers' GPT2LMHeadModel,
same weights, same process, same device.

    python bench/bench_model.py                       # CUDA: gpt2-124m, bf16, seq 1024, batch 16
    python bench/bench_model.py --device cpu --batch 4 --seq 256 --preset gpt2-124m

Each side: forward, cross-entropy loss, backward, over the same random batch;
warm-up steps, then the median over --repeats timed runs of --steps steps each.
lmforge's loss uses its training objective (chunked cross-entropy on the hidden
states); transformers' uses `labels=` (its own loss). No torch.compile on either
side unless --compile is given.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import transformers

import lmforge
from lmforge.interop.hf import to_hf
from lmforge.models import build, count_params, preset


def hf_model(ours: torch.nn.Module) -> torch.nn.Module:
    cfg, tensors = to_hf(ours)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config.from_dict(cfg))
    model.load_state_dict(tensors, strict=False)
    model.tie_weights()
    return model


def lmforge_loss(model, ids):
    from lmforge.train.objectives import clm_loss

    loss_sum, n_tokens = clm_loss(model, {"input_ids": ids[:, :-1], "labels": ids[:, 1:]})[:2]
    return loss_sum / n_tokens


def hf_loss(model, ids):
    return model(input_ids=ids, labels=ids, use_cache=False).loss


def time_steps(step, steps: int, repeats: int, warmup: int, device: str) -> list[float]:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) / steps)
    return times


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
    p.add_argument("--compile", action="store_true", help="torch.compile both models")
    a = p.parse_args()
    dtype = a.dtype or ("bf16" if a.device == "cuda" else "fp32")
    torch.manual_seed(0)
    ours = build(preset(a.preset)).to(a.device)
    theirs = hf_model(ours).to(a.device)
    if a.device == "cuda":
        theirs.config._attn_implementation = "sdpa"
    if a.compile:
        ours, theirs = torch.compile(ours), torch.compile(theirs)
    ids = torch.randint(0, 50257, (a.batch, a.seq + 1), device=a.device)
    amp = torch.autocast(a.device, dtype=torch.bfloat16, enabled=dtype == "bf16")

    def step(model, loss_fn, x):
        def run():
            with amp:
                loss = loss_fn(model, x)
            loss.backward()
            model.zero_grad(set_to_none=True)
        return run

    results = {}
    for name, model, fn, x in (("lmforge", ours, lmforge_loss, ids), ("transformers", theirs, hf_loss, ids[:, :-1])):
        times = time_steps(step(model, fn, x), a.steps, a.repeats, a.warmup, a.device)
        results[name] = a.batch * a.seq / statistics.median(times)
    ratio = results["lmforge"] / results["transformers"]
    dev = torch.cuda.get_device_name() if a.device == "cuda" else "cpu"
    print(f"| model | device | dtype | batch x seq | lmforge tok/s | transformers tok/s | ratio |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {a.preset} ({count_params(ours) / 1e6:.1f}M) | {dev} | {dtype} | {a.batch}x{a.seq} | "
          f"{results['lmforge']:,.0f} | {results['transformers']:,.0f} | {ratio:.2f}x |")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, lmforge {lmforge.__version__}, "
          f"compile={a.compile}")


if __name__ == "__main__":
    main()
