"""What a person watching a run sees: a progress bar, metrics.jsonl, TensorBoard, a loss plot.

Only rank 0 writes; other ranks get a logger with enabled=False that does nothing.

MFU (model FLOPs utilisation) = achieved model FLOP/s / peak FLOP/s, with the model's
FLOPs per trained token estimated as (PaLM, appendix B)

    6 N + 12 L H Q T

N: parameters without position embeddings (2 FLOPs per multiply-add, x3 for forward and
backward), L: layers, H: heads, Q: head dim, T: sequence length (the attention scores
and their product with the values, which N does not count). Recomputation by activation
checkpointing is not counted: MFU measures useful work.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from collections.abc import Iterable, Sized
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from lmforge.config import LogConfig
from lmforge.files import atomic_write_bytes
from lmforge.hardware import accelerator_named
from lmforge.models import count_params
from lmforge.models.flops import encdec_flops_per_sequence
from lmforge.models.flops import flops_per_token as transformer_flops
from lmforge.train import rundir

# Progress-bar label -> record key; the ETA is tqdm's own (steps left / recent step rate).
POSTFIX = {"loss": "train_loss", "val": "val_loss", "lr": "lr", "tok/s": "tokens_per_s", "mfu": "mfu"}


def flops_per_token(model: nn.Module, seq_len: int, lm_fraction: float = 1.0) -> float:
    """Training FLOPs per token, 6N + 12 L H Q T, for a GPT, Bert or EncoderDecoder (or a
    task head over one); seq_len is T (the source length for an encoder-decoder, whose
    encoder and decoder each count for the tokens that pass through them).

    N counts the matmul weights a token goes through. Looking up the token embedding costs
    no FLOPs, so it is left out; the vocabulary projection (tied to it or not) is a matmul,
    but only on the positions that predict a token: `lm_fraction` of all tokens (1 for a
    causal LM, the masked share for masked LM, the target share for an encoder-decoder).
    A task head over a backbone has no vocabulary projection at all."""
    n = count_params(model, positions=False)
    backbone = getattr(model, "backbone", None)
    core = model if backbone is None else backbone
    cfg = getattr(core, "config", None)
    if cfg is None:
        return 6.0 * n
    head = lm_fraction * core.tok_emb.weight.numel() if backbone is None and hasattr(core, "lm_head") else 0.0
    H, Q = cfg.n_heads, cfg.head_dim
    if hasattr(core, "encoder") and hasattr(core, "decoder"):
        # Source tokens go through the encoder and the decoder's cross-attention keys and values,
        # target tokens (the lm_fraction) through the rest of the decoder and the vocabulary projection.
        f, S = lm_fraction, seq_len
        T = S * f / (1.0 - f) if f < 1.0 else float(S)
        n_kv = sum(p.numel() for name, p in core.decoder.named_parameters() if ".cross.wkv." in name)
        n_src = count_params(core.encoder, positions=False) + n_kv
        n_tgt = count_params(core.decoder, positions=False) - n_kv + (head / f if f else 0.0)
        per_sequence = encdec_flops_per_sequence(n_src, n_tgt, H, Q, cfg.n_layers, cfg.n_decoder_layers or cfg.n_layers,
                                                 S, T)
        return per_sequence / (S + T)
    weights = [getattr(m, "weight", None) for m in (getattr(core, "tok_emb", None), getattr(core, "lm_head", None))]
    n -= sum({id(w): w.numel() for w in weights if isinstance(w, torch.Tensor)}.values())  # a tied one once
    return transformer_flops(n + head, cfg.n_layers, H, Q, seq_len)


@functools.cache
def measured_cpu_flops(size: int = 1024, repeats: int = 3) -> float:
    """FLOP/s of an fp32 (size x size) matmul on this CPU with torch's threads: the CPU
    'peak' MFU is measured against (what the hardware sustains on the ideal kernel)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2.0 * size**3 / best


def peak_flops(device: torch.device, precision: str, override: float | None = None) -> float | None:
    """Peak FLOP/s of one device: `override`, the GPU table, or a measured CPU matmul rate;
    None for an unknown GPU (MFU is then not reported)."""
    if override is not None:
        return override
    if device.type == "cpu":
        return measured_cpu_flops()
    if device.type == "cuda":
        accelerator = accelerator_named(torch.cuda.get_device_name(device))
        if accelerator is not None:
            return accelerator.peak.get(precision, accelerator.peak["fp32"])
    return None


def progress_bar(items: Iterable[Any], enabled: bool, desc: str, total: int | None = None) -> Iterable[Any]:
    """`items` with a progress bar that goes away when done (enabled=False: `items` as they are)."""
    if not enabled:
        return items
    known = [n for n in (total, len(items) if isinstance(items, Sized) else None) if n is not None]
    return tqdm(items, total=min(known) if known else None, desc=desc, leave=False, dynamic_ncols=True)


def read_records(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a metrics.jsonl (a torn last line from a killed run is dropped)."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def plot_losses(records: list[dict[str, Any]], path: str | os.PathLike) -> None:
    """train_loss (and val_loss where present) against step, written as a PNG atomically."""
    # A bare Figure renders with Agg: no display, no pyplot state. Imported here, so that a run
    # without log.plot (a benchmark, a GPU machine without matplotlib) never needs it.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), dpi=100)
    ax = fig.add_subplot()
    for key, style in (("train_loss", "-"), ("val_loss", "o-")):
        points = [(r["step"], r[key]) for r in records if r.get(key) is not None and math.isfinite(r[key])]
        if points:
            ax.plot(*zip(*points), style, label=key, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    tmp = Path(path).with_suffix(".png.tmp")
    fig.savefig(tmp, format="png")
    atomic_write_bytes(path, tmp.read_bytes())
    tmp.unlink()


class RunLogger:
    """Progress bar + metrics.jsonl + TensorBoard for one run directory.

    On resume from step s, records after s (written by the run that was killed) are
    dropped from metrics.jsonl and TensorBoard, so the history stays one clean curve."""

    def __init__(self, out_dir: str | os.PathLike, cfg: LogConfig, *, enabled: bool, total_steps: int,
                 start_step: int = 0) -> None:
        self.enabled, self.cfg = enabled, cfg
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / "metrics.jsonl"
        self.records: list[dict[str, Any]] = []
        self.bar = self.tb = None
        self.postfix: dict[str, str] = {}
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        rundir.record(self.out_dir, "metrics.jsonl", *(("tb",) if cfg.tensorboard else ()),
                      *(("loss.png",) if cfg.plot else ()))
        self.records = [r for r in read_records(self.path) if r.get("step", 0) <= start_step]
        atomic_write_bytes(self.path, "".join(json.dumps(r) + "\n" for r in self.records).encode())
        self.file = open(self.path, "a")  # noqa: SIM115 (open for the run's lifetime)
        if cfg.tensorboard:
            self.tb = SummaryWriter(self.out_dir / "tb", purge_step=start_step + 1 if start_step else None)
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                        disable=not cfg.progress)

    def advance(self, steps: int = 1) -> None:
        """Move the bar (host-side only, every step)."""
        if self.bar is not None:
            self.bar.update(steps)

    def log(self, record: dict[str, Any]) -> None:
        """One JSON line (with at least "step"), TensorBoard scalars, the bar's postfix."""
        if not self.enabled:
            return
        record = {k: v for k, v in record.items() if v is not None}
        self.records.append(record)
        self.file.write(json.dumps(record) + "\n")  # one write per line: a crash tears at most the last
        self.file.flush()
        step = record["step"]
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(_tag(key), value, step)
        if self.bar is not None:
            self.postfix.update({k: _short(record[v]) for k, v in POSTFIX.items() if v in record})
            self.bar.set_postfix(self.postfix, refresh=False)

    def write(self, message: str) -> None:
        """A line of text above the bar (rank 0 only)."""
        if self.enabled:
            tqdm.write(message)

    def close(self) -> None:
        """Flush and close everything; write loss.png."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        self.file.close()
        if self.cfg.plot and self.records:
            plot_losses(self.records, self.out_dir / "loss.png")


def _tag(key: str) -> str:
    """train_loss -> train/loss, val_mlm_acc -> val/mlm_acc, lr -> perf/lr: grouped in TensorBoard."""
    group, _, rest = key.partition("_")
    return f"{group}/{rest}" if group in ("train", "val") and rest else f"perf/{key}"


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e4 else f"{value:.3e}"
    return str(value)
