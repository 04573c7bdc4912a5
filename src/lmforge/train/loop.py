"""The training loop: one function, shared by pretraining and every fine-tuning task.

They differ only in the model, the objective (lmforge.train.objectives, or a task's own)
and the batches. Evaluation, checkpointing and logging are the visible
`if step % every == 0:` lines of `train`; there are no callbacks.

One optimizer step:
    for each of grad_accum micro-batches: forward (autocast) -> summed loss -> backward
    gradients /= labelled items of the whole step (all micro-batches, all processes)
    clip the global gradient norm; a NaN/Inf norm skips the update (on the device)
    AdamW step, scheduler step

The device runs ahead of Python: nothing inside a step reads a tensor value on the host
except on log steps (each such read is marked `# host sync`).
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import math
import random
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import Tensor, nn

from lmforge.config import RunConfig, config_changes, save_config
from lmforge.data.batching import BatchIterator
from lmforge.dist import parallel
from lmforge.dist import state as dist_state
from lmforge.dist.parallel import DistEnv, all_reduce_sum
from lmforge.train import checkpoint, rundir
from lmforge.train.logging import RunLogger, flops_per_token, peak_flops, progress_bar
from lmforge.train.objectives import LossModule, Objective, ObjectiveOutput
from lmforge.train.optim import build_optimizer, build_scheduler

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training cannot go on (diverged, out of memory); the message says what to change."""


@dataclass
class TrainResult:
    """How a run ended. stopped: max_steps, max_tokens, max_time, early_stopping (eval.patience
    evaluations without improving checkpoint.metric), data_exhausted or interrupted
    (SIGINT/SIGTERM; a checkpoint was written first). model: the trained model, plain
    (unwrapped) on every process: the model passed in, or under FSDP2 a copy gathered whole
    onto the CPU (the one passed in stays sharded)."""

    out_dir: Path
    step: int
    tokens: int
    stopped: str
    train_loss: float | None = None
    val: dict[str, float] = field(default_factory=dict)
    best: dict[str, Any] | None = None
    checkpoint: Path | None = None
    model: nn.Module | None = None


@dataclass
class _Run:
    """The moving parts of one run, handed to the loop's helpers (data, no behaviour)."""

    config: RunConfig
    env: DistEnv
    model: nn.Module
    root: LossModule
    runner: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    precision: str
    fused: bool
    batches: BatchIterator
    total_steps: int
    aliases: dict[str, str]
    run_dir: rundir.RunDir
    step: int = 0
    tokens: int = 0
    best: dict[str, Any] | None = None
    stale: int = 0  # evaluations in a row without a better checkpoint.metric (early stopping)
    last_val: dict[str, float] = field(default_factory=dict)
    last_eval_step: int = -1
    skeleton: nn.Module | None = None  # FSDP2: the model's structure on the meta device (dist.state.meta_skeleton)


# ----------------------------------------------------------------------------- setup


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_precision(precision: str, device: torch.device) -> str:
    """"auto" -> bf16 on a GPU that supports it, else fp32."""
    if precision != "auto":
        return precision
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Mixed precision for forward passes: bf16/fp16 matmuls, fp32 weights and reductions."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Tensors to the device; on CUDA from pinned memory without blocking the host."""
    if device.type != "cuda":
        return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
    return {k: (v if v.is_pinned() else v.pin_memory()).to(device, non_blocking=True) if isinstance(v, Tensor)
            else v for k, v in batch.items()}


def total_steps(config: RunConfig, world_size: int = 1) -> int:
    """Optimizer steps of the schedule: max_steps, else max_tokens over the global batch's tokens."""
    t = config.train
    if t.max_steps is not None:
        return t.max_steps
    per_step = t.micro_batch_size * t.grad_accum * world_size * config.data.seq_len
    return max(1, math.ceil(t.max_tokens / per_step))


def _n_tokens(batch: dict[str, Any]) -> int:
    """Tokens a batch feeds the model (encoder + decoder), known on the host from shapes."""
    n = batch["input_ids"].numel()
    return n + (batch["decoder_input_ids"].numel() if "decoder_input_ids" in batch else 0)


def _lm_rows(batch: dict[str, Any]) -> int:
    """Positions the vocabulary projection runs on (for MFU), known on the host from shapes:
    the decoder's for an encoder-decoder, else all (masked LM: see `_log_train`)."""
    return batch["decoder_input_ids"].numel() if "decoder_input_ids" in batch else batch["input_ids"].numel()


# ----------------------------------------------------------------------------- one step


@dataclass
class _StepStats:
    loss: Tensor  # () summed loss of this process's micro-batches
    count: Tensor  # () items it sums over
    metrics: dict[str, tuple[Tensor, Tensor]]
    tokens: int
    lm_rows: int  # of the tokens, those projected onto the vocabulary
    lr: float
    grad_norm: Tensor
    found_inf: Tensor  # () bool: the update was skipped
    seq_len: int


def _forward_backward(run: _Run, batch: dict[str, Tensor], sync: bool) -> ObjectiveOutput:
    with parallel.gradient_sync(run.runner, sync):
        with autocast(run.precision, run.env.device):
            out = run.runner(batch)
        run.scaler.scale(out.loss).backward()
    return out


def _finish_gradients(run: _Run, count: Tensor) -> Tensor:
    """Turn the summed-loss gradients into mean-loss ones and clip; returns the global norm."""
    total = all_reduce_sum(count.double())  # labelled items of the whole step, all processes
    if run.scaler.is_enabled():
        run.scaler.unscale_(run.optimizer)
    params = [p for p in run.root.parameters() if p.grad is not None]
    # DDP and FSDP already averaged the gradients over processes: undo that, divide by the total.
    scale = (run.env.world_size / total.clamp(min=1)).float()
    torch._foreach_mul_(parallel.local_tensors([p.grad for p in params]), scale)
    max_norm = run.config.optim.grad_clip or math.inf
    return parallel.full_tensor(nn.utils.clip_grad_norm_(params, max_norm)).float()


def _optimizer_step(run: _Run, grad_norm: Tensor, found_inf: Tensor) -> None:
    if run.scaler.is_enabled():
        run.scaler.step(run.optimizer)  # skips the update itself when the unscaled gradients are not finite
        run.scaler.update()
    elif run.fused:
        # The fused kernel reads found_inf (as GradScaler passes it) and skips the update on the
        # device when it is 1: no host sync.
        run.optimizer.found_inf = found_inf.float()
        run.optimizer.step()
    elif bool(torch.isfinite(grad_norm)):  # host sync: a foreach AdamW cannot skip an update on the device
        run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)


def _train_step(run: _Run, batches: Iterator[dict[str, Tensor]]) -> _StepStats | None:
    """One optimizer step over grad_accum micro-batches; None when the data ran out (the
    partial step is dropped, its gradients zeroed)."""
    dev, accum = run.env.device, run.config.train.grad_accum
    loss = torch.zeros((), device=dev)
    count = torch.zeros((), dtype=torch.int64, device=dev)
    metrics: dict[str, tuple[Tensor, Tensor]] = {}
    tokens = lm_rows = 0
    for i in range(accum):
        batch = next(batches, None)
        if batch is None:
            run.optimizer.zero_grad(set_to_none=True)
            return None
        tokens += _n_tokens(batch)
        lm_rows += _lm_rows(batch)
        out = _forward_backward(run, to_device(batch, dev), sync=i == accum - 1)
        loss += out.loss.detach().float()
        count += out.count
        for name, (value, n) in out.metrics.items():
            s, c = metrics.get(name, (0, 0))
            metrics[name] = (s + value.detach().float(), c + n)
    lr = run.optimizer.param_groups[0]["lr"]
    grad_norm = _finish_gradients(run, count)
    found_inf = ~torch.isfinite(grad_norm)
    _optimizer_step(run, grad_norm, found_inf)
    return _StepStats(loss, count, metrics, tokens, lm_rows, lr, grad_norm, found_inf, batch["input_ids"].shape[-1])


# ----------------------------------------------------------------------------- evaluation


def _ratios(names: list[str], values: list[float], prefix: str) -> dict[str, float]:
    """[loss, count, m1_sum, m1_count, ...] -> {prefix_loss, prefix_m1, ...}."""
    out = {f"{prefix}_loss": values[0] / max(values[1], 1.0)}
    for i, name in enumerate(names):
        out[f"{prefix}_{name}"] = values[2 + 2 * i] / max(values[3 + 2 * i], 1.0)
    return out


def _pack(loss: Tensor, count: Tensor, metrics: dict[str, tuple[Tensor, Tensor]]) -> tuple[list[str], Tensor]:
    names = sorted(metrics)
    values = [loss, count] + [x for name in names for x in metrics[name]]
    return names, torch.stack([torch.as_tensor(v, device=loss.device).double() for v in values])


def _perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf


@torch.no_grad()
def evaluate(runner: nn.Module, batches: Iterable[dict[str, Tensor]], device: torch.device, *,
             max_batches: int | None = None, precision: str = "fp32", progress: bool = False) -> dict[str, float]:
    """Validation loss over (at most max_batches of) `batches`, summed over processes:
    val_loss, val_ppl (of the LM loss: the MLM part for mlm+nsp), and each objective
    metric averaged (val_mlm_acc, val_nsp_acc, ...). Every process must see equally many batches.
    progress: a progress bar over the batches (this process's)."""
    batches = progress_bar(batches, progress, "validation", max_batches)
    was_training = runner.training
    runner.eval()
    loss = torch.zeros((), device=device, dtype=torch.float64)
    count = torch.zeros((), device=device, dtype=torch.float64)
    metrics: dict[str, tuple[Tensor, Tensor]] = {}
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        with autocast(precision, device):
            out = runner(to_device(batch, device))
        loss += out.loss.double()
        count += out.count
        for name, (value, n) in out.metrics.items():
            s, c = metrics.get(name, (0, 0))
            metrics[name] = (s + value.double(), c + n)
    runner.train(was_training)
    names, packed = _pack(loss, count, metrics)
    result = _ratios(names, all_reduce_sum(packed).tolist(), "val")  # host sync
    result["val_ppl"] = _perplexity(result.get("val_mlm_loss", result["val_loss"]))
    return result


# ----------------------------------------------------------------------------- checkpoints


def _save(run: _Run, save_extra: Callable[[Path], None] | None) -> Path:
    """Write a checkpoint of the current step (every process takes part): one file by one
    process, torch.distributed.checkpoint shards under torchrun (lmforge.train.checkpoint)."""
    ranks = parallel.gather_objects({"rng": checkpoint.rng_state(run.env.device),
                                     "data": run.batches.state_dict()})
    root = Path(run.config.train.out_dir) / "checkpoints"
    trainer = {"step": run.step, "tokens": run.tokens, "best": run.best, "stale": run.stale,
               "world_size": run.env.world_size, "ranks": ranks}
    schedule = {"scheduler": run.scheduler.state_dict(), "scaler": run.scaler.state_dict()}
    common = {"trainer_state": trainer, "config": run.config, "extra": save_extra, "run_id": run.run_dir.run_id,
              "metrics": run.last_val if run.last_eval_step == run.step else None}
    try:
        if run.env.distributed:
            checkpoint.save_sharded(root, run.step, state=dist_state.sharded_state(run.model, run.root, run.optimizer),
                                    optimizer_state=schedule, **common)
        else:
            checkpoint.save(root, run.step, model_state=run.model.state_dict(), aliases=run.aliases,
                            optimizer_state={"optimizer": dist_state.full_optimizer_state(run.root, run.optimizer),
                                             **schedule}, **common)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        previous = checkpoint.latest_good(root)
        raise TrainingError(
            f"{root}: no space left on the device for the step {run.step} checkpoint ({e.strerror}); the "
            f"previous checkpoint {previous.name if previous else '(none)'} is intact: free space, then run "
            "again with train.resume=auto") from None
    if run.env.is_main:
        ck = run.config.checkpoint
        checkpoint.prune(root, ck.keep_last, keep_best=ck.keep_best, metric=ck.metric, mode=ck.mode,
                         run_id=run.run_dir.run_id)
    parallel.barrier()
    return checkpoint.step_dir(root, run.step)


def _global_batch(train: dict[str, Any], world_size: int) -> int:
    """Sequences per optimizer step, all processes together."""
    return int(train.get("micro_batch_size", 1)) * int(train.get("grad_accum", 1)) * world_size


def resume_changes(path: Path, config: RunConfig, world_size: int = 1) -> dict[str, tuple[Any, Any]]:
    """What `config` changes against the checkpoint's config.yaml (see config.config_changes);
    CheckpointError naming the fields and both values unless train.accept_changes.

    The number of processes may change (world_size: this run's): train.micro_batch_size and
    train.grad_accum may change with it as long as the global batch (their product with the
    processes) stays the same; a different global batch is a change like any other."""
    try:
        old = yaml.safe_load((path / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}  # a checkpoint written without its config: nothing to compare against
    changes = config_changes(old, config)
    before = _global_batch(old.get("train") or {}, checkpoint.world_size(path))
    after = _global_batch(config.to_dict()["train"], world_size)
    layout = ("train.micro_batch_size", "train.grad_accum")
    if before == after:
        changes = {k: v for k, v in changes.items() if k not in layout}
    elif not any(k in changes for k in layout):
        changes["global batch (train.micro_batch_size x train.grad_accum x processes)"] = (before, after)
    if changes and not config.train.accept_changes:
        shown = "; ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items())
        raise checkpoint.CheckpointError(
            f"{path}: resuming with a changed configuration: {shown}. Set train.accept_changes=true to continue "
            "with the new values (recorded in run.json), or train.resume=none to start a new run")
    return changes


def _restore(run: _Run, path: Path, changes: dict[str, tuple[Any, Any]]) -> None:
    """Continue from a checkpoint: weights, optimizer, scheduler, RNG, data position, counters.
    The optimizer's and schedule's hyperparameters are this run's config's (the same values
    unless accepted changes altered them). A checkpoint of another number of processes
    continues at the same global data position (see `_restore_positions`)."""
    trainer, schedule = checkpoint.load_state(path)
    # This run's hyperparameters (the scheduler keeps the peak lr as initial_lr), put back after loading.
    hyper = [{**{k: v for k, v in g.items() if k not in ("params", "lr", "initial_lr")}, "lr": g["initial_lr"]}
             for g in run.optimizer.param_groups]  # betas, eps, weight_decay, Muon's momentum, ...
    try:
        if checkpoint.is_sharded(path):
            dist_state.load_sharded(run.model, run.root, run.optimizer, path / checkpoint.SHARDS)
        else:
            dist_state.set_full_state(run.model, checkpoint.load_weights(path / "model.safetensors"))
            dist_state.set_full_optimizer_state(run.root, run.optimizer, schedule["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        changed = ", ".join(k for k in changes if k.startswith("model.")) or "the architecture"
        first = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line or "Missing" in line
                      or "Unexpected" in line or "Size mismatch" in line), str(e).splitlines()[0] if str(e) else "")
        raise checkpoint.CheckpointError(
            f"{path}: its weights do not fit this model ({changed} changed: {first}); a run cannot continue with "
            "another architecture: start a new run with model.init_from") from None
    run.scheduler.load_state_dict(schedule["scheduler"])
    run.scheduler.base_lrs = [h["lr"] for h in hyper]
    for group, h, factor in zip(run.optimizer.param_groups, hyper, run.scheduler.lr_lambdas):
        group.update(h, initial_lr=h["lr"], lr=h["lr"] * factor(run.scheduler.last_epoch))
    run.scaler.load_state_dict(schedule["scaler"])
    _restore_positions(run, path, trainer["ranks"], trainer["step"])
    run.step, run.tokens, run.best = trainer["step"], trainer["tokens"], trainer["best"]
    run.stale = trainer.get("stale", 0)


def _restore_positions(run: _Run, path: Path, ranks: list[dict[str, Any]], step: int) -> None:
    """Each process's data position and RNG streams. The same number of processes: each
    continues its own. Another number: the data continues at the global position all of them
    had reached (the loader's load_state_dicts, given every process's saved state); rank r
    continues rank r's RNG streams where the checkpoint has them, a new rank starts streams
    seeded from (train.seed, rank, step)."""
    rank, world = run.env.rank, run.env.world_size
    if len(ranks) != world and not hasattr(run.batches, "load_state_dicts"):
        raise checkpoint.CheckpointError(
            f"{path}: written by {len(ranks)} processes, resumed with {world}, and this run's data "
            f"({type(run.batches).__name__}) keeps a position per process: resume with {len(ranks)} processes")
    try:
        if len(ranks) == world:
            run.batches.load_state_dict(ranks[rank]["data"])
        else:
            run.batches.load_state_dicts([r["data"] for r in ranks])
    except (ValueError, KeyError) as e:
        raise checkpoint.CheckpointError(f"{path}: the data position does not carry over to this run's data ({e})"
                                         ) from None
    if rank < len(ranks):
        checkpoint.set_rng_state(ranks[rank]["rng"], run.env.device)
    else:
        seed_everything(int(np.random.SeedSequence([run.config.train.seed, rank, step]).generate_state(1)[0]))


def _update_best(run: _Run, val: dict[str, float]) -> str | None:
    """Track the best checkpoint.metric; returns the reason to stop early (eval.patience), if any."""
    ck, patience = run.config.checkpoint, run.config.eval.patience
    value = val.get(ck.metric)
    ok = value is not None and math.isfinite(value)
    if ok and (run.best is None or (value < run.best["value"] if ck.mode == "min" else value > run.best["value"])):
        run.best, run.stale = {"metric": ck.metric, "value": value, "step": run.step}, 0
        return None
    run.stale += 1
    if patience is None or run.stale < patience:
        return None
    best = f"{run.best['value']:.4g} at step {run.best['step']}" if run.best else "none"
    log.warning("early stopping: %s did not improve for %d evaluations (best %s)", ck.metric, run.stale, best)
    return "early_stopping"


# ----------------------------------------------------------------------------- the loop


class _StopSignals:
    """SIGINT (Ctrl-C) and SIGTERM (a scheduler's preemption) ask the loop to checkpoint and
    stop after the current step; a second signal stops at once."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.reason is not None:
            raise KeyboardInterrupt
        self.reason = signal.Signals(signum).name

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _setup(model: nn.Module, objective: Objective, batches: BatchIterator, config: RunConfig, env: DistEnv,
           run_dir: rundir.RunDir) -> _Run:
    t = config.train
    seed_everything(t.seed + env.rank)  # dropout differs per process; the model was initialised before
    aliases = checkpoint.tied_aliases(model)
    fsdp = env.distributed and config.dist.strategy == "fsdp"
    skeleton = dist_state.meta_skeleton(model) if fsdp else None  # the plain model rebuilt after training
    model.to(env.device).train()
    root = LossModule(model, objective)
    precision = resolve_precision(t.precision, env.device)
    runner = root  # DDP wraps it when the loop starts (after looking for unused parameters: _start_ddp)
    if not env.distributed or fsdp:
        low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision) if config.dist.mixed_precision else None
        runner = parallel.parallelize(root, model, env, strategy=config.dist.strategy, compile=t.compile,
                                      activation_checkpointing=t.activation_checkpointing,
                                      reshard_after_forward=config.dist.reshard_after_forward, param_dtype=low)
    optimizer = build_optimizer(root, config.optim)
    steps = total_steps(config, env.world_size)
    scaler = torch.amp.GradScaler(env.device.type, enabled=precision == "fp16")
    fused = bool(optimizer.defaults.get("fused"))
    run = _Run(config, env, model, root, runner, optimizer, build_scheduler(optimizer, config.optim, steps), scaler,
               precision, fused, batches, steps, aliases, run_dir, skeleton=skeleton)
    ckpt_root = Path(t.out_dir) / "checkpoints"
    if env.is_main:
        checkpoint.remove_stale_temporaries(ckpt_root)
    # Rank 0 chooses (and verifies) the checkpoint, so that every process resumes from the same one.
    resume_from = parallel.broadcast_object(str(checkpoint.resolve_resume(t.resume, ckpt_root) or "")
                                            if env.is_main else None)
    resume_from = Path(resume_from) if resume_from else None
    if resume_from is not None:
        changes = resume_changes(resume_from, config, env.world_size)
        _restore(run, resume_from, changes)
        run_dir.event("resume", step=run.step, checkpoint=str(resume_from),
                      **({"changes": {k: list(v) for k, v in changes.items()}} if changes else {}))
    else:
        run_dir.event("start", step=0)
    if env.is_main:
        save_config(config, Path(t.out_dir) / "config.yaml")
        run_dir.record("config.yaml", "checkpoints")
    return run


def _start_ddp(run: _Run, batches: Iterator[dict[str, Tensor]]) -> Iterator[dict[str, Tensor]]:
    """Wrap the model in DDP (under torchrun with dist.strategy=ddp), looking first for
    parameters a step leaves unused: one forward + backward of the first batch, unwrapped,
    on every process (its RNG draws undone). Only when some process finds one does DDP
    search every step's graph for them (find_unused_parameters). Returns the batches, the
    first one put back."""
    env, t = run.env, run.config.train
    if not env.distributed or run.config.dist.strategy != "ddp":
        return batches
    first = next(batches, None)
    unused: list[str] = []
    if first is not None:
        rng = checkpoint.rng_state(env.device)
        unused = parallel.unused_parameters(run.root, to_device(first, env.device))
        checkpoint.set_rng_state(rng, env.device)
    unused = sorted({name for names in parallel.gather_objects(unused) for name in names})
    if unused and env.is_main:
        shown = ", ".join(unused[:4]) + (", ..." if len(unused) > 4 else "")
        log.info("DDP: %d parameter(s) take no part in the loss (%s): searching each step for them", len(unused), shown)
    run.runner = parallel.parallelize(run.root, run.model, env, strategy="ddp", compile=t.compile,
                                      activation_checkpointing=t.activation_checkpointing,
                                      find_unused_parameters=bool(unused))
    return batches if first is None else itertools.chain([first], batches)


def _log_train(run: _Run, window: dict[str, Any], last: _StepStats, bad_run: Tensor, skipped: Tensor,
               stop_local: bool, seconds: float) -> tuple[dict[str, Any], float, bool]:
    """Reduce the window's sums over processes and read them (the log step's host sync).
    Returns (record, consecutive bad steps, stop requested by any process)."""
    names, packed = _pack(window["loss"], window["count"], window["metrics"])
    reduced = all_reduce_sum(torch.cat([packed, packed.new_tensor([float(stop_local)])]))
    local = torch.stack([last.grad_norm.double(), bad_run.double(), skipped.double()])
    values = torch.cat([reduced, local]).tolist()  # host sync
    grad_norm, bad, n_skipped = values[-3:]
    record = {"step": run.step, **_ratios(names, values[:-4], "train"), "lr": last.lr, "grad_norm": grad_norm,
              "tokens": run.tokens, "skipped_steps": int(n_skipped)}
    tokens_per_s = window["tokens"] * run.env.world_size / max(seconds, 1e-9)
    record["tokens_per_s"] = tokens_per_s
    peak = peak_flops(run.env.device, run.precision, run.config.log.peak_flops)
    if peak:
        # Masked LM projects only the masked positions, which its loss counts (already summed over processes).
        world = run.env.world_size
        lm_rows = values[1] if run.config.train.objective.startswith("mlm") else window["lm_rows"] * world
        per_token = flops_per_token(run.model, window["seq_len"], lm_rows / max(window["tokens"] * world, 1))
        record["mfu"] = tokens_per_s * per_token / (peak * run.env.world_size)
    return record, bad, values[-4] > 0


def _new_window(device: torch.device) -> dict[str, Any]:
    return {"loss": torch.zeros((), device=device), "count": torch.zeros((), dtype=torch.int64, device=device),
            "metrics": {}, "tokens": 0, "lm_rows": 0, "seq_len": 0}


def _add_to_window(window: dict[str, Any], stats: _StepStats) -> None:
    """Add a step to the log window; a skipped step's (NaN) numbers count as nothing."""
    ok = ~stats.found_inf
    window["loss"] += torch.where(ok, stats.loss, 0.0)
    window["count"] += stats.count * ok
    for name, (value, n) in stats.metrics.items():
        s, c = window["metrics"].get(name, (0, 0))
        window["metrics"][name] = (s + torch.where(ok, value, 0.0), c + n * ok)
    window["tokens"] += stats.tokens
    window["lm_rows"] += stats.lm_rows
    window["seq_len"] = stats.seq_len


def train(
    model: nn.Module,
    objective: Objective,
    train_batches: BatchIterator,
    config: RunConfig,
    *,
    val_batches: Iterable[dict[str, Tensor]] | None = None,
    evaluate_fn: Callable[[nn.Module], dict[str, float]] | None = None,
    save_extra: Callable[[Path], None] | None = None,
) -> TrainResult:
    """Train `model` on `objective` over `train_batches` as `config` says; resume first
    when config.train.resume finds a checkpoint.

    model: a plain single-device module (initialised identically on every process); it is
        moved to the device and, under torchrun, wrapped by DDP or FSDP2 (in place).
    objective: (model, batch) -> ObjectiveOutput, e.g. lmforge.train.objectives.clm.
    train_batches: this process's shard of the training batches (see BatchIterator).
    val_batches: re-iterable validation batches (each `iter()` starts over), this process's
        shard; evaluated every eval.every steps for val_loss, val_ppl and objective metrics.
    evaluate_fn: an evaluation of the task's own, called with the (unwrapped) model every
        eval.every steps on every process (instead of, or beside, val_batches' pass): its
        val_* metrics (a fine-tuning task's loss, accuracy, F1...) join the record. Either
        kind ranks checkpoints (checkpoint.metric) and stops early (eval.patience).
    save_extra: writes more files into each checkpoint directory before it is sealed (rank 0).

    The run holds config.train.out_dir (lmforge.train.rundir): a second run there is refused,
    and a fresh run moves an earlier one aside to out_dir/previous/.
    """
    env = parallel.init_distributed(config.dist.strategy, config.dist.backend, config.train.device,
                                     config.dist.timeout_minutes)
    out = config.train.out_dir
    with rundir.open_run(out, fresh=rundir.starts_fresh(config.train.resume, out), main=env.is_main) as run_dir:
        run = _setup(model, objective, train_batches, config, env, run_dir)
        return _loop(run, val_batches, evaluate_fn, save_extra)


def _loop(run: _Run, val_batches: Iterable[dict[str, Tensor]] | None, evaluate_fn: Callable | None,
          save_extra: Callable[[Path], None] | None) -> TrainResult:
    """The steps of `train`, from where `_setup` left the run."""
    cfg, env = run.config, run.env
    evaluates = val_batches is not None or evaluate_fn is not None
    logger = RunLogger(cfg.train.out_dir, cfg.log, enabled=env.is_main, total_steps=run.total_steps,
                       start_step=run.step)
    steps = (f"steps {run.step + 1}..{run.total_steps}" if run.step < run.total_steps
             else f"nothing left to train (all {run.total_steps} steps done)")
    logger.write(f"training {sum(p.numel() for p in run.root.parameters() if p.requires_grad):,} parameters on "
                 f"{env.world_size} x {env.device} ({run.precision}), {steps}"
                 + (f", resumed from step {run.step}" if run.step else ""))
    batches = _start_ddp(run, iter(run.batches))  # after load_state_dict: the restored position is where it starts
    device = env.device
    window = _new_window(device)
    bad_run = torch.zeros((), device=device)
    skipped = torch.zeros((), device=device)
    result = TrainResult(Path(cfg.train.out_dir), run.step, run.tokens, "max_steps", best=run.best)
    last_saved = run.step if run.step else -1
    start = t_window = time.monotonic()
    with _StopSignals() as signals, contextlib.closing(logger):
        while run.step < run.total_steps:
            try:
                stats = _train_step(run, batches)
            except torch.OutOfMemoryError as e:
                raise TrainingError(_out_of_memory(run)) from e
            if stats is None:
                result.stopped = "data_exhausted"
                break
            run.step += 1
            run.tokens += stats.tokens * env.world_size
            bad_run = (bad_run + 1) * stats.found_inf  # consecutive skipped steps, on the device
            skipped += stats.found_inf
            _add_to_window(window, stats)
            logger.advance()
            out_of_time = cfg.train.max_time is not None and time.monotonic() - start > cfg.train.max_time * 60
            stop = "interrupted" if signals.reason else "max_time" if out_of_time else None

            # A single process also logs the step it stops at (processes under torchrun agree at log steps).
            if run.step % cfg.log.every == 0 or run.step == run.total_steps or (stop and not env.distributed):
                record, bad, stop_any = _log_train(run, window, stats, bad_run, skipped, stop is not None,
                                                   time.monotonic() - t_window)
                logger.log(record)
                result.train_loss = record["train_loss"]
                stop = stop or ("interrupted" if stop_any else None)  # another process was signalled
                window, t_window = _new_window(device), time.monotonic()
                if bad >= cfg.train.max_bad_steps:
                    raise TrainingError(
                        f"the gradient was NaN/Inf for {int(bad)} steps in a row (up to step {run.step}; each was "
                        "skipped): lower optim.lr, raise optim.warmup_steps, check the data, or use bf16 not fp16")
            elif env.distributed:
                stop = None  # processes agree to stop at log steps, where they communicate anyway

            if evaluates and cfg.eval.every and run.step % cfg.eval.every == 0:
                stop = stop or _evaluate_and_log(run, val_batches, evaluate_fn, logger)

            if cfg.checkpoint.every and run.step % cfg.checkpoint.every == 0:
                result.checkpoint, last_saved = _save(run, save_extra), run.step

            if stop is None and cfg.train.max_tokens is not None and run.tokens >= cfg.train.max_tokens:
                stop = "max_tokens"  # the same count on every process: no need to agree
            if stop is not None:
                result.stopped = stop
                break

        interrupted = result.stopped == "interrupted"
        if evaluates and cfg.eval.at_end and run.last_eval_step != run.step and not interrupted:
            _evaluate_and_log(run, val_batches, evaluate_fn, logger)
        if last_saved != run.step and run.step > 0:
            result.checkpoint = _save(run, save_extra)
        if interrupted:
            logger.write(f"stopped at step {run.step} ({signals.reason or 'stop requested by another process'}); "
                         f"checkpoint {result.checkpoint}; run again with train.resume=auto to continue")
    result.step, result.tokens, result.val, result.best = run.step, run.tokens, run.last_val, run.best
    result.model = run.model if run.skeleton is None else dist_state.plain_copy(
        run.skeleton, dist_state.full_model_state(run.model))  # collective under FSDP2
    return result


def _out_of_memory(run: _Run) -> str:
    t = run.config.train
    return (f"out of memory on {run.env.device} with train.micro_batch_size={t.micro_batch_size} and "
            f"data.seq_len={run.config.data.seq_len}: lower train.micro_batch_size and raise train.grad_accum "
            "to keep the global batch, set train.activation_checkpointing=true, or shard with dist.strategy=fsdp")


def _evaluate_and_log(run: _Run, val_batches: Iterable | None, evaluate_fn: Callable | None,
                      logger: RunLogger) -> str | None:
    """One evaluation, logged; returns "early_stopping" when eval.patience says to stop."""
    val = {}
    if val_batches is not None:
        val = evaluate(run.runner, val_batches, run.env.device, max_batches=run.config.eval.steps,
                       precision=run.precision, progress=run.config.log.progress and run.env.is_main)
    if evaluate_fn is not None:
        with dist_state.unsharded(run.root):  # FSDP2: processes may run different numbers of forward passes
            val.update(evaluate_fn(run.model))
    run.last_val, run.last_eval_step = val, run.step
    stop = _update_best(run, val)
    logger.log({"step": run.step, **val})
    logger.write(f"step {run.step}: " + ", ".join(f"{k} {v:.4g}" for k, v in val.items()))
    return stop
