"""bench/gpu_suite.py: its dry run writes every workload and field, its command lines in
bench/README.md are the ones it takes, its wheels and the GPU machine's packages cover what it
imports, a missing package is one line, and a stopped or crashing workload is recorded."""

import importlib.metadata
import importlib.util
import json
import math
import os
import re
import shlex
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("gpu_suite", REPO / "bench" / "gpu_suite.py")
suite = sys.modules["gpu_suite"] = importlib.util.module_from_spec(_spec)  # dataclasses look their module up
_spec.loader.exec_module(suite)

README = (REPO / "bench" / "README.md").read_text()
# Imported by a library only when installed (torch: dill; transformers, huggingface_hub: the rest).
OPTIONAL = {"dill", "scipy", "attrs", "charset-normalizer", "sniffio"}


def _env(**extra) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), **extra}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def _closure(names) -> set[str]:
    """The distributions `names` require, transitively, as installed here (no extras)."""
    seen, todo = set(), list(names)
    while todo:
        name = canonicalize_name(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for line in requires:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


def _wheels() -> dict[str, str]:
    return {canonicalize_name(k): v.split("==")[1] for k, v in suite.wheel_names().items()}


# ---- the dry run -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dry")
    start = time.monotonic()
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_suite.py"), "--dry-run", "--quiet", "--out",
                           str(out)], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads((out / "suite.json").read_text())
    return report, (out / "suite.md").read_text(), time.monotonic() - start


def _rows(report, name):
    return next(w for w in report["workloads"] if w["name"] == name)["rows"]


@pytest.mark.slow
def test_dry_run_records_every_workload_within_its_budget(dry_run):
    report, _, _ = dry_run
    assert report["dry_run"] is True and report["versions"]["torch"]
    assert [w["name"] for w in report["workloads"]] == [w.name for w in suite.WORKLOADS]
    for w in report["workloads"]:
        assert w["status"] == "ok", (w["name"], w["error"])
        assert 0 < w["wall_s"] <= w["budget_s"] and w["rows"], w["name"]
        assert w["env"]["name"].startswith("CPU") and w["env"]["torch"]
    assert [t["what"] for t in report["targets"]] == [t["what"] for t in suite.targets({}, True)]
    assert all(t["met"] is None for t in report["targets"])  # a dry run measures nothing


@pytest.mark.slow
def test_dry_run_measures_both_sides_of_every_workload(dry_run):
    report, _, _ = dry_run
    for name in ("train-gpt2", "mlm-bert"):
        rows = _rows(report, name)
        assert {r["impl"].split()[0] for r in rows} == {"lmforge", "transformers"}
        assert len(rows) == {"train-gpt2": 2, "mlm-bert": 4}[name]
        for r in rows:
            assert r["tok_s"] > 0 and r["step_ms"] > 0 and 0 < r["mfu"] < 1 and r["vs_peer"] > 0, r
            assert r["timed_steps"] == r["rounds"] * 2 and r["first_round_s"] > 0, r
    decode = _rows(report, "decode-gpt2")
    impls = {"lmforge", "transformers", "lmforge (CUDA graph)", "transformers (static cache, compiled)"}
    for batch in (1, 2):
        rows = [r for r in decode if r["batch"] == batch]
        assert {r["impl"] for r in rows} == impls
        assert all(r["same"] and r["tok_s"] > 0 and r["calls"] >= 1 for r in rows), rows
    plan = _rows(report, "plan-verify")
    assert [r["model"] for r in plan] == ["tiny-gpt", "tiny-bert", "tiny-llama"]
    for r in plan:
        assert math.isfinite(r["peak_error"]) and math.isfinite(r["time_error"]) and r["measured_peak_mib"] > 0, r
        assert r["command"].startswith("lmforge plan --model ") and "--verify" in r["command"]


@pytest.mark.slow
def test_dry_run_lists_every_cuda_test_as_skipped_with_its_reason(dry_run):
    report, _, _ = dry_run
    rows = _rows(report, "cuda-tests")
    defined = re.findall(r"^def (test_\w+)", (REPO / "tests" / "cuda" / "test_cuda_paths.py").read_text(), re.M)
    assert {r["test"].split("[")[0] for r in rows} == set(defined)
    assert all(r["outcome"] == "skipped" and "CUDA" in r["message"] for r in rows)


@pytest.mark.slow
def test_dry_run_markdown_has_the_targets_and_every_table(dry_run):
    report, md, _ = dry_run
    assert md.startswith("# lmforge GPU suite (dry run") and "## Targets" in md
    for w in report["workloads"]:
        assert f"## {w['name']}: " in md
        for r in w["rows"]:
            assert f"| {r.get('impl', r.get('test', r.get('model')))} |" in md
    for t in report["targets"]:
        assert any(line.startswith(f"| {t['what']} | ") and line.endswith(" | n/a |") for line in md.splitlines())


@pytest.mark.slow
def test_the_workloads_import_only_what_the_gpu_machine_has_or_the_wheels_bring(dry_run):
    report, _, _ = dry_run
    allowed = _closure(suite.ON_GPU_MACHINE) | set(_wheels()) | OPTIONAL
    for w in report["workloads"]:
        loaded = {canonicalize_name(d) for d in w["packages"]}
        assert loaded, w["name"]
        assert loaded <= allowed, (w["name"], sorted(loaded - allowed))
        assert not loaded & {"matplotlib", "rouge-score", "seqeval", "fastapi", "uvicorn"}, w["name"]
        owners = importlib.metadata.packages_distributions()
        for module in suite.BY_NAME[w["name"]].needs:  # what the suite checks before a workload is what it uses
            assert {canonicalize_name(d) for d in owners[module]} & loaded, (w["name"], module)


# ---- the command lines -------------------------------------------------------------------------

def _code_lines() -> list[str]:
    blocks = re.findall(r"^```\n(.*?)^```", README, re.M | re.S)
    return [line for block in blocks for line in block.splitlines() if line.strip()]


def _suite_args(words: list[str]) -> list[str]:
    i = words.index("bench/gpu_suite.py")
    assert words[i - 1] == "python3"
    return words[i + 1:]


def test_readme_command_lines_are_the_ones_the_suite_takes():
    lines = _code_lines()
    download = shlex.split(next(line for line in lines if "pip download" in line))
    assert download[:4] == ["python3", "-m", "pip", "download"]
    assert {"--no-deps", "--only-binary=:all:"} <= set(download)
    assert download[download.index("--python-version") + 1] == "3.12"
    assert download[download.index("-r") + 1] == "bench/gpu_wheels.txt"
    wheel_dir = download[download.index("-d") + 1]

    install_line = next(line for line in lines if "pip install" in line)
    install, run = (shlex.split(part) for part in install_line.split("&&"))
    assert install[:4] == ["python3", "-m", "pip", "install"] and {"--no-index", "--no-deps"} <= set(install)
    target = install[install.index("--target") + 1]
    assert install[-1] == f"{wheel_dir}/*.whl"
    assert run[0] == f"PYTHONPATH={target}:src"

    invocations = [shlex.split(line.split("&&")[-1]) for line in lines if "bench/gpu_suite.py" in line]
    assert len(invocations) >= 3  # the whole suite, a rerun, the dry run
    parser = suite.build_parser()
    for words in invocations:
        a = parser.parse_args(_suite_args(words))
        suite.budget_overrides(a.budget)  # NAME=SECONDS with known names
        assert words[0].startswith("PYTHONPATH=") and "src" in words[0].split("=", 1)[1].split(":")
    assert any("--dry-run" in words for words in invocations)


def test_readme_budgets_are_the_suites_and_fit_eight_minutes():
    table = dict(re.findall(r"^\| `([a-z0-9-]+)` \| (\d+) \|", README, re.M))
    assert {k: float(v) for k, v in table.items()} == {w.name: w.budget for w in suite.WORKLOADS}
    listed = dict(re.findall(r"^  ([a-z0-9]+-[a-z0-9]+) +(\d+)  ", suite.__doc__, re.M))
    assert {k: float(v) for k, v in listed.items()} == {w.name: w.budget for w in suite.WORKLOADS}
    total = sum(w.budget for w in suite.WORKLOADS)
    assert total <= 480 and f"{total:g} in all" in README


def test_wheels_are_pinned_once_and_satisfy_what_requires_them():
    lines = [line for line in (REPO / "bench" / "gpu_wheels.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert all(re.fullmatch(r"[A-Za-z0-9_.-]+==[0-9][0-9A-Za-z.]*", line) for line in lines), lines
    pins = _wheels()
    assert len(pins) == len(lines)  # one version of each
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    needs = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]]
    needs += [Requirement(r) for r in importlib.metadata.requires("jsonargparse") if 'extra == "signatures"' in r]
    for req in needs:
        name = canonicalize_name(req.name)
        if name in pins:
            assert req.specifier.contains(pins[name]), (str(req), pins[name])
    assert {"jsonargparse", "docstring-parser", "typeshed-client", "pytest"} <= set(pins)


# ---- failures are recorded, never a traceback --------------------------------------------------

BLOCKER = '''
import sys

class Block:
    """Hides jsonargparse, as on a GPU machine without its wheel."""
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "jsonargparse":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, Block())
'''


@pytest.mark.slow
def test_a_missing_package_is_one_line_naming_its_wheel(tmp_path):
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(textwrap.dedent(BLOCKER))
    env = _env()
    env["PYTHONPATH"] = f"{tmp_path / 'site'}{os.pathsep}{env['PYTHONPATH']}"
    script = str(REPO / "bench" / "gpu_suite.py")
    # The suite: found missing before the workload starts; the workload is recorded as such.
    proc = subprocess.run([sys.executable, script, "--dry-run", "--quiet", "--only", "plan-verify", "--out",
                           str(tmp_path / "out")], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stdout + proc.stderr
    line = next(x for x in proc.stdout.splitlines() if x.startswith("missing package:"))
    assert "jsonargparse" in line and "plan-verify" in line and "jsonargparse==4.53.0 is there" in line
    (w,) = json.loads((tmp_path / "out" / "suite.json").read_text())["workloads"]
    assert w["status"] == "missing-package" and w["error"] == [line]
    # A workload started anyway: the same line from inside it, exit status 3.
    proc = subprocess.run([sys.executable, script, "--workload", "train-gpt2", "--rows", str(tmp_path / "r.jsonl"),
                           "--seconds", "60", "--dry-run"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == suite.MISSING_PACKAGE and "Traceback" not in proc.stdout + proc.stderr
    assert proc.stdout.strip().splitlines()[-1].startswith("missing package: jsonargparse")


def test_a_process_past_its_budget_is_stopped_with_its_children(tmp_path):
    child = "import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])"
    code = f"{child}; print('grandchild', p.pid, flush=True); time.sleep(60)"
    log = tmp_path / "log"
    start = time.monotonic()
    rc = suite.run_process([sys.executable, "-c", code], 3, log, dict(os.environ), "[t]", echo=False)
    assert rc is None and time.monotonic() - start < 30
    pid = int(log.read_text().split()[1])
    time.sleep(0.5)
    assert not _alive(pid)  # the whole process group went


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its new parent to reap it counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z")


def test_a_crash_is_its_exit_status_and_output(tmp_path):
    log = tmp_path / "log"
    rc = suite.run_process([sys.executable, "-c", "print('partial'); raise SystemExit(7)"], 30, log,
                           dict(os.environ), "[t]", echo=False)
    assert rc == 7 and log.read_text() == "partial\n"


def test_rows_are_replaced_by_key_and_a_torn_line_is_dropped(tmp_path):
    path = tmp_path / "rows.jsonl"
    lines = [{"kind": "env", "name": "GPU"}, {"kind": "row", "key": "a", "tok_s": 1},
             {"kind": "row", "key": "b", "tok_s": 5}, {"kind": "row", "key": "a", "tok_s": 2},
             {"kind": "skip", "what": "x", "reason": "y"}, {"kind": "skip", "what": "x", "reason": "y"},
             {"kind": "note", "text": "n"}]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"kind": "row", "key": "c", "tok')
    got = suite.collect(suite.read_records(path))
    assert got["rows"] == [{"tok_s": 2}, {"tok_s": 5}]
    assert got["skipped"] == [{"what": "x", "reason": "y"}] and got["notes"] == ["n"] and got["env"] == {"name": "GPU"}


def _workload(name, rows, status="ok", error=()):
    return {"name": name, "what": name, "status": status, "rc": 0, "budget_s": 60, "wall_s": 10.0, "rows": rows,
            "skipped": [], "notes": [], "env": {}, "packages": {}, "error": list(error)}


def test_targets_compare_the_best_lmforge_figure_and_the_markdown_says_what_failed():
    results = {
        "train-gpt2": _workload("train-gpt2", [{"impl": "lmforge train(), compiled", "mfu": 0.52},
                                               {"impl": "transformers GPT2LMHeadModel", "mfu": 0.25}]),
        "decode-gpt2": _workload("decode-gpt2", [
            {"impl": "lmforge", "batch": 1, "tok_s": 900.0}, {"impl": "lmforge (CUDA graph)", "batch": 1,
                                                               "tok_s": 2600.0},
            {"impl": "lmforge (CUDA graph)", "batch": 16, "tok_s": 14000.0},
            {"impl": "transformers", "batch": 16, "tok_s": 1400.0}]),
        "mlm-bert": _workload("mlm-bert", [], status="timeout", error=["Traceback", "stopped at its budget of 60 s"]),
        "plan-verify": _workload("plan-verify", [{"model": "gpt2-124m", "peak_error": 0.02, "time_error": -0.12},
                                                 {"model": "llama-small", "error": "RuntimeError: boom"}]),
        "cuda-tests": _workload("cuda-tests", [{"test": "a", "outcome": "passed"}, {"test": "b", "outcome": "passed"}]),
    }
    met = {t["what"]: t["met"] for t in suite.targets(results, dry_run=False)}
    assert list(met.values()) == [True, True, False, None, False, True]  # BERT unmeasured; a plan setting failed
    t = suite.targets(results, dry_run=False)
    assert t[1]["lmforge"] == 2600.0 and t[2]["peer"] == 1400.0
    report = {"dry_run": False, "device": {"name": "NVIDIA H200"}, "date": "d", "python": "3.12", "versions": {},
              "wall_s": 300.0, "budget_s": 470.0, "command": "python3 bench/gpu_suite.py",
              "workloads": list(results.values()), "targets": t}
    md = suite.markdown(report)
    assert "| **no** |" in md and "status **timeout**" in md and "stopped at its budget of 60 s" in md
    assert "RuntimeError: boom" in md and "NVIDIA H200" in md


def test_each_cuda_test_becomes_a_row_as_it_runs(tmp_path):
    """The cuda-tests workload's pytest plugin: passed, failed (with the assertion), skipped
    (with the reason) and a failing fixture (an error), one row each."""
    (tmp_path / "test_sample.py").write_text(textwrap.dedent('''
        import pytest

        @pytest.fixture
        def broken():
            raise RuntimeError("no device")

        def test_ok():
            pass

        def test_bad():
            assert 1 == 2, "one is not two"

        @pytest.mark.skipif(True, reason="needs a CUDA GPU")
        def test_skipped():
            pass

        def test_error(broken):
            pass
    '''))
    script = textwrap.dedent(f'''
        import sys
        from pathlib import Path
        import pytest
        import gpu_workloads
        rec = gpu_workloads.Recorder(Path({str(tmp_path / "rows.jsonl")!r}))
        sys.exit(pytest.main([{str(tmp_path / "test_sample.py")!r}, "-q", "-p", "no:cacheprovider"],
                             plugins=[gpu_workloads.TestRows(rec)]))
    ''')
    env = _env(PYTHONPATH=f"{REPO / 'src'}{os.pathsep}{REPO / 'bench'}", PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    rows = {r["test"]: r for r in suite.collect(suite.read_records(tmp_path / "rows.jsonl"))["rows"]}
    assert {k: r["outcome"] for k, r in rows.items()} == {"test_ok": "passed", "test_bad": "failed",
                                                          "test_skipped": "skipped", "test_error": "error"}
    assert "one is not two" in rows["test_bad"]["message"] and "needs a CUDA GPU" in rows["test_skipped"]["message"]
    assert "no device" in rows["test_error"]["message"]
