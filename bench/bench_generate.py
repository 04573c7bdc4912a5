"""Greedy generation throughput: lmforge's `generate` against transformers' `generate`,
same weights, same process, same device.

    python bench/bench_generate.py                                  # CUDA: bf16, 256 new tokens
    python bench/bench_generate.py --device cpu --new-tokens 64     # CPU: fp32

Each row: a prompt of --prompt-len random tokens, --new-tokens generated greedily with
no EOS (both sides produce exactly that many), at each batch size in --batch. Time is
wall-clock for the whole call (prefill included); tokens/s = batch * new_tokens / time,
the median of --repeats runs after --warmup runs, the implementations interleaved. Models: the quickstart-size GPT
(preset gpt-tiny, vocab 8192) and gpt2-124m; transformers runs the same weights as a
GPT2LMHeadModel. On CUDA both sides also run compiled: lmforge's decode step as a CUDA
graph (`compile_decode_step`), transformers' static cache (which it compiles itself);
on CPU --compile-cpu adds lmforge with its decode step compiled by torch.compile.
The last column says whether both sides produced the same tokens.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import transformers

from lmforge.generate import CompiledDecodeStep, compile_decode_step, generate, gpt_decode_step
from lmforge.interop.hf import to_hf
from lmforge.models import build, count_params, preset

MODELS = {
    "gpt-tiny-8k": lambda: preset("gpt-tiny", vocab_size=8192, max_seq_len=1024),
    "gpt2-124m": lambda: preset("gpt2-124m"),
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


def timed(runs: dict, warmup: int, repeats: int, device: str,
          clock=time.perf_counter) -> dict[str, tuple[float, torch.Tensor]]:
    """Median seconds per call of each run, and its last output. The runs are interleaved
    (one call of each per round, in rotating order), so that load from other processes on
    a shared machine hits every side alike."""
    outputs = {label: None for label in runs}
    for label, fn in runs.items():
        extra = 2 if "compile" in label or "graph" in label else 0  # compilation and graph capture
        for _ in range(warmup + extra):
            outputs[label] = fn()
    times: dict[str, list[float]] = {label: [] for label in runs}
    labels = list(runs)
    for r in range(repeats):
        for label in labels[r % len(labels):] + labels[: r % len(labels)]:
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = clock()
            outputs[label] = runs[label]()
            if device == "cuda":
                torch.cuda.synchronize()
            times[label].append(clock() - t0)
    return {label: (statistics.median(times[label]), outputs[label]) for label in runs}


def make_runs(ours, theirs, ids: torch.Tensor, mask: torch.Tensor, n: int, device: str,
              compile_cpu: bool = False) -> dict:
    """label -> a call generating n tokens greedily, returning the new tokens (B, n)."""
    P = ids.size(1)
    runs = {
        "lmforge": lambda: generate(ours, ids, mask, max_new_tokens=n).tokens,
        "transformers": lambda: theirs.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False)[:, P:],
    }
    if device == "cpu" and compile_cpu:
        cpu_step = CompiledDecodeStep(gpt_decode_step, mode="default")
        runs["lmforge (compiled step)"] = lambda: generate(ours, ids, mask, max_new_tokens=n,
                                                           decode_step=cpu_step).tokens
    if device == "cuda":
        step = compile_decode_step(ours)
        runs["lmforge (CUDA graph)"] = lambda: generate(ours, ids, mask, max_new_tokens=n, decode_step=step).tokens
        runs["transformers (static cache, compiled)"] = lambda: theirs.generate(
            ids, attention_mask=mask, max_new_tokens=n, do_sample=False, cache_implementation="static")[:, P:]
    return runs


def bench_model(name: str, a: argparse.Namespace) -> list[dict]:
    torch.manual_seed(0)
    ours = build(MODELS[name]())
    theirs = hf_model(ours)
    dtype = torch.bfloat16 if a.device == "cuda" else torch.float32
    ours, theirs = ours.to(a.device, dtype).eval(), theirs.to(a.device, dtype).eval()
    n_params = count_params(ours)
    rows = []
    for batch in a.batch:
        ids = torch.randint(0, ours.config.vocab_size, (batch, a.prompt_len), device=a.device)
        mask = torch.ones_like(ids)
        n = a.new_tokens
        runs = make_runs(ours, theirs, ids, mask, n, a.device, a.compile_cpu)
        with torch.inference_mode():
            results = timed(runs, a.warmup, a.repeats, a.device, time.process_time if a.cpu_time else time.perf_counter)
        for label, (seconds, _) in results.items():
            print(f"  {name} batch {batch} {label}: {batch * n / seconds:.0f} tok/s", flush=True)
        base = results["transformers"][0]
        reference = results["transformers"][1]
        for label, (seconds, tokens) in results.items():
            rows.append(dict(model=name, params=n_params, batch=batch, impl=label, tok_s=batch * n / seconds,
                             speedup=base / seconds, same=bool(torch.equal(tokens, reference))))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--compile-cpu", action="store_true",
                   help="on CPU, also time lmforge with its decode step compiled by torch.compile (default mode)")
    p.add_argument("--cpu-time", action="store_true",
                   help="time with the process's CPU time instead of wall-clock: steadier on a shared, loaded CPU "
                        "(use with --threads 1)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    device_name = torch.cuda.get_device_name() if a.device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {device_name}, "
          f"{'bf16' if a.device == 'cuda' else 'fp32'}, prompt {a.prompt_len}, new tokens {a.new_tokens}, "
          f"{'CPU time' if a.cpu_time else 'wall-clock'}")
    rows = [row for name in a.models for row in bench_model(name, a)]
    print("\n| model | params | batch | implementation | tokens/s | vs transformers | same tokens |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['params'] / 1e6:.1f}M | {r['batch']} | {r['impl']} | {r['tok_s']:.0f} | "
              f"{r['speedup']:.2f}x | {'yes' if r['same'] else 'no'} |")


if __name__ == "__main__":
    main()
