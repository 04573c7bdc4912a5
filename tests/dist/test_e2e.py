"""The commands a user runs, under torchrun (2 CPU processes on gloo): `lmforge pretrain` killed
mid-way, restarted by torchrun and resumed on other numbers of processes, ending exactly where an
uninterrupted single-process run ends, with a model transformers loads; `lmforge finetune`
under FSDP2 writing one run with every validation example scored once; two "nodes" on loopback
through torchrun's c10d rendezvous. Few and tiny: they guard the promise, not the math (see
test_dist.py for the losses)."""

import importlib.resources
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmforge.api import LM
from lmforge.data.prepare import prepare_corpus
from lmforge.interop.model_dir import save_model_dir
from lmforge.models import BertConfig, build, preset
from lmforge.tokenizer import train_tokenizer

pytestmark = pytest.mark.slow
FAULT = Path(__file__).with_name("fault.py")
SHAKESPEARE = importlib.resources.files("lmforge") / "corpus" / "tinyshakespeare.txt"
ENV = {**{k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")},
       "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}


def _run(args: list[str], nproc: int = 1, launcher: list[str] = (), env: dict | None = None,
         expect: int = 0) -> subprocess.CompletedProcess:
    """`lmforge ARGS` in one process, or under torchrun with `nproc` processes per node."""
    if nproc == 1 and not launcher:
        command = [sys.executable, "-m", "lmforge", *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", *(launcher or ["--standalone"]),
                   f"--nproc_per_node={nproc}", str(FAULT), *args]
    proc = subprocess.run(command, env={**ENV, "LMFORGE_FAULT_STEP": "0", "LMFORGE_FAULT_RANK": "0",
                                        "LMFORGE_FAULT_MARKER": os.devnull + ".none", **(env or {})},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == expect, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _summaries(proc: subprocess.CompletedProcess) -> list[dict]:
    """The JSON summaries a command printed (one line, or indented over several)."""
    found, lines = [], None
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            lines = []
        if lines is not None:
            lines.append(line)
            if line.startswith("}") or line.endswith("}") and line.startswith("{"):
                found.append(json.loads("\n".join(lines)))
                lines = None
    return found


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    text = SHAKESPEARE.read_text(encoding="utf-8")[:60_000]
    (root / "corpus.txt").write_text(text, encoding="utf-8")
    tok = train_tokenizer(texts=text.split("\n\n"), kind="bpe", vocab_size=300)
    tok.save(root / "tok")
    prepare_corpus(tok, root / "corpus.txt", root / "data", val_fraction=0.05, num_workers=1)
    return root


def _pretrain_args(corpus: Path, out: Path, steps: int, micro_batch: int, strategy: str = "ddp") -> list[str]:
    return ["pretrain", "--data.train", str(corpus / "data"), "--data.tokenizer", str(corpus / "tok"),
            "--data.seq_len", "32", "--model.preset", "gpt-tiny", "--model.overrides.dim", "32",
            "--model.overrides.n_layers", "2", "--model.overrides.n_heads", "2",
            "--train.device", "cpu", "--train.precision", "fp32", "--train.max_steps", str(steps),
            "--train.micro_batch_size", str(micro_batch), "--train.out_dir", str(out), "--optim.lr", "3e-3",
            "--optim.warmup_steps", "0", "--optim.schedule", "constant", "--log.every", "1", "--log.progress",
            "false", "--log.plot", "false", "--eval.every", "4", "--eval.steps", "2", "--checkpoint.every", "2",
            "--checkpoint.keep_last", "10", "--checkpoint.keep_best", "false", "--dist.strategy", strategy]


def _losses(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "train_loss" in r]
    assert len(steps) == len(set(steps)), steps  # each step logged once, across restarts and resumes
    return {r["step"]: r["train_loss"] for r in records if "train_loss" in r}


def test_pretrain_killed_under_torchrun_resumes_on_other_world_sizes(corpus, tmp_path):
    """1 process (steps 1-2) -> 2 processes under FSDP2 (steps 3-6; rank 1 is SIGKILLed before
    step 5, torchrun --max-restarts restarts both, they resume from the sharded step-4
    checkpoint) -> 1 process again (steps 7-8). The global batch stays 8 rows throughout, so
    every loss equals the uninterrupted single-process run's, and so does the final model,
    which transformers loads."""
    ref, run = tmp_path / "reference", tmp_path / "run"
    _run(_pretrain_args(corpus, ref, 8, 8))
    _run(_pretrain_args(corpus, run, 2, 8))
    marker = tmp_path / "killed"
    proc = _run(_pretrain_args(corpus, run, 6, 4, "fsdp"), nproc=2, launcher=["--standalone", "--max-restarts=1"],
                env={"LMFORGE_FAULT_STEP": "5", "LMFORGE_FAULT_RANK": "1", "LMFORGE_FAULT_MARKER": str(marker)})
    assert marker.read_text() == "killed rank 1 before step 5\n"
    assert [s["step"] for s in _summaries(proc)] == [6]  # one summary: rank 0's, after the restart
    history = json.loads((run / "run.json").read_text())["history"]
    assert [(h["event"], h["step"]) for h in history] == [("start", 0), ("resume", 2), ("resume", 4)]
    manifest = json.loads((run / "checkpoints" / "step_00000006" / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and any(f.startswith("dcp/__1_") for f in manifest["files"])
    _run(_pretrain_args(corpus, run, 8, 8))

    got, want = _losses(run), _losses(ref)
    assert sorted(got) == list(range(1, 9))
    torch.testing.assert_close([got[s] for s in sorted(got)], [want[s] for s in sorted(got)], rtol=1e-5, atol=1e-6)
    transformers = pytest.importorskip("transformers")
    ours = transformers.AutoModelForCausalLM.from_pretrained(run / "model").state_dict()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(ref / "model").state_dict()
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-4, atol=1e-5, msg=name)


def _classification_data(root: Path) -> tuple[Path, Path, Path]:
    """A tiny sentiment task (the label is in the words) and a random-init BERT for it."""
    g = torch.Generator().manual_seed(0)
    good, bad, filler = ["good", "great", "fine"], ["bad", "awful", "poor"], ["the", "film", "was", "a", "plot"]
    rows = []
    for i in range(122):
        words = [filler[int(j)] for j in torch.randint(0, 5, (6,), generator=g)]
        label = "pos" if i % 2 else "neg"
        words.insert(int(torch.randint(0, 6, (), generator=g)), (good if i % 2 else bad)[i % 3])
        rows.append(f"{' '.join(words)},{label}")
    train, valid = root / "train.csv", root / "valid.csv"
    train.write_text("text,label\n" + "\n".join(rows[:80]) + "\n")
    valid.write_text("text,label\n" + "\n".join(rows[80:]) + "\n")  # 42 rows: 11 batches of 4 for 2 processes
    tok = train_tokenizer(texts=[r.split(",")[0] for r in rows], kind="wordpiece", vocab_size=60, min_frequency=1)
    torch.manual_seed(0)
    model = build(BertConfig(vocab_size=tok.vocab_size, max_seq_len=32, dim=32, n_layers=2, n_heads=2))
    return train, valid, save_model_dir(root / "bert", model, tokenizer=tok, format="hf")


def test_finetune_under_torchrun_writes_one_run_and_scores_each_example_once(tmp_path):
    train, valid, base = _classification_data(tmp_path)
    out = tmp_path / "run"
    common = ["--batch-size", "4", "--max-length", "16", "--device", "cpu", "--precision", "fp32", "--no-progress"]
    proc = _run(["finetune", "classify", "--model", str(base), "--train", str(train), "--valid", str(valid),
                 "--out", str(out), "--epochs", "8", "--lr", "3e-3", "--strategy", "fsdp", "--log-every", "1",
                 *common], nproc=2)
    summaries = _summaries(proc)
    assert len(summaries) == 1 and summaries[0]["n"] == 42
    said = [line for line in proc.stderr.splitlines() if line.startswith("training ")]
    assert len(said) == 1, proc.stderr  # lmforge's notes once, not once per process
    predictions = (out / "predictions.jsonl").read_text().splitlines()
    assert len(predictions) == 42  # every validation example exactly once, none from a padded shard
    assert sorted(p.name for p in out.iterdir() if p.name in ("metrics.jsonl", "tb", "model")) == \
        ["metrics.jsonl", "model", "tb"] and len(list((out / "tb").iterdir())) == 1
    written = json.loads((out / "metrics.json").read_text())
    assert written["run"]["processes"] == 2 and written["accuracy"] > 0.9
    again = _summaries(_run(["evaluate", "classify", "--model", str(out / "model"), "--data", str(valid), *common]))
    assert again[0]["accuracy"] == written["accuracy"]  # the exported model scores as the run said
    assert again[0]["loss"] == pytest.approx(written["loss"], rel=1e-5)


def test_a_generative_task_under_fsdp_scores_what_its_exported_model_generates(tmp_path):
    """summarize with a tiny BART under FSDP2: evaluation generates (each process a different
    number of forward passes, parameters gathered for it), every example is scored once, and
    the exported model, evaluated alone, gets the same ROUGE and loss."""
    names = ["Anna", "Boris", "Clara", "David", "Oslo", "Riga", "Porto", "Lyon"]
    g = torch.Generator().manual_seed(0)
    rows = [[names[int(i)] for i in torch.randint(0, 8, (4,), generator=g)] for _ in range(21)]
    lines = [json.dumps({"dialogue": " ".join(r), "summary": r[0]}) + "\n" for r in rows]
    train, valid = tmp_path / "train.jsonl", tmp_path / "valid.jsonl"
    train.write_text("".join(lines[:12]))
    valid.write_text("".join(lines[12:]))  # 9 examples: batches of 4 split unevenly over 2 processes
    tok = train_tokenizer(texts=[" ".join(r) for r in rows] * 4, kind="bpe", vocab_size=300, min_frequency=1)
    torch.manual_seed(0)
    config = preset("bart-base", vocab_size=tok.vocab_size, dim=32, n_heads=2, n_layers=2, max_seq_len=32,
                    dropout=0.0, pad_token_id=tok.pad_id, decoder_start_token_id=tok.eos_id)
    base = LM(build(config), tok).save(tmp_path / "bart", format="hf")
    out = tmp_path / "run"
    common = ["--batch-size", "4", "--max-length", "16", "--device", "cpu", "--precision", "fp32", "--no-progress",
              "--source-field", "dialogue", "--target-field", "summary", "--max-new-tokens", "3"]
    proc = _run(["finetune", "summarize", "--model", str(base), "--train", str(train), "--valid", str(valid),
                 "--out", str(out), "--epochs", "2", "--lr", "3e-3", "--strategy", "fsdp", *common], nproc=2)
    summaries = _summaries(proc)
    assert len(summaries) == 1 and len((out / "predictions.jsonl").read_text().splitlines()) == 9
    written = json.loads((out / "metrics.json").read_text())
    again = _summaries(_run(["evaluate", "summarize", "--model", str(out / "model"), "--data", str(valid), *common]))
    assert again[0]["rougeL"] == written["rougeL"]
    assert again[0]["loss"] == pytest.approx(written["loss"], rel=1e-5)


def _ner_data(root: Path) -> tuple[Path, Path, Path]:
    """CoNLL sentences whose entity tags follow from the words, and a random-init BERT for them."""
    g = torch.Generator().manual_seed(1)
    people, filler = ["anna", "boris", "clara"], ["met", "the", "in", "today", "and"]
    sentences = []
    for _ in range(30):
        words = [filler[int(j)] for j in torch.randint(0, 5, (5,), generator=g)]
        at = int(torch.randint(0, 5, (), generator=g))
        words.insert(at, people[int(torch.randint(0, 3, (), generator=g))])
        sentences.append("\n".join(f"{w}\t{'B-PER' if i == at else 'O'}" for i, w in enumerate(words)))
    train, valid = root / "train.conll", root / "valid.conll"
    train.write_text("\n\n".join(sentences[:20]) + "\n")
    valid.write_text("\n\n".join(sentences[20:]) + "\n")  # 10 sentences: uneven over 2 processes x 4
    tok = train_tokenizer(texts=people + filler, kind="wordpiece", vocab_size=60, min_frequency=1)
    torch.manual_seed(0)
    model = build(BertConfig(vocab_size=tok.vocab_size, max_seq_len=32, dim=32, n_layers=2, n_heads=2))
    return train, valid, save_model_dir(root / "bert", model, tokenizer=tok, format="hf")


def _sft_data(root: Path) -> tuple[Path, Path, Path]:
    """Conversations (the answer repeats the last word) and a random-init GPT with a BPE tokenizer."""
    words = ["apple", "river", "stone", "cloud", "field", "light", "bread"]
    g = torch.Generator().manual_seed(2)
    rows = []
    for _ in range(19):
        said = [words[int(i)] for i in torch.randint(0, 7, (3,), generator=g)]
        rows.append(json.dumps({"prompt": " ".join(said), "response": said[-1]}) + "\n")
    train, valid = root / "train.jsonl", root / "valid.jsonl"
    train.write_text("".join(rows[:12]))
    valid.write_text("".join(rows[12:]))  # 7 conversations
    tok = train_tokenizer(texts=[" ".join(words)] * 20, kind="bpe", vocab_size=300, min_frequency=1)
    torch.manual_seed(0)
    model = build(preset("gpt-tiny", vocab_size=tok.vocab_size, dim=32, n_layers=2, n_heads=2, max_seq_len=64))
    return train, valid, LM(model, tok).save(root / "gpt", format="hf")


@pytest.mark.parametrize("task", ["ner", "sft"])
def test_token_and_chat_tasks_under_ddp_end_like_one_process(task, tmp_path):
    """ner and sft (chat template, pad = the tokenizer's own) under DDP: one run, each
    validation example scored once, and the exported model evaluated alone scores the same."""
    train, valid, base = (_ner_data if task == "ner" else _sft_data)(tmp_path)
    out = tmp_path / "run"
    common = ["--batch-size", "4", "--max-length", "32", "--device", "cpu", "--precision", "fp32", "--no-progress"]
    if task == "sft":
        common += ["--n-samples", "0"]
    proc = _run(["finetune", task, "--model", str(base), "--train", str(train), "--valid", str(valid),
                 "--out", str(out), "--epochs", "2", "--lr", "3e-3", "--strategy", "ddp", *common], nproc=2)
    summaries = _summaries(proc)
    assert len(summaries) == 1, proc.stdout
    written = json.loads((out / "metrics.json").read_text())
    assert written["run"]["processes"] == 2
    assert len([line for line in proc.stderr.splitlines() if line.startswith("training ")]) == 1, proc.stderr
    again = _summaries(_run(["evaluate", task, "--model", str(out / "model"), "--data", str(valid), *common]))
    assert again[0]["loss"] == pytest.approx(written["loss"], rel=1e-5)
    if task == "ner":
        assert len((out / "predictions.jsonl").read_text().splitlines()) == 10
        assert again[0]["f1"] == written["f1"]
    else:  # the tokens scored in 2 processes are those one process scores: none twice, none left out
        assert written["assistant_tokens"] == again[0]["assistant_tokens"] > 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_on_loopback_through_the_c10d_rendezvous(corpus, tmp_path):
    """The README's multi-node recipe with two "nodes" on this machine: each runs torchrun
    --nnodes 2 --rdzv-backend c10d, one process each, on a shared run directory."""
    out, port = tmp_path / "run", _free_port()
    launcher = ["--nnodes=2", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=e2e"]
    command = [sys.executable, "-m", "torch.distributed.run", *launcher, "--nproc_per_node=1", str(FAULT),
               *_pretrain_args(corpus, out, 4, 4)]
    env = {**ENV, "LMFORGE_FAULT_STEP": "0", "LMFORGE_FAULT_RANK": "0", "LMFORGE_FAULT_MARKER": os.devnull + ".none"}
    nodes = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [node.communicate(timeout=300) for node in nodes]
    for node, (stdout, stderr) in zip(nodes, results):
        assert node.returncode == 0, stdout[-3000:] + stderr[-5000:]
    summaries = [line for stdout, _ in results for line in stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 1 and json.loads(summaries[0])["step"] == 4
    assert "2 process(es)" in "".join(stdout for stdout, _ in results)
    assert (out / "model" / "model.safetensors").is_file() and len(_losses(out)) == 4
