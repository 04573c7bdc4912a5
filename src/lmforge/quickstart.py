"""`lmforge quickstart`: the whole path from raw text to a trained GPT in a few minutes.

On the packaged Tiny Shakespeare corpus (or --corpus FILE), with no arguments:
  1. split the text: the first 90% trains, the last 10% validates (as nanoGPT does);
  2. train a byte-level BPE tokenizer on the training text;
  3. tokenize both parts into token shards;
  4. pretrain a small GPT (causal LM) for the time left in the budget, on GPU when there
     is one (with a bigger model), else on the CPU;
  5. measure validation perplexity and bits per character on the held-out 10%
     (bits per character compare models with different tokenizers);
  6. generate samples;
  7. leave a run directory: metrics.jsonl, loss.png, report.md, tb/, checkpoints/ and
     model/ in Hugging Face format (loads with lmforge.load and transformers).

`overrides` (the CLI's --set KEY=VALUE) changes the pretraining config on top of the recipe,
with the dotted keys `lmforge pretrain` takes (optim.optimizer=muon, model.overrides.act=relu2):
bench/bench_quickstart.py's ablation runs each training option through them.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

import lmforge
from lmforge.api import load
from lmforge.config import load_config
from lmforge.data.prepare import prepare_corpus
from lmforge.data.tokenizer_training import train_tokenizer_files
from lmforge.eval.perplexity import perplexity_of_text
from lmforge.files import atomic_write_json, atomic_write_text
from lmforge.models import build, preset
from lmforge.pretrain import pretrain
from lmforge.train import rundir
from lmforge.train.objectives import clm
from lmforge.train.optim import build_optimizer

# nanoGPT's character-level CPU recipe trained for 5 minutes on the 2-core CI machine.
CHAR_BASELINE_BPC = 2.34
PROMPTS = ["ROMEO:", "JULIET:\nO", "KING HENRY:\nNow", "First Citizen:\n"]


@dataclass
class Recipe:
    """Model and batch for one kind of device; tuned so that the budget is spent training."""

    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    seq_len: int
    batch_size: int
    lr: float
    dropout: float


CPU = Recipe(vocab_size=2048, dim=192, n_layers=4, n_heads=4, seq_len=128, batch_size=16, lr=2e-3, dropout=0.0)
GPU = Recipe(vocab_size=4096, dim=384, n_layers=6, n_heads=6, seq_len=256, batch_size=64, lr=1e-3, dropout=0.2)


def default_corpus() -> Path:
    return Path(str(resources.files("lmforge") / "corpus" / "tinyshakespeare.txt"))


def split_text(text: str, val_fraction: float = 0.1) -> tuple[str, str]:
    """The first (1 - val_fraction) of the characters, cut at a line break, and the rest."""
    cut = text.rfind("\n", 0, int(len(text) * (1 - val_fraction))) + 1 or int(len(text) * (1 - val_fraction))
    return text[:cut], text[cut:]


def _steps_per_second(recipe: Recipe, device: str, precision: str, config) -> float:
    """Time a few training steps of the model and optimizer `config` trains, on random tokens."""
    model = build(_model_config(recipe, config.model.overrides)).to(device)
    opt = build_optimizer(model, config.optim)
    ids = torch.randint(0, recipe.vocab_size, (recipe.batch_size, recipe.seq_len + 1), device=device)
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
    amp = torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16")
    times = []
    for _ in range(4):
        t0 = time.perf_counter()
        with amp:
            out = clm(model, batch)
        (out.loss / out.count).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return 1.0 / sorted(times[1:])[1]  # the median of the steps after the first


def _model_config(recipe: Recipe, fields: dict | None = None):
    """The recipe's GPT config; `fields`: the pretraining config's model.overrides (they win)."""
    return preset("gpt-tiny", **{"vocab_size": recipe.vocab_size, "dim": recipe.dim, "n_layers": recipe.n_layers,
                                 "n_heads": recipe.n_heads, "max_seq_len": recipe.seq_len, "dropout": recipe.dropout,
                                 **(fields or {})})


def training_config(recipe: Recipe, out: Path, max_steps: int, budget: float, device: str, precision: str,
                    seed: int, overrides: dict | None = None):
    """The pretraining config for `max_steps` steps in `budget` seconds, data under out/data;
    `overrides`: dotted pretraining keys set on top (model.overrides.FIELD: one model field)."""
    data = out / "data"
    eval_every = max(50, max_steps // 5)  # checkpoints every other evaluation: each has a validation loss
    model_fields = {k.removeprefix("model.overrides."): v for k, v in (overrides or {}).items()
                    if k.startswith("model.overrides.")}
    rest = {k: v for k, v in (overrides or {}).items() if not k.startswith("model.overrides.")}
    return load_config(None, {
        "model.preset": "gpt-tiny", "model.overrides": {
            "dim": recipe.dim, "n_layers": recipe.n_layers, "n_heads": recipe.n_heads,
            "max_seq_len": recipe.seq_len, "dropout": recipe.dropout, **model_fields},
        "data.train": str(data / "train"), "data.val": str(data / "val"), "data.tokenizer": str(out / "tokenizer"),
        "data.seq_len": recipe.seq_len, "optim.lr": recipe.lr, "optim.warmup_steps": min(100, max_steps // 10),
        "optim.min_lr_ratio": 0.1, "train.micro_batch_size": recipe.batch_size, "train.max_steps": max_steps,
        "train.max_time": max(budget, 10.0) / 60, "train.seed": seed, "train.device": device,
        "train.precision": precision, "train.out_dir": str(out), "train.resume": "none",
        "eval.every": eval_every, "eval.steps": 10, "checkpoint.every": 2 * eval_every,
        "checkpoint.keep_last": 1, "log.every": max(10, max_steps // 50), **rest})


def quickstart(out: str | os.PathLike = "runs/quickstart", corpus: str | os.PathLike | None = None,
               minutes: float = 5.0, device: str | None = None, seed: int = 1337,
               overrides: dict | None = None) -> dict:
    """Run the whole job within `minutes` of wall time; returns the final metrics. Each run
    starts fresh: an earlier one in `out` is moved to out/previous/ (lmforge.train.rundir).
    overrides: dotted pretraining config keys set on top of the recipe's, e.g.
    {"optim.optimizer": "muon", "model.overrides.act": "relu2"} (checked before any work)."""
    started = time.monotonic()
    if not minutes > 0:
        raise ValueError(f"--minutes must be positive, got {minutes}")
    out = Path(out)
    try:  # a bad override fails here, before any work
        _model_config(CPU, training_config(CPU, out, 100, 60.0, "cpu", "fp32", seed, overrides).model.overrides)
    except ValueError as e:
        raise ValueError(f"--set: {e}") from None
    corpus = Path(corpus) if corpus else default_corpus()
    text = read_corpus(corpus)
    with rundir.open_run(out, fresh=True) as run:
        return _quickstart(run, corpus, text, started, minutes, device, seed, overrides or {})


def read_corpus(corpus: Path) -> str:
    """The corpus as text: UTF-8, enough of it to train on; ValueError naming the file otherwise."""
    try:
        text = corpus.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{corpus}: not UTF-8 text (byte {e.start}: {e.reason}); convert it, e.g. "
                         "`iconv -f latin1 -t utf-8`") from None
    if len(text) < 10_000:
        raise ValueError(f"{corpus}: {len(text)} characters is too little text for the quickstart (need 10,000+)")
    return text


def _quickstart(run: rundir.RunDir, corpus: Path, text: str, started: float, minutes: float, device: str | None,
                seed: int, overrides: dict) -> dict:
    out = run.path
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    recipe = GPU if device.startswith("cuda") else CPU
    precision = "bf16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "fp32"
    train_text, val_text = split_text(text)
    data = out / "data"
    run.record("data", "tokenizer", "metrics.json", "report.md")
    atomic_write_text(data / "train.txt", train_text)
    atomic_write_text(data / "val.txt", val_text)
    print(f"[1/5] corpus {corpus.name}: {len(train_text):,} training and {len(val_text):,} validation characters")

    tokenizer = train_tokenizer_files(data / "train.txt", kind="bpe", vocab_size=recipe.vocab_size, doc_per_file=True,
                                model_max_length=recipe.seq_len)
    tokenizer.save(out / "tokenizer")
    prepare_corpus(tokenizer, data / "train.txt", data / "train", val_fraction=0.0, doc_per_file=True)
    prepare_corpus(tokenizer, data / "val.txt", data / "val", val_fraction=0.0, doc_per_file=True)
    print(f"[2/5] byte-level BPE tokenizer with {tokenizer.vocab_size:,} tokens; corpus tokenized")

    steps_per_s = _steps_per_second(recipe, device, precision,
                                    training_config(recipe, out, 100, 60.0, device, precision, seed, overrides))
    reserve = 25.0 if device == "cpu" else 15.0  # evaluation, samples and export after training
    budget = minutes * 60 - (time.monotonic() - started) - reserve
    max_steps = max(20, int(budget * steps_per_s * 0.95))  # evaluations and checkpoints take the rest
    config = training_config(recipe, out, max_steps, budget, device, precision, seed, overrides)
    changed = "".join(f", {k.removeprefix('model.overrides.')}={v}" for k, v in overrides.items())
    print(f"[3/5] training a {recipe.n_layers}-layer GPT (dim {recipe.dim}{changed}) on {device} for up to "
          f"{max_steps} steps (~{budget / 60:.1f} min at {steps_per_s:.1f} steps/s)")
    result = pretrain(config)

    lm = load(out / "model", device=device)
    ppl = perplexity_of_text(lm.model, lm.tokenizer, val_text, max_len=recipe.seq_len,
                             stride=recipe.seq_len // 2, batch_size=16, device=device)
    print(f"[4/5] validation (last 10%): perplexity {ppl['ppl']:.2f} per token, "
          f"{ppl['bits_per_char']:.3f} bits per character (character-level GPT baseline: {CHAR_BASELINE_BPC})")
    samples = lm.generate(PROMPTS, max_new_tokens=80, temperature=0.8, top_k=50, seed=seed)
    print("[5/5] samples:")
    for prompt, sample in zip(PROMPTS, samples):
        print(f"---\n{prompt}{sample}")

    metrics = {"val_ppl": ppl["ppl"], "val_nll_per_token": ppl["mean_nll"], "bits_per_char": ppl["bits_per_char"],
               "char_baseline_bits_per_char": CHAR_BASELINE_BPC, "steps": result["step"],
               "tokens": result["tokens"], "train_loss": result["train_loss"], "params": result["params"],
               "device": device, "seconds": time.monotonic() - started, "overrides": overrides}
    atomic_write_json(out / "metrics.json", metrics)
    atomic_write_text(out / "report.md", _report(recipe, config, metrics, samples, device))
    print(f"done in {metrics['seconds']:.0f}s: {out}/ holds report.md, metrics.jsonl, loss.png and model/ "
          f"(lmforge.load or transformers.AutoModelForCausalLM)")
    return metrics


def _hardware(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"


def _report(recipe: Recipe, config, metrics: dict, samples: list[str], device: str) -> str:
    beat = "better than" if metrics["bits_per_char"] <= CHAR_BASELINE_BPC else "worse than"
    on_top = "".join(f"; {k}={v}" for k, v in metrics["overrides"].items())  # --set options
    lines = [
        "# lmforge quickstart", "",
        f"lmforge {lmforge.__version__}, torch {torch.__version__}, {_hardware(device)}.", "",
        "## Result", "",
        "| metric | value |", "|---|---|",
        f"| validation perplexity (per token) | {metrics['val_ppl']:.2f} |",
        f"| bits per character (last 10% of the corpus) | {metrics['bits_per_char']:.3f} |",
        f"| character-level GPT, same 5 minutes on the CI CPU | {CHAR_BASELINE_BPC} |",
        f"| training steps / tokens | {metrics['steps']:,} / {metrics['tokens']:,} |",
        f"| parameters | {metrics['params']:,} |",
        f"| wall time | {metrics['seconds']:.0f} s |", "",
        f"The model is {beat} the character-level baseline.", "",
        "![loss curve](loss.png)", "",
        "## Configuration", "",
        f"GPT: {recipe.n_layers} layers, dim {recipe.dim}, {recipe.n_heads} heads, context {recipe.seq_len}, "
        f"byte-level BPE vocabulary {recipe.vocab_size}, dropout {recipe.dropout}; AdamW lr {config.optim.lr} "
        f"(warmup {config.optim.warmup_steps}, {config.optim.schedule}), batch {recipe.batch_size} x "
        f"{recipe.seq_len} tokens, {config.train.precision} on {device}{on_top}. Full config: config.yaml.", "",
        "## Samples (temperature 0.8, top-k 50)", "",
    ]
    for prompt, sample in zip(PROMPTS, samples):
        lines += ["```", prompt + sample, "```", ""]
    return "\n".join(lines)
