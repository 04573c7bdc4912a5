"""The workloads of bench/gpu_suite.py, one per process (`gpu_suite.py --workload NAME` calls
`main` here). Each measures lmforge beside its peer in this one process, through the bench
modules that already measure it (bench_train, bench_model, bench_generate, bench_plan), and
writes every figure to its rows file as soon as it has it.

Timing: training sides run in rounds, interleaved in rotating order; a round's first steps
(compilation, allocation) are not timed, and a round is timed as a whole (one wait for the GPU
before its first timed step and one at its end, so the host runs ahead of the device as in a
real run); the figure is the median over rounds of a round's mean step time. Decoding is timed
call by call (bench_generate.timed). A workload stops starting rounds when the next one would
pass its time budget, and says so in a note.

GPU: the shapes of the issue (gpt2-124m T=1024 batch 16; bert-base T=128 batch 256; decoding
batch 1 and 16, 256 new tokens; bench_plan's CUDA grid). Dry run (CPU): 2-layer, dim-32 models
and a few steps, torch.compile tracing with dynamo's "eager" backend (see trace_only_compile).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import importlib.metadata
import io
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
TINY = dict(dim=32, n_layers=2, n_heads=2, vocab_size=256)  # the dry run's models
PARAMS = {
    "gpu": {
        "cuda-tests": {},
        "train-gpt2": dict(model=("gpt2-124m", {}), batch=16, seq=1024, steps=16, warmup=4, rounds=3, lr=6e-4),
        "mlm-bert": dict(model=("bert-base", {}), batch=256, seq=128, steps=12, warmup=3, rounds=3, lr=1e-4),
        "decode-gpt2": dict(model="gpt2-124m", batch=[1, 16], prompt_len=16, new_tokens=256, warmup=1, repeats=3),
        "plan-verify": dict(grid="cuda", device="measured", steps=3),
    },
    "dry": {
        "cuda-tests": {},
        "train-gpt2": dict(model=("gpt2-124m", TINY), batch=2, seq=16, steps=3, warmup=1, rounds=2, lr=1e-3),
        "mlm-bert": dict(model=("bert-base", TINY), batch=4, seq=16, steps=3, warmup=1, rounds=2, lr=1e-3),
        "decode-gpt2": dict(model="tiny", batch=[1, 2], prompt_len=4, new_tokens=4, warmup=1, repeats=1),
        "plan-verify": dict(grid="tiny", device="cpu", steps=1),
    },
}


class Recorder:
    """One JSON object per line, flushed at once, so that a workload killed at its budget still
    leaves what it measured. A row with a key already written replaces the earlier one (medians
    refined round by round)."""

    def __init__(self, path: Path) -> None:
        self.file = open(path, "w")  # noqa: SIM115 (open for the workload's lifetime)

    def _write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def row(self, key: str, **fields) -> None:
        self._write({"kind": "row", "key": key, **fields})

    def skip(self, what: str, reason: str) -> None:
        self._write({"kind": "skip", "what": what, "reason": reason})

    def note(self, text: str) -> None:
        print(f"note: {text}", flush=True)
        self._write({"kind": "note", "text": text})

    def env(self, **fields) -> None:
        self._write({"kind": "env", **fields})

    def packages(self, loaded: dict[str, str]) -> None:
        self._write({"kind": "packages", **loaded})


# ----------------------------------------------------------------------------- training, two families


def interleave(rec: Recorder, workload: str, variants: dict[str, Callable[[str], list]], p: dict, deadline: float,
               flops: float, peak: float | None, peer: str) -> None:
    """Rounds of p["steps"] steps of every variant (each a call out_dir -> per-step (wall, CPU)
    seconds after p["warmup"] untimed steps), in rotating order, until p["rounds"] or `deadline`."""
    labels = list(variants)
    means: dict[str, list[float]] = {k: [] for k in labels}  # seconds per timed step, one per round
    walls: dict[str, list[float]] = {k: [] for k in labels}  # a whole round: compilation, checkpoint
    with tempfile.TemporaryDirectory(dir=scratch()) as tmp:
        for r in range(p["rounds"]):
            # A round as long as the last one, or (after the first, which compiled) its timed steps,
            # half again for the untimed ones, and a few seconds for setup and the closing checkpoint.
            estimate = sum(w[-1] if len(w) > 1 else 1.5 * p["steps"] * m[-1] + 5.0
                           for m, w in zip(means.values(), walls.values()) if w)
            if r and time.perf_counter() + estimate > deadline:
                rec.note(f"{workload}: {r} of {p['rounds']} rounds; the next would pass the time budget")
                break
            for label in labels[r % len(labels):] + labels[: r % len(labels)]:
                t0 = time.perf_counter()
                steps = variants[label](os.path.join(tmp, f"r{r}-{labels.index(label)}"))
                walls[label].append(time.perf_counter() - t0)
                means[label].append(sum(s[0] for s in steps) / len(steps))
                training_rows(rec, workload, means, walls, p, flops, peak, peer)


def scratch() -> str | None:
    """Where train() writes the checkpoint it ends with (gpt2-124m: 1.5 GB a round): memory-backed
    /dev/shm when it has room, so that a slow disk does not eat the time budget; else the default."""
    shm = "/dev/shm"
    return shm if os.path.isdir(shm) and shutil.disk_usage(shm).free > 16 * 2**30 else None


def training_rows(rec: Recorder, workload: str, means: dict, walls: dict, p: dict, flops: float,
                  peak: float | None, peer: str) -> None:
    tokens = p["batch"] * p["seq"]
    medians = {k: statistics.median(v) for k, v in means.items() if v}
    for label, seconds in medians.items():
        tok_s = tokens / seconds
        rec.row(f"{workload}/{label}", impl=label, shape=f"{p['batch']}x{p['seq']}", tok_s=tok_s,
                step_ms=seconds * 1e3, mfu=flops * tok_s / peak if peak else None,
                vs_peer=medians[peer] / seconds if peer in medians else None, rounds=len(means[label]),
                timed_steps=len(means[label]) * (p["steps"] - p["warmup"]), first_round_s=walls[label][0],
                later_round_s=statistics.median(walls[label][1:]) if len(walls[label]) > 1 else None)


def _namespace(p: dict, device: str, compile: bool) -> argparse.Namespace:
    """The arguments bench_train's run_lmforge / run_plain read."""
    return argparse.Namespace(device=device, steps=p["steps"], warmup=p["warmup"], compile=compile, log_every=10)


def _sdpa(rec: Recorder, model: torch.nn.Module) -> torch.nn.Module:
    """transformers' model with torch's scaled_dot_product_attention (its default; said in a note)."""
    if model.config._attn_implementation != "sdpa":
        model.set_attn_implementation("sdpa")
    rec.note(f"{type(model).__name__}: attention {model.config._attn_implementation}")
    return model


def hf_clm_loss(model, batch) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], labels=batch["input_ids"], use_cache=False).loss  # it shifts


def hf_mlm_loss(model, batch) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss


def train_gpt2(rec: Recorder, p: dict, device: str, deadline: float, work: Path) -> None:
    import bench_model
    import bench_train
    from lmforge.models import build, preset
    from lmforge.train.logging import flops_per_token, peak_flops

    name, overrides = p["model"]
    torch.manual_seed(0)
    initial = build(preset(name, **overrides, max_seq_len=p["seq"]))
    theirs = _sdpa(rec, bench_model.hf_model(initial))
    batches = bench_train.random_batches(initial.config.vocab_size, p["batch"], p["seq"])
    a = _namespace(p, device, compile=True)
    setting = bench_train.Setting(overrides, p["batch"], p["seq"], p["lr"], 0.0)
    sync = bench_train.round_sync(a) if device == "cuda" else False
    peer = "transformers GPT2LMHeadModel, torch.compile, fused AdamW"
    variants = {
        "lmforge train(), compiled": lambda out: bench_train.run_lmforge(
            copy.deepcopy(initial), batches, a, setting, out, sync=sync),
        peer: lambda out: bench_train.run_plain(theirs, batches, a, setting, hf_clm_loss, fused=True, sync=sync),
    }
    peak = peak_flops(torch.device(device), "bf16" if device == "cuda" else "fp32")
    interleave(rec, "train-gpt2", variants, p, deadline, flops_per_token(initial, p["seq"]), peak, peer)


def mlm_batches(vocab_size: int, batch: int, seq: int, n: int = 4) -> list[dict]:
    """n masked-LM batches of random tokens, 15% selected by lmforge's BERT masking (80/10/10)."""
    from lmforge.data.collators import VocabInfo, mask_tokens

    vocab = VocabInfo(vocab_size=vocab_size, pad_id=0, cls_id=1, sep_id=2, mask_id=3)
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(4, vocab_size, (batch, seq), generator=gen)
        masked, labels = mask_tokens(ids, vocab, prob=0.15, generator=gen)
        out.append({"input_ids": masked, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def hf_bert(ours: torch.nn.Module) -> torch.nn.Module:
    """transformers' BertForMaskedLM with the weights of lmforge's Bert."""
    import transformers

    from lmforge.interop.hf import to_hf

    cfg, tensors = to_hf(ours)
    model = transformers.BertForMaskedLM(transformers.BertConfig.from_dict(cfg))
    model.load_state_dict(tensors, strict=False)  # the pooler and NSP head of BertForPreTraining are left out
    model.tie_weights()
    return model


def mlm_bert(rec: Recorder, p: dict, device: str, deadline: float, work: Path) -> None:
    import bench_train
    from lmforge.models import build, preset
    from lmforge.train.logging import flops_per_token, peak_flops
    from lmforge.train.objectives import mlm

    name, overrides = p["model"]
    torch.manual_seed(0)
    initial = build(preset(name, **overrides))
    theirs = _sdpa(rec, hf_bert(initial))
    batches = mlm_batches(initial.config.vocab_size, p["batch"], p["seq"])
    eager, compiled = _namespace(p, device, compile=False), _namespace(p, device, compile=True)
    setting = bench_train.Setting(overrides, p["batch"], p["seq"], p["lr"], 0.0)
    sync = bench_train.round_sync(eager) if device == "cuda" else False
    hf = "transformers BertForMaskedLM (SDPA)"
    peer = hf + ", torch.compile"
    variants = {
        "lmforge train()": lambda out: bench_train.run_lmforge(
            copy.deepcopy(initial), batches, eager, setting, out, objective=mlm, sync=sync),
        "lmforge train(), compiled": lambda out: bench_train.run_lmforge(
            copy.deepcopy(initial), batches, compiled, setting, out, objective=mlm, sync=sync),
        hf: lambda out: bench_train.run_plain(theirs, batches, eager, setting, hf_mlm_loss, fused=True, sync=sync),
        peer: lambda out: bench_train.run_plain(theirs, batches, compiled, setting, hf_mlm_loss, fused=True,
                                                sync=sync),
    }
    peak = peak_flops(torch.device(device), "bf16" if device == "cuda" else "fp32")
    flops = flops_per_token(initial, p["seq"], lm_fraction=0.15)  # the vocabulary projection on masked rows only
    interleave(rec, "mlm-bert", variants, p, deadline, flops, peak, peer)


# ----------------------------------------------------------------------------- decoding


def decode_gpt2(rec: Recorder, p: dict, device: str, deadline: float, work: Path) -> None:
    import bench_generate

    ours, theirs = bench_generate.prepare(p["model"], device)
    a = argparse.Namespace(device=device, prompt_len=p["prompt_len"], new_tokens=p["new_tokens"],
                           warmup=p["warmup"], repeats=p["repeats"], compile_cpu=False)
    if device != "cuda":
        rec.note("decode-gpt2: on CPU the 'CUDA graph' step is only traced and transformers' static cache "
                 "runs uncompiled")
    for i, batch in enumerate(p["batch"]):
        now = time.perf_counter()
        share = (deadline - now) / (len(p["batch"]) - i)  # of the time left, this batch size's part
        for r in bench_generate.bench_batch(p["model"], ours, theirs, batch, a, compiled=True, deadline=now + share):
            rec.row(f"decode-gpt2/{batch}/{r['impl']}", impl=r["impl"], batch=batch, new=r["new"], tok_s=r["tok_s"],
                    ms_tok=r["ms_tok"], vs_peer=r["speedup"], same=r["same"], calls=r["calls"])
        rec.note(f"batch {batch}: transformers' static-cache generate compiled its forward: "
                 f"{'yes' if hasattr(theirs, '_compiled_call') else 'no'}")


# ----------------------------------------------------------------------------- the planner


def _grid(kind: str, tmp: Path) -> list[tuple[str, str, dict]]:
    """(label, --model argument, settings): bench_plan's CUDA grid with each model's first
    setting first (the three that must be measured), or tiny models written to `tmp`."""
    if kind == "cuda":
        import bench_plan

        seen: set[str] = set()
        first, rest = [], []
        for name, kw in bench_plan.CUDA_GRID:
            (rest if name in seen else first).append((name, name, kw))
            seen.add(name)
        return first + rest
    from lmforge.interop.model_dir import save_model_dir
    from lmforge.models import build, preset

    tiny = {"tiny-gpt": preset("gpt-tiny", **TINY, max_seq_len=64),
            "tiny-bert": preset("bert-tiny", **TINY, max_seq_len=64),
            "tiny-llama": preset("llama-tiny", **TINY, n_kv_heads=1, hidden_dim=64, max_seq_len=64)}
    return [(name, str(save_model_dir(tmp / name, build(cfg))), dict(seq_len=8, batch_size=1, precision="fp32"))
            for name, cfg in tiny.items()]


def plan_argv(model: str, kw: dict, device: str, steps: int) -> list[str]:
    """`lmforge plan ... --verify --json` for one setting."""
    argv = ["plan", "--model", model, "--seq-len", str(kw["seq_len"]), "--batch-size", str(kw["batch_size"]),
            "--precision", kw["precision"], "--device", device, "--verify", "--verify-steps", str(steps), "--json"]
    return argv + (["--activation-checkpointing"] if kw.get("activation_checkpointing") else [])


def json_documents(text: str) -> list:
    """The JSON documents printed one after the other (the plan, then the verification)."""
    decoder, docs, i = json.JSONDecoder(), [], 0
    while i < len(text):
        if text[i].isspace():
            i += 1
            continue
        doc, i = decoder.raw_decode(text, i)
        docs.append(doc)
    return docs


def plan_verify(rec: Recorder, p: dict, device: str, deadline: float, work: Path) -> int:
    from bench_plan import describe
    from lmforge import cli

    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        for label, model, kw in _grid(p["grid"], Path(tmp)):
            key, setting = f"plan-verify/{label}/{describe(kw)}", describe(kw)
            if time.perf_counter() > deadline:
                rec.skip(f"{label} {setting}", "the time budget was spent")
                continue
            argv = plan_argv(model, kw, p["device"], p["steps"])
            shown = "lmforge " + " ".join([*argv[:2], label, *argv[3:]])
            out = io.StringIO()
            try:
                with contextlib.redirect_stdout(out):
                    cli.main(argv)
                _, r = json_documents(out.getvalue())
            except (Exception, SystemExit) as e:  # one failed setting must not cost the others
                failed += 1
                rec.row(key, model=label, setting=setting, error=f"{type(e).__name__}: {e}", command=shown)
                continue
            mib = 2**20
            rec.row(key, model=label, setting=setting, device=r["device"],
                    predicted_peak_mib=r["predicted_peak_bytes"] / mib,
                    measured_peak_mib=r["measured_peak_bytes"] / mib, peak_error=r["peak_error"],
                    predicted_step_s=r["predicted_step_seconds"], measured_step_s=r["measured_step_seconds"],
                    time_error=r["time_error"], command=shown)
    return 1 if failed else 0


# ----------------------------------------------------------------------------- CUDA tests


class TestRows:
    """A pytest plugin writing one row per test as soon as it has run, so that the rows of a
    run stopped at its budget are kept: outcome, seconds, and the skip reason or failure."""

    def __init__(self, rec: Recorder) -> None:
        self.rec = rec

    def pytest_runtest_logreport(self, report) -> None:
        if report.when != "call" and report.passed:
            return  # setup and teardown count only when they fail or skip
        message = ""
        if report.skipped and isinstance(report.longrepr, tuple):
            message = report.longrepr[2]  # (file, line, reason)
        elif report.failed:
            crash = getattr(report.longrepr, "reprcrash", None)
            message = crash.message if crash is not None else str(report.longrepr)
        outcome = "error" if report.failed and report.when != "call" else report.outcome
        self.rec.row(f"cuda-tests/{report.nodeid}", test=report.nodeid.split("::")[-1], outcome=outcome,
                     seconds=report.duration, message=message.splitlines()[0][:200] if message else "")


def cuda_tests(rec: Recorder, p: dict, device: str, deadline: float, work: Path) -> int:
    """pytest -m cuda tests/cuda in this process, one row per test."""
    import pytest

    os.environ["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"  # the machine's own plugins play no part
    rc = pytest.main([str(REPO / "tests" / "cuda"), "-m", "cuda", "-q", "-p", "no:cacheprovider"],
                     plugins=[TestRows(rec)])
    return 0 if rc == 0 else 1


# ----------------------------------------------------------------------------- one workload, one process

WORKLOADS: dict[str, Callable] = {"cuda-tests": cuda_tests, "train-gpt2": train_gpt2, "mlm-bert": mlm_bert,
                                  "decode-gpt2": decode_gpt2, "plan-verify": plan_verify}


def trace_only_compile(rec: Recorder) -> None:
    """Dry run: torch.compile with dynamo's "eager" backend. Dynamo still traces lmforge's
    compiled functions (a graph break under fullgraph, an unsupported call or a bad argument
    fails as on the GPU), but no kernels are generated, which on a small CPU would take
    minutes. transformers' models are left uncompiled: tracing their forward alone takes
    dynamo half a minute there, and what it would check is theirs, not this suite's."""
    real = torch.compile

    @functools.wraps(real)
    def traced(model=None, **kwargs):
        if type(model).__module__.startswith("transformers."):
            rec.skip(f"torch.compile of {type(model).__name__}", "dry run: transformers' models run uncompiled")
            return model
        kwargs = {k: v for k, v in kwargs.items() if k not in ("mode", "options")}
        return real(model, **{**kwargs, "backend": "eager"})

    torch.compile = traced


def environment(device: str) -> dict:
    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version()}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(name=torch.cuda.get_device_name(), capability="{}.{}".format(*torch.cuda.get_device_capability()),
                   memory_gib=round(props.total_memory / 2**30, 1), multiprocessors=props.multi_processor_count)
    else:
        env["name"] = f"CPU ({torch.get_num_threads()} threads)"
    return env


def loaded_distributions() -> dict[str, str]:
    """name -> version of every installed distribution this process imported from (lmforge,
    run from the source tree, aside): what the GPU machine must have."""
    top = {m.split(".")[0] for m in list(sys.modules)}
    owners = importlib.metadata.packages_distributions()
    out = {}
    for module in top:
        for dist in owners.get(module, []):
            if dist != "lmforge":
                with contextlib.suppress(importlib.metadata.PackageNotFoundError):
                    out[dist] = importlib.metadata.version(dist)
    return dict(sorted(out.items()))


def compile_stats(device: str) -> dict:
    from torch._dynamo.utils import counters

    stats = {"dynamo_graphs": counters["stats"]["unique_graphs"],
             "cudagraph_skips": counters["inductor"]["cudagraph_skips"]}
    if device == "cuda":
        stats["max_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return stats


def main(name: str, rows: Path, budget: float, dry_run: bool) -> int:
    """Run workload `name` within `budget` seconds (a margin left for the suite to collect it)."""
    deadline = time.perf_counter() + budget - max(5.0, 0.1 * budget)
    rec = Recorder(rows)
    device = "cpu" if dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print(f"{name}: torch {torch.__version__} sees no CUDA device; on a machine without a GPU use --dry-run")
        return 1
    if dry_run:
        torch.set_num_threads(1)  # tiny models: threads only contend
        trace_only_compile(rec)
        rec.note("dry run: tiny shapes on CPU, torch.compile traced with the 'eager' backend; no figure is a "
                 "measurement")
    rec.env(**environment(device))
    try:
        return WORKLOADS[name](rec, PARAMS["dry" if dry_run else "gpu"][name], device, deadline, rows.parent) or 0
    finally:
        rec.env(**compile_stats(device))
        rec.packages(loaded_distributions())
