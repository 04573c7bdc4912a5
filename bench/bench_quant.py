"""CPU decoding at batch 1 in fewer bytes: lmforge in fp32, bf16, int8 and int4 weights against
transformers' `generate` in fp32 and bf16, same weights, same process.

    python bench/bench_quant.py                                   # both models, 1 and 2 threads
    python bench/bench_quant.py --models gpt2-124m --threads 1 --new-tokens 64 --repeats 3 --compile

Models (random init, the shapes are what matters for speed): "gpt2-124m" (GPT-2 small,
tied 50257-token head) and "llama-135m" (SmolLM2-135M's shape: 30 layers of width 576,
9 query / 3 key-value heads, SwiGLU 1536, tied 49152-token head). transformers runs the
same weights as GPT2LMHeadModel / LlamaForCausalLM (lmforge.interop.hf.to_hf).

Each variant generates --new-tokens greedily (no EOS) after a --prompt-len random prompt; the
variants are interleaved (one call each per round, rotating order) and the table gives the
median of --repeats rounds after a warm-up call, wall clock, plus the prompt's forward pass
alone ("prefill"). "of limit" is tokens/s divided by the machine's read bandwidth over the
bytes one decode step reads (every weight once: all linear layers and a tied head, not the
untied embedding tables nor the KV cache, which is small at this context): the fraction of
the memory-bound ceiling reached. The read bandwidth is measured here, with the same thread
count (a sum over a 512 MiB tensor, median of 5). "same" says whether the tokens equal
lmforge fp32's (int8 / int4 change the weights, bf16 the arithmetic: greedy outputs of a
random-init model, whose logits are close together, differ quickly).

--compile adds lmforge's decode step compiled by torch.compile (mode "default", static shapes)
for fp32 and int8 (int8 then runs the written-out dequantise-multiply-sum that the compiler
fuses, instead of torch's int8 kernel); compilation is not timed (the warm-up calls).
The load average is printed before and after: on a shared machine every number is a lower bound.
Both sides run with lmforge's thread defaults (set before torch is imported: lmforge.hardware).
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import time

from lmforge import hardware

hardware.cpu_thread_env()  # lmforge's thread defaults (OMP_WAIT_POLICY=PASSIVE) before torch loads OpenMP

import torch  # noqa: E402
import transformers  # noqa: E402

import lmforge  # noqa: E402
from lmforge.generate import CompiledDecodeStep, generate, gpt_decode_step  # noqa: E402
from lmforge.interop.hf import to_hf  # noqa: E402
from lmforge.models import GPTConfig, build, count_params, preset  # noqa: E402
from lmforge.nn.quant import quantize  # noqa: E402

MODELS = {
    "gpt2-124m": lambda: preset("gpt2-124m"),
    "llama-135m": lambda: GPTConfig(vocab_size=49152, max_seq_len=2048, dim=576, n_layers=30, n_heads=9, n_kv_heads=3,
                                    hidden_dim=1536, norm="rmsnorm", norm_eps=1e-5, positions="rope",
                                    rope_theta=100000.0, mlp="swiglu", bias=False, tie_embeddings=True),
    "tiny": lambda: preset("gpt-tiny", vocab_size=256, dim=64, n_layers=2, n_heads=2, max_seq_len=256),  # smoke runs
}


def load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def read_bandwidth(mib: int = 512, repeats: int = 5) -> float:
    """Bytes/s that torch.sum reads from a tensor much larger than the caches (this thread count)."""
    x = torch.ones(mib * 2**20 // 4)
    x.sum()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t0)
    return x.numel() * 4 / statistics.median(times)


def bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of weights one decode step reads: every parameter and buffer once, except the rows
    of embedding tables that are not also the LM head (a step reads one row of those)."""
    head = getattr(model, "lm_head", None) or model.get_output_embeddings()
    head_w = head.weight if head is not None else None
    skip = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding) and m.weight is not head_w}
    skip |= {id(b) for name, b in model.named_buffers() if name.endswith(("rope.cos", "rope.sin", "inv_freq"))}
    seen, total = set(), 0
    for t in (*model.parameters(), *model.buffers()):
        if id(t) not in seen and id(t) not in skip:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def hf_twin(ours: torch.nn.Module) -> torch.nn.Module:
    cfg, tensors = to_hf(ours)
    cfg.update(bos_token_id=None, eos_token_id=None, pad_token_id=0)
    config = transformers.AutoConfig.for_model(cfg.pop("model_type"), **{k: v for k, v in cfg.items()
                                                                         if k != "architectures"})
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.load_state_dict(tensors, strict=False)
    model.tie_weights()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.eval()


def variants(ours: torch.nn.Module, a: argparse.Namespace) -> dict[str, torch.nn.Module]:
    """label -> model: lmforge fp32 / bf16 / int8 (fp32 and bf16 compute) / int4, transformers fp32 / bf16."""
    theirs = hf_twin(ours)
    out = {"lmforge fp32": ours, "lmforge bf16": copy.deepcopy(ours).bfloat16(),
           "lmforge int8": quantize(copy.deepcopy(ours), "int8"),
           "lmforge int8, bf16 compute": quantize(copy.deepcopy(ours).bfloat16(), "int8"),
           "lmforge int4": quantize(copy.deepcopy(ours).bfloat16(), "int4", group_size=a.group_size),
           "transformers fp32": theirs, "transformers bf16": copy.deepcopy(theirs).bfloat16()}
    return {k: v for k, v in out.items() if not a.only or any(s in k for s in a.only)}


def runs_of(models: dict, ids: torch.Tensor, n: int, compile_step: bool) -> dict:
    P = ids.size(1)
    runs = {}
    for label, m in models.items():
        if label.startswith("transformers"):
            runs[label] = lambda m=m: m.generate(ids, max_new_tokens=n, do_sample=False)[:, P:]
        else:
            runs[label] = lambda m=m: generate(m, ids, max_new_tokens=n).tokens
        if compile_step and label in ("lmforge fp32", "lmforge int8"):
            step = CompiledDecodeStep(gpt_decode_step, mode="default")
            runs[f"{label} (compiled step)"] = lambda m=m, step=step: generate(m, ids, max_new_tokens=n,
                                                                                decode_step=step).tokens
    return runs


def prefill_seconds(m: torch.nn.Module, ids: torch.Tensor, repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        m(ids)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def bench(name: str, threads: int, a: argparse.Namespace) -> list[dict]:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    ours = build(MODELS[name]()).eval()
    models = variants(ours, a)
    bandwidth = read_bandwidth()
    ids = torch.randint(0, ours.config.vocab_size, (1, a.prompt_len))
    n = min(a.new_tokens, ours.config.max_seq_len - a.prompt_len)
    runs = runs_of(models, ids, n, a.compile)
    outputs: dict = {}
    wall: dict[str, list[float]] = {k: [] for k in runs}
    with torch.inference_mode():
        for label, fn in runs.items():
            for _ in range(a.warmup + (2 if "compiled" in label else 0)):
                outputs[label] = fn()
        labels = list(runs)
        for r in range(a.repeats):
            for label in labels[r % len(labels):] + labels[:r % len(labels)]:
                t0 = time.perf_counter()
                outputs[label] = runs[label]()
                wall[label].append(time.perf_counter() - t0)
        prefill = {label.split(" (")[0]: prefill_seconds(m, ids, a.repeats) for label, m in models.items()}
    rows = []
    for label in runs:
        model = models[label.split(" (")[0]]
        tok_s = n / statistics.median(wall[label])
        limit = bandwidth / bytes_per_token(model)
        rows.append(dict(model=name, params=count_params(ours), threads=threads, impl=label, new=n, tok_s=tok_s,
                         limit=limit, mb=bytes_per_token(model) / 1e6, bandwidth=bandwidth,
                         prefill_ms=prefill[label.split(" (")[0]] * 1e3,
                         same=bool(torch.equal(outputs[label], outputs["lmforge fp32"]))
                         if "lmforge fp32" in outputs else None))
        print(f"  {name} {threads}t {label}: {tok_s:.1f} tok/s ({tok_s / limit:.0%} of {limit:.0f}), "
              f"load {load()}", flush=True)
    return rows


def table(rows: list[dict], a: argparse.Namespace, loads: list[str]) -> None:
    print(f"\nBatch 1 greedy decoding on the CPU ({platform.machine()}, {os.cpu_count()} CPUs, "
          f"{platform.processor() or 'unknown processor'}); prompt {a.prompt_len}, medians of {a.repeats} "
          f"interleaved rounds; load average (1/5/15 min) {loads[0]} -> {loads[1]}; lmforge {lmforge.__version__}, "
          f"torch {torch.__version__}, transformers {transformers.__version__}\n")
    print("| model | threads | implementation | MB read / token | tokens/s | vs transformers fp32 | "
          "vs transformers bf16 | of limit (read GB/s / bytes per token) | prefill ms | same tokens as fp32 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        peers = {p["impl"]: p["tok_s"] for p in rows if p["model"] == r["model"] and p["threads"] == r["threads"]}
        vs = [f"{r['tok_s'] / peers[k]:.2f}x" if k in peers else "-" for k in ("transformers fp32",
                                                                               "transformers bf16")]
        print(f"| {r['model']} ({r['params'] / 1e6:.0f}M) | {r['threads']} | {r['impl']} | {r['mb']:.0f} | "
              f"{r['tok_s']:.1f} | {vs[0]} | {vs[1]} | {r['tok_s'] / r['limit']:.0%} "
              f"({r['bandwidth'] / 1e9:.1f} GB/s: {r['limit']:.0f} tok/s) | {r['prefill_ms']:.0f} | "
              f"{'yes' if r['same'] else 'no' if r['same'] is not None else '-'} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["gpt2-124m", "llama-135m"], choices=list(MODELS))
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--group-size", type=int, default=32, help="int4: inputs per scale and zero point")
    p.add_argument("--compile", action="store_true", help="also lmforge fp32 / int8 with a torch.compile'd step")
    p.add_argument("--only", nargs="+", default=None, help="only variants whose label contains one of these")
    a = p.parse_args()
    loads = [load()]
    rows = [row for name in a.models for threads in a.threads for row in bench(name, threads, a)]
    loads.append(load())
    table(rows, a, loads)
    import sys
    print(f"\ncommand: python {' '.join(sys.argv)}")


if __name__ == "__main__":
    main()
