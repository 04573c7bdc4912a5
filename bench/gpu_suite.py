"""The GPU suite: every GPU figure lmforge promises, measured in one run of at most 8 minutes
on one H200 (warm-up and compilation counted), each workload beside its peer in one process.

    python3 bench/gpu_suite.py --out gpu-results                 # on a CUDA machine: all five workloads
    python3 bench/gpu_suite.py --only decode-gpt2 --budget decode-gpt2=200   # rerun one, with more time
    python3 bench/gpu_suite.py --dry-run --out dry-run           # on CPU, tiny shapes: checks the suite itself

bench/README.md says how to run it on a GPU machine that has only a copy of the source tree
and its own Python (which wheels to bring, the one command line).

Workloads, in this order, each in its own process with its own time budget (seconds):
  cuda-tests   60  pytest -m cuda tests/cuda: compiled training step, CUDA-graph decoding equal to
                   eager, bf16 against fp32, fused AdamW (and no host sync between log steps)
  train-gpt2  110  gpt2-124m, T=1024, bf16: lmforge's train() (compiled) against transformers'
                   GPT2LMHeadModel with torch.compile and fused AdamW; tokens/s and MFU
  mlm-bert     90  bert-base masked LM, T=128, 15% masking: lmforge's train() against
                   BertForMaskedLM (SDPA, bf16), each with and without torch.compile
  decode-gpt2 170  greedy gpt2-124m, batch 1 and 16, 256 new tokens: lmforge (eager, CUDA graph)
                   against transformers' generate (default, static cache which it compiles)
  plan-verify  40  `lmforge plan --verify` on CUDA: gpt2-124m, bert-base, llama-small (and more
                   settings while time is left); predicted against measured peak memory and step time

A workload that crashes, hangs past its budget or lacks a package is recorded as such (with
the last lines of its output) and the next one runs; what a killed workload had measured is
kept, as it writes each figure as soon as it has it. MFU counts 6N + 12 L H Q T FLOPs per
token (lmforge.train.logging.flops_per_token) against the device's peak from
lmforge.train.logging.peak_flops (989 TFLOP/s bf16 on an H100 or H200).

Writes OUT/suite.json (every figure, each workload's status, wall time and error tail, the
versions and the device) and OUT/suite.md (the tables and the targets), and prints the
Markdown last. This driver imports the standard library only, so that nothing a workload
needs can stop it; it runs each workload as `gpu_suite.py --workload NAME` (gpu_workloads.py).

--dry-run runs the same code on CPU with tiny shapes (CUDA hidden; torch.compile traces
lmforge's code with its "eager" backend, so no kernels are generated, and leaves
transformers' models uncompiled; CUDA-only tests are skipped with their reason; two
workloads at a time, each with three times its budget): it proves the suite itself, not a
figure, and the test suite runs it.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WHEELS = REPO / "bench" / "gpu_wheels.txt"
MISSING_PACKAGE = 3  # a workload's exit status when an import failed
TAIL_LINES = 60  # lines of a workload's output kept in the JSON


@dataclass(frozen=True)
class Workload:
    name: str
    budget: float  # seconds on one H200, compilation and warm-up included
    needs: tuple[str, ...]  # modules it imports beyond the standard library (checked before it starts)
    what: str


BASE = ("torch", "numpy", "safetensors", "tokenizers", "yaml", "jinja2", "tqdm")
LOOP = BASE + ("jsonargparse", "tensorboard")
WORKLOADS = [
    Workload("cuda-tests", 60, LOOP + ("pytest",), "CUDA tests (pytest -m cuda tests/cuda)"),
    Workload("train-gpt2", 110, LOOP + ("transformers",), "gpt2-124m training, T=1024, bf16"),
    Workload("mlm-bert", 90, LOOP + ("transformers",), "bert-base masked LM, T=128, 15% masked, bf16"),
    Workload("decode-gpt2", 170, BASE + ("transformers",), "greedy decoding, gpt2-124m, 256 new tokens, bf16"),
    Workload("plan-verify", 40, LOOP + ("docstring_parser", "sacrebleu"), "lmforge plan --verify on CUDA"),
]
BY_NAME = {w.name: w for w in WORKLOADS}
# What a GPU machine's own Python is taken to have, with everything these require; the rest of
# what the workloads import comes from bench/gpu_wheels.txt (tests/bench checks the two cover it).
ON_GPU_MACHINE = ("torch", "transformers", "tokenizers", "safetensors", "peft", "tensorboard", "sacrebleu")
DISTRIBUTION = {"yaml": "PyYAML", "docstring_parser": "docstring-parser", "jinja2": "Jinja2"}  # module -> pip name
# Versions worth recording (read from package metadata, nothing imported).
RECORDED = ("torch", "transformers", "tokenizers", "safetensors", "numpy", "triton", "jsonargparse", "pytest")


# ----------------------------------------------------------------------------- packages


def wheel_names() -> dict[str, str]:
    """bench/gpu_wheels.txt as {normalised name: 'name==version'}."""
    names = {}
    for line in WHEELS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names[normalise(line.split("==")[0])] = line
    return names


def normalise(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def missing_message(module: str, needed_by: list[str]) -> str:
    """The one line printed for a package a workload cannot import."""
    module = module.split(".")[0]
    dist = DISTRIBUTION.get(module, module)
    listed = wheel_names().get(normalise(dist))
    bring = (f"install the wheels of bench/gpu_wheels.txt ({listed} is there), see bench/README.md" if listed else
             f"bring a wheel of {dist} for this Python (it is not in bench/gpu_wheels.txt), see bench/README.md")
    return f"missing package: {dist} (module {module}), needed by {', '.join(needed_by)}: {bring}"


def preflight(workloads: list[Workload]) -> dict[str, list[str]]:
    """Workload name -> the missing-package lines of the modules it needs that cannot be found."""
    missing: dict[str, list[str]] = {}
    modules = sorted({m for w in workloads for m in w.needs})
    for module in modules:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a finder that refuses the name
            found = False
        if not found:
            users = [w.name for w in workloads if module in w.needs]
            line = missing_message(module, users)
            print(line, flush=True)
            for name in users:
                missing.setdefault(name, []).append(line)
    return missing


def versions() -> dict[str, str | None]:
    out = {}
    for name in RECORDED:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


# ----------------------------------------------------------------------------- running a workload


def child_env(dry_run: bool) -> dict[str, str]:
    """The workload's environment: this tree's src/ and bench/ first on the path, unbuffered
    output; for a dry run, no GPU visible and one CPU thread."""
    env = dict(os.environ)
    given = [os.path.abspath(p) for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]  # it runs in REPO
    paths = [str(REPO / "src"), str(REPO / "bench"), *given]
    env.update(PYTHONPATH=os.pathsep.join(paths), PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    if dry_run:  # tiny models on a small, maybe shared CPU: one thread, no GPU
        env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    return env


def _stop(proc: subprocess.Popen) -> None:
    """End the workload and everything it started (compile workers): its process group."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _pump(stream, log, prefix: str, echo: bool) -> None:
    for line in stream:
        log.write(line)
        log.flush()
        if echo:
            print(f"{prefix} {line}", end="", flush=True)


def read_records(path: Path) -> list[dict]:
    """The JSON lines a workload wrote (a torn last line from a killed one is dropped). As
    lmforge.train.logging.read_records does: the driver imports the standard library only, so
    that it runs (and reports what is missing) on a machine without lmforge's dependencies."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def collect(records: list[dict]) -> dict:
    """Rows (a later row with the same key replaces an earlier one), skips, notes, env."""
    rows: dict[str, dict] = {}
    out: dict = {"rows": [], "skipped": [], "notes": [], "env": {}, "packages": {}}
    for r in records:
        kind = r.pop("kind", None)
        if kind == "row":
            rows[r.pop("key")] = r
        elif kind == "skip":
            if r not in out["skipped"]:  # the same skip in every round is said once
                out["skipped"].append(r)
        elif kind == "note":
            out["notes"].append(r["text"])
        elif kind in ("env", "packages"):
            out[kind].update(r)
    out["rows"] = list(rows.values())
    return out


def run_process(cmd: list[str], budget: float, log_path: Path, env: dict[str, str], prefix: str,
                echo: bool) -> int | None:
    """Run cmd in its own process group, its output to log_path (and echoed with prefix);
    past `budget` seconds the whole group is stopped. The exit status, None when stopped."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=env,
                                start_new_session=True)
        pump = threading.Thread(target=_pump, args=(proc.stdout, log, prefix, echo), daemon=True)
        pump.start()
        try:
            rc = proc.wait(timeout=budget)
        except subprocess.TimeoutExpired:
            _stop(proc)
            rc = None
        pump.join(timeout=10)
    return rc


def run_workload(w: Workload, budget: float, out: Path, dry_run: bool, echo: bool) -> dict:
    """Run one workload in its own process, stopped at `budget` seconds; its result."""
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    rows_path, log_path = work / f"{w.name}.jsonl", work / f"{w.name}.log"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--workload", w.name, "--rows", str(rows_path),
           "--seconds", f"{budget:g}"] + (["--dry-run"] if dry_run else [])
    start = time.monotonic()
    rc = run_process(cmd, budget, log_path, child_env(dry_run), f"[{w.name}]", echo)
    wall = time.monotonic() - start
    status = ("timeout" if rc is None else "ok" if rc == 0 else "missing-package" if rc == MISSING_PACKAGE
              else "failed")
    result = {"name": w.name, "what": w.what, "status": status, "rc": rc, "budget_s": budget,
              "wall_s": round(wall, 1), **collect(read_records(rows_path)), "error": []}
    if status != "ok":
        result["error"] = log_path.read_text(errors="replace").splitlines()[-TAIL_LINES:]
    if rc is None:
        result["error"].append(f"stopped at its budget of {budget:g} s")
    return result


# ----------------------------------------------------------------------------- the report


def targets(results: dict[str, dict], dry_run: bool) -> list[dict]:
    """The issue's targets against what was measured (met: None in a dry run or when unmeasured)."""
    def rows(name, impl_prefix, **match):
        return [r for r in results.get(name, {}).get("rows", []) if str(r.get("impl", "")).startswith(impl_prefix)
                and all(r.get(k) == v for k, v in match.items())]

    def best(rs, key):
        values = [r[key] for r in rs if r.get(key) is not None]
        return max(values) if values else None

    out = []

    def add(what, ours, peer, target, higher=True, failed=False):
        met = None if dry_run or ours is None else (ours >= target if higher else ours <= target) and not failed
        out.append({"what": what, "lmforge": ours, "peer": peer, "target": target, "met": met})

    add("training gpt2-124m T=1024 bf16: MFU", best(rows("train-gpt2", "lmforge"), "mfu"),
        best(rows("train-gpt2", "transformers"), "mfu"), 0.50)
    for batch, target in ((1, 2500.0), (16, 15000.0)):
        add(f"greedy decoding gpt2-124m batch {batch}: tokens/s", best(rows("decode-gpt2", "lmforge", batch=batch),
            "tok_s"), best(rows("decode-gpt2", "transformers", batch=batch), "tok_s"), target)
    add("BERT-base MLM T=128: tokens/s", best(rows("mlm-bert", "lmforge"), "tok_s"),
        best(rows("mlm-bert", "transformers"), "tok_s"), 600_000.0)
    plan = results.get("plan-verify", {}).get("rows", [])
    errors = [abs(r[k]) for r in plan for k in ("peak_error", "time_error") if r.get(k) is not None]
    add("planner: largest error, peak memory or step time", max(errors) if errors else None, None, 0.15,
        higher=False, failed=any("error" in r for r in plan))
    tests = results.get("cuda-tests", {}).get("rows", [])
    passed = sum(r.get("outcome") == "passed" for r in tests)
    add("CUDA tests passed (of all)", passed if tests else None, None, float(len(tests) or 1))
    return out


def _fmt(value, spec: str) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    try:
        return format(value, spec) if spec else str(value)
    except (TypeError, ValueError):
        return str(value)


# (key, header, format spec) of each workload's table.
COLUMNS = {
    "cuda-tests": [("test", "test", ""), ("outcome", "outcome", ""), ("seconds", "seconds", ".1f"),
                   ("message", "message", "")],
    "train-gpt2": [("impl", "implementation", ""), ("shape", "batch x seq", ""), ("tok_s", "tokens/s", ",.0f"),
                   ("step_ms", "ms/step", ".1f"), ("mfu", "MFU", ".1%"), ("vs_peer", "vs transformers", ".2f"),
                   ("timed_steps", "timed steps", ""), ("first_round_s", "first round s (compile)", ".1f")],
    "decode-gpt2": [("impl", "implementation", ""), ("batch", "batch", ""), ("new", "new tokens", ""),
                    ("tok_s", "tokens/s", ",.0f"), ("ms_tok", "ms/step", ".3f"), ("vs_peer", "vs transformers", ".2f"),
                    ("same", "same tokens", ""), ("calls", "timed calls", "")],
    "plan-verify": [("model", "model", ""), ("setting", "setting", ""), ("device", "predicted for", ""),
                    ("predicted_peak_mib", "predicted peak MiB", ",.0f"), ("measured_peak_mib", "measured MiB", ",.0f"),
                    ("peak_error", "error", "+.1%"), ("predicted_step_s", "predicted step s", ".4f"),
                    ("measured_step_s", "measured s", ".4f"), ("time_error", "error", "+.1%"), ("error", "failed", "")],
}
COLUMNS["mlm-bert"] = COLUMNS["train-gpt2"]


def _table(columns, rows: list[dict]) -> list[str]:
    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(k), spec) for k, _, spec in columns) + " |")
    return lines


def markdown(report: dict) -> str:
    dev = report["device"]
    dry = " (dry run: tiny shapes on CPU, no figure is a measurement)" if report["dry_run"] else ""
    head = [f"# lmforge GPU suite{dry}",
            "", f"{report['date']}, {dev.get('name', 'device unknown')}, Python {report['python']}, "
            + ", ".join(f"{k} {v}" for k, v in report["versions"].items() if v) + f"; wall {report['wall_s']:.0f} s "
            f"of {report['budget_s']:.0f} s budgeted", "", f"    {report['command']}", "", "## Targets", "",
            "| target | lmforge | peer | target | met |", "|---|---|---|---|---|"]
    for t in report["targets"]:
        spec = ".1%" if "MFU" in t["what"] or "error" in t["what"] else ",.0f"
        met = {True: "yes", False: "**no**", None: "n/a"}[t["met"]]
        head.append(f"| {t['what']} | {_fmt(t['lmforge'], spec)} | {_fmt(t['peer'], spec)} | "
                    f"{_fmt(t['target'], spec)} | {met} |")
    body = []
    for w in report["workloads"]:
        body += ["", f"## {w['name']}: {w['what']}", "",
                 f"status **{w['status']}**, {w['wall_s']:.0f} s of a {w['budget_s']:g} s budget", ""]
        body += _table(COLUMNS[w["name"]], w["rows"]) if w["rows"] else ["(no figures)"]
        items = [f"- skipped: {s['what']}: {s['reason']}" for s in w["skipped"]] + [f"- note: {n}" for n in w["notes"]]
        body += [""] + items if items else []
        if w["error"]:
            body += ["", "last lines of its output:", "", "```", *w["error"][-20:], "```"]
    return "\n".join(head + body) + "\n"


def write_text(path: Path, text: str) -> None:
    """Write through a temporary file and a rename, so that a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- command line


def budget_overrides(items: list[str]) -> dict[str, float]:
    out = {}
    for item in items:
        name, _, seconds = item.partition("=")
        if name not in BY_NAME or not seconds:
            raise SystemExit(f"gpu_suite: --budget takes NAME=SECONDS with NAME one of {', '.join(BY_NAME)}; "
                             f"got {item!r}")
        out[name] = float(seconds)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="gpu-results", help="folder for suite.json, suite.md and work/ (logs)")
    p.add_argument("--only", nargs="+", choices=list(BY_NAME), help="run only these workloads")
    p.add_argument("--skip", nargs="+", choices=list(BY_NAME), default=[], help="leave these out")
    p.add_argument("--budget", nargs="+", default=[], metavar="NAME=SECONDS", help="another time budget for some")
    p.add_argument("--budget-scale", type=float, default=None,
                   help="multiply every budget (a slower GPU; default 1, and 3 for a dry run on a small, shared CPU)")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU: check the suite, measure nothing")
    p.add_argument("--quiet", action="store_true", help="do not echo the workloads' output")
    p.add_argument("--jobs", type=int, default=None,
                   help="workloads run side by side: dry run only (default 2 there, else 1)")
    p.add_argument("--workload", choices=list(BY_NAME), help=argparse.SUPPRESS)  # internal: run one, in this process
    p.add_argument("--rows", help=argparse.SUPPRESS)
    p.add_argument("--seconds", type=float, help=argparse.SUPPRESS)
    return p


def run_one(a: argparse.Namespace) -> int:
    """The child side: run one workload here; a missing package is one line, exit status 3."""
    try:
        import gpu_workloads  # bench/ is on the path (this script's folder)

        return gpu_workloads.main(a.workload, Path(a.rows), a.seconds, a.dry_run)
    except ModuleNotFoundError as e:
        print(missing_message(e.name or str(e), [a.workload]), flush=True)
        return MISSING_PACKAGE


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a.workload:
        return run_one(a)
    jobs = a.jobs or (2 if a.dry_run else 1)
    if jobs > 1 and not a.dry_run:
        raise SystemExit("gpu_suite: --jobs above 1 is for --dry-run only (timed workloads must not share the GPU)")
    overrides = budget_overrides(a.budget)
    selected = [w for w in WORKLOADS if (not a.only or w.name in a.only) and w.name not in a.skip]
    scale = a.budget_scale or (3.0 if a.dry_run else 1.0)
    budgets = {w.name: overrides.get(w.name, w.budget) * scale for w in selected}
    out = Path(a.out).resolve()  # the workloads run in the repository root
    out.mkdir(parents=True, exist_ok=True)
    print(f"gpu_suite: {len(selected)} workloads, {sum(budgets.values()):.0f} s budgeted"
          f"{', dry run on CPU' if a.dry_run else ''}; writing {out}/suite.json and suite.md", flush=True)
    missing = preflight(selected)
    def run(w: Workload) -> dict:
        if w.name in missing:
            r = {"name": w.name, "what": w.what, "status": "missing-package", "rc": None, "budget_s": budgets[w.name],
                 "wall_s": 0.0, "rows": [], "skipped": [], "notes": [], "env": {}, "packages": {},
                 "error": missing[w.name]}
        else:
            r = run_workload(w, budgets[w.name], out, a.dry_run, echo=not a.quiet)
        print(f"gpu_suite: {w.name} {r['status']} in {r['wall_s']:.0f} s (budget {budgets[w.name]:g} s), "
              f"{len(r['rows'])} figures", flush=True)
        return r

    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=jobs) as pool:  # one at a time on a GPU: timings must not overlap
        results = {r["name"]: r for r in pool.map(run, selected)}
    device = next((r["env"] for r in results.values() if r["env"].get("name")), {})
    report = {"suite": "lmforge GPU suite", "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "command": "python3 bench/gpu_suite.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "dry_run": a.dry_run, "python": platform.python_version(), "platform": platform.platform(),
              "versions": versions(), "device": device, "budget_s": sum(budgets.values()),
              "wall_s": round(time.monotonic() - start, 1), "workloads": list(results.values()),
              "targets": targets(results, a.dry_run)}
    write_text(out / "suite.json", json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    write_text(out / "suite.md", text)
    print("\n" + text, flush=True)
    return 0 if all(r["status"] == "ok" for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
