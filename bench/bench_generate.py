"""Greedy generation throughput: lmforge's `generate` against transformers' `generate`,
same weights, same process, same device.

    python bench/bench_generate.py                                            # CUDA: bf16, 256 new tokens
    python bench/bench_generate.py --device cpu --threads 1 --new-tokens 64   # CPU: fp32

Each row: a prompt of --prompt-len random tokens, --new-tokens generated greedily with
no EOS (both sides produce exactly that many; fewer when the model's context is shorter),
at each batch size in --batch. Every call is timed twice, by the wall clock and by the
process's CPU time (steadier on a shared, loaded machine when --threads is 1: time spent
waiting for a core is not counted); each is the median of --repeats calls after --warmup
calls, the implementations interleaved in rotating order so that load from other
processes hits every side alike. The load average is printed before and after.

Models: the quickstart's CPU model (4 layers, dim 192, 2048-token vocabulary, context
128), the gpt-tiny preset with an 8192-token vocabulary, and gpt2-124m; transformers runs
the same weights as a GPT2LMHeadModel. On CUDA both sides also run compiled: lmforge's
decode step as a CUDA graph (`compile_decode_step`), transformers' static cache (which
it compiles itself); on CPU --compile-cpu adds lmforge with its decode step compiled by
torch.compile. The last column says whether both sides produced the same tokens.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import transformers

from lmforge.generate import CompiledDecodeStep, compile_decode_step, generate, gpt_decode_step
from lmforge.interop.hf import to_hf
from lmforge.models import build, count_params, preset

MODELS = {
    "quickstart": lambda: preset("gpt-tiny", vocab_size=2048, dim=192, n_layers=4, n_heads=4, max_seq_len=128),
    "gpt-tiny-8k": lambda: preset("gpt-tiny", vocab_size=8192, max_seq_len=1024),
    "gpt2-124m": lambda: preset("gpt2-124m"),
    "tiny": lambda: preset("gpt-tiny", vocab_size=256, dim=32, n_layers=2, n_heads=2, max_seq_len=64),  # smoke runs
}


def hf_model(ours: torch.nn.Module) -> torch.nn.Module:
    cfg, tensors = to_hf(ours)
    cfg.update(bos_token_id=None, eos_token_id=None, pad_token_id=0)  # exactly max_new_tokens on both sides
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config.from_dict(cfg))
    model.load_state_dict(tensors, strict=False)
    model.tie_weights()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def timed(runs: dict, warmup: int, repeats: int, device: str, deadline: float | None = None) -> dict[str, dict]:
    """Median wall and CPU seconds per call of each run, its last output and the number of
    timed calls. The runs are interleaved (one call of each per round, in rotating order);
    past `deadline` (a time.perf_counter() reading) no further round starts after the first."""
    outputs = {label: None for label in runs}
    for label, fn in runs.items():
        extra = 2 if "compile" in label or "graph" in label else 0  # compilation and graph capture
        for _ in range(warmup + extra):
            outputs[label] = fn()
    wall: dict[str, list[float]] = {label: [] for label in runs}
    cpu: dict[str, list[float]] = {label: [] for label in runs}
    labels = list(runs)
    for r in range(repeats):
        if r and deadline is not None and time.perf_counter() > deadline:
            break
        for label in labels[r % len(labels):] + labels[: r % len(labels)]:
            if device == "cuda":
                torch.cuda.synchronize()
            w0, c0 = time.perf_counter(), time.process_time()
            outputs[label] = runs[label]()
            if device == "cuda":
                torch.cuda.synchronize()
            wall[label].append(time.perf_counter() - w0)
            cpu[label].append(time.process_time() - c0)
    return {label: dict(wall=statistics.median(wall[label]), cpu=statistics.median(cpu[label]),
                        tokens=outputs[label], calls=len(wall[label])) for label in runs}


def make_runs(ours, theirs, ids: torch.Tensor, mask: torch.Tensor, n: int, device: str,
              compile_cpu: bool = False, compiled: bool | None = None) -> dict:
    """label -> a call generating n tokens greedily, returning the new tokens (B, n).
    compiled: add lmforge's CUDA-graph step and transformers' static cache (default: on CUDA;
    elsewhere the step is compiled for the CPU and transformers' static cache runs eagerly)."""
    P = ids.size(1)
    runs = {
        "lmforge": lambda: generate(ours, ids, mask, max_new_tokens=n).tokens,
        "transformers": lambda: theirs.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False)[:, P:],
    }
    if device == "cpu" and compile_cpu:
        cpu_step = CompiledDecodeStep(gpt_decode_step, mode="default")
        runs["lmforge (compiled step)"] = lambda: generate(ours, ids, mask, max_new_tokens=n,
                                                           decode_step=cpu_step).tokens
    if compiled is None:
        compiled = device == "cuda"
    if compiled:
        step = compile_decode_step(ours)
        runs["lmforge (CUDA graph)"] = lambda: generate(ours, ids, mask, max_new_tokens=n, decode_step=step).tokens
        runs["transformers (static cache, compiled)"] = lambda: theirs.generate(
            ids, attention_mask=mask, max_new_tokens=n, do_sample=False, cache_implementation="static")[:, P:]
    return runs


def prepare(name: str, device: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """lmforge's model `name` and transformers' twin with its weights, on device, bf16 on CUDA."""
    torch.manual_seed(0)
    ours = build(MODELS[name]())
    theirs = hf_model(ours)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    return ours.to(device, dtype).eval(), theirs.to(device, dtype).eval()


def bench_batch(name: str, ours, theirs, batch: int, a: argparse.Namespace, compiled: bool | None = None,
                deadline: float | None = None) -> list[dict]:
    """One row per implementation at one batch size (see make_runs and timed)."""
    n = min(a.new_tokens, ours.config.max_seq_len - a.prompt_len)  # the context bounds prompt + output
    ids = torch.randint(0, ours.config.vocab_size, (batch, a.prompt_len), device=a.device)
    mask = torch.ones_like(ids)
    runs = make_runs(ours, theirs, ids, mask, n, a.device, a.compile_cpu, compiled)
    with torch.inference_mode():
        results = timed(runs, a.warmup, a.repeats, a.device, deadline)
    base = results["transformers"]
    rows = []
    for label, res in results.items():
        row = dict(model=name, params=count_params(ours), batch=batch, new=n, impl=label,
                   tok_s=batch * n / res["wall"], ms_tok=res["wall"] / n * 1e3, cpu_ms_tok=res["cpu"] / n * 1e3,
                   speedup=base["wall"] / res["wall"], cpu_speedup=base["cpu"] / res["cpu"],
                   same=bool(torch.equal(res["tokens"], base["tokens"])), calls=res["calls"])
        print(f"  {name} batch {batch} {label}: {row['tok_s']:.0f} tok/s, {row['ms_tok']:.3f} ms/step wall, "
              f"{row['cpu_ms_tok']:.3f} ms/step CPU (load {load()})", flush=True)
        rows.append(row)
    return rows


def bench_model(name: str, a: argparse.Namespace) -> list[dict]:
    ours, theirs = prepare(name, a.device)
    return [row for batch in a.batch for row in bench_batch(name, ours, theirs, batch, a)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["quickstart", "gpt-tiny-8k", "gpt2-124m"], choices=list(MODELS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--compile-cpu", action="store_true",
                   help="on CPU, also time lmforge with its decode step compiled by torch.compile (default mode)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    device_name = torch.cuda.get_device_name() if a.device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {device_name}, "
          f"{'bf16' if a.device == 'cuda' else 'fp32'}, prompt {a.prompt_len}, new tokens {a.new_tokens}, "
          f"median of {a.repeats}, load average {load()}")
    rows = [row for name in a.models for row in bench_model(name, a)]
    print(f"\nload average at the end: {load()}")
    print("\n| model | params | batch | new tokens | implementation | tokens/s (wall) | ms/step (wall) | "
          "ms/step (CPU) | vs transformers (wall) | vs transformers (CPU) | same tokens |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['params'] / 1e6:.1f}M | {r['batch']} | {r['new']} | {r['impl']} | "
              f"{r['tok_s']:.0f} | {r['ms_tok']:.3f} | {r['cpu_ms_tok']:.3f} | {r['speedup']:.2f}x | "
              f"{r['cpu_speedup']:.2f}x | {'yes' if r['same'] else 'no'} |")


if __name__ == "__main__":
    main()
