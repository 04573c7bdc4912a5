"""Run configuration: what a training run needs beyond the model architecture.

One nested dataclass per concern, every default defined once, here:

    RunConfig
      model       which architecture (preset + overrides) and where its weights start
      data        where the tokens come from and how objectives corrupt them
      optim       the optimizer (AdamW, Muon) and the learning-rate schedule
      train       objective, batch, budget, precision, seed, output directory, resume
      eval        validation while training
      checkpoint  how often to save, how many to keep
      log         progress bar, metrics.jsonl, TensorBoard, MFU peak
      dist        DDP / FSDP2 under torchrun

The CLI builds it with jsonargparse from a YAML file and dotted overrides
(`--config run.yaml --optim.lr 3e-4`); `load_config` does the same from Python. The
help text of each field is its line in the class docstring's Args section.
Validation (`__post_init__`) raises ValueError naming the field, e.g. "optim.lr".
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from jsonargparse import ArgumentError, ArgumentParser

from lmforge.files import atomic_write_text

OBJECTIVES = ("clm", "mlm", "mlm+nsp", "denoise")


def _check(ok: bool, name: str, message: str, value: Any) -> None:
    if not ok:
        raise ValueError(f"{name} {message}, got {value!r}")


@dataclass
class ModelSpec:
    """Which model to train.

    Args:
        preset: name of an architecture preset (gpt2-124m, gpt-tiny, bert-base, bart-base, ...); None:
            the default architecture of `family`.
        family: gpt, bert, encdec or t5; None: the preset's family.
        overrides: architecture fields that replace the preset's, e.g. {dim: 256, n_layers: 4}. The
            vocabulary size is taken from the tokenizer unless given here.
        init_from: a checkpoint directory whose weights start the run (continued pretraining); None: random init.
    """

    preset: str | None = "gpt-tiny"
    family: Literal["gpt", "bert", "encdec", "t5"] | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    init_from: str | None = None

    def __post_init__(self) -> None:
        _check(self.preset is not None or self.family is not None, "model.preset", "or model.family must be set",
               self.preset)


@dataclass
class DataConfig:
    """Where the training tokens come from.

    Args:
        train: training data: a directory written by `lmforge data prepare`, or text files (prepared
            into the run directory).
        val: a directory prepared from validation text (all of it is used); None: the validation split
            of data.train.
        tokenizer: tokenizer file or directory (saved with the model). Required for mlm, mlm+nsp
            and denoise (their special ids) and for text files; None: clm on prepared shards,
            and the model is exported without a tokenizer.
        seq_len: tokens per training sequence (at most the model's max_seq_len).
        synthetic: train on uniformly random tokens instead of data (smoke tests, throughput
            measurements); needs model.overrides.vocab_size or a preset vocabulary.
        mlm_probability: fraction of tokens masked for mlm and mlm+nsp (BERT: 0.15).
        whole_word_mask: mask every sub-token of a chosen word together.
        denoise_mode: bart (text infilling) or t5 (span corruption with sentinels).
        noise_ratio: fraction of tokens corrupted for denoise (BART: 0.3, T5: 0.15).
        mean_span_length: mean corrupted span length (BART's Poisson lambda: 3).
        permute_sentences: shuffle sentences before infilling (BART's sentence permutation).
        seed: seed of the data order and of the masking RNG.
    """

    train: str | None = None
    val: str | None = None
    tokenizer: str | None = None
    seq_len: int = 256
    synthetic: bool = False
    mlm_probability: float = 0.15
    whole_word_mask: bool = False
    denoise_mode: Literal["bart", "t5"] = "bart"
    noise_ratio: float = 0.3
    mean_span_length: float = 3.0
    permute_sentences: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        _check(self.seq_len >= 2, "data.seq_len", "must be at least 2", self.seq_len)
        _check(0.0 < self.mlm_probability < 1.0, "data.mlm_probability", "must be in (0, 1)", self.mlm_probability)
        _check(0.0 < self.noise_ratio < 1.0, "data.noise_ratio", "must be in (0, 1)", self.noise_ratio)
        _check(self.mean_span_length >= 1.0, "data.mean_span_length", "must be >= 1", self.mean_span_length)


@dataclass
class OptimConfig:
    """The optimizer (AdamW, or Muon for the blocks' matrices) and the learning-rate schedule.

    Args:
        optimizer: adamw, or muon: Muon (Newton-Schulz orthogonalised momentum, modded-nanogpt) for
            the 2-D weights of the Transformer blocks' linear layers, AdamW (lr, betas, eps,
            weight_decay) for embeddings, the LM head, biases and norm gains.
        lr: peak learning rate, reached at the end of warmup (AdamW's, with muon: of the AdamW part).
        betas: AdamW (beta1, beta2).
        eps: AdamW epsilon.
        weight_decay: decoupled weight decay, applied to matrices and embeddings only (not to norms or biases).
        warmup_steps: optimizer steps of linear warmup from 0 to lr.
        schedule: decay after warmup: cosine, linear, constant, or wsd (warmup-stable-decay, trapezoidal):
            the peak lr until the last decay_fraction of the steps, then a linear decay.
        min_lr_ratio: the schedule decays to lr * min_lr_ratio at the last step.
        decay_fraction: wsd: the fraction of all steps that decays at the end.
        muon_lr: muon: peak learning rate of the Muon part (on the same schedule).
        muon_momentum: muon: the momentum (beta) of Muon's Nesterov momentum.
        muon_weight_decay: muon: decoupled weight decay of the Muon part.
        grad_clip: clip the global gradient norm to this; 0 disables clipping (the norm is still logged).
        fused: fused AdamW kernel; None: on when the device has one (CUDA, CPU). Fused also lets a
            step with a non-finite gradient be skipped on the device without a host sync.
    """

    optimizer: Literal["adamw", "muon"] = "adamw"
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    warmup_steps: int = 100
    schedule: Literal["cosine", "linear", "constant", "wsd"] = "cosine"
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2
    muon_lr: float = 0.02
    muon_momentum: float = 0.95
    muon_weight_decay: float = 0.0
    grad_clip: float = 1.0
    fused: bool | None = None

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        _check(self.lr > 0, "optim.lr", "must be positive", self.lr)
        _check(len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas), "optim.betas",
               "must be two numbers in [0, 1)", self.betas)
        _check(self.eps > 0, "optim.eps", "must be positive", self.eps)
        _check(self.weight_decay >= 0, "optim.weight_decay", "must be >= 0", self.weight_decay)
        _check(self.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0", self.warmup_steps)
        _check(self.schedule in ("cosine", "linear", "constant", "wsd"), "optim.schedule",
               "must be cosine, linear, constant or wsd", self.schedule)
        _check(0.0 <= self.min_lr_ratio <= 1.0, "optim.min_lr_ratio", "must be in [0, 1]", self.min_lr_ratio)
        _check(0.0 < self.decay_fraction <= 1.0, "optim.decay_fraction", "must be in (0, 1]", self.decay_fraction)
        _check(self.optimizer in ("adamw", "muon"), "optim.optimizer", "must be adamw or muon", self.optimizer)
        _check(self.muon_lr > 0, "optim.muon_lr", "must be positive", self.muon_lr)
        _check(0.0 <= self.muon_momentum < 1.0, "optim.muon_momentum", "must be in [0, 1)", self.muon_momentum)
        _check(self.muon_weight_decay >= 0, "optim.muon_weight_decay", "must be >= 0", self.muon_weight_decay)
        _check(self.grad_clip >= 0, "optim.grad_clip", "must be >= 0", self.grad_clip)


@dataclass
class TrainConfig:
    """The training run.

    Args:
        objective: clm (causal LM), mlm (masked LM), mlm+nsp (masked LM + next sentence
            prediction) or denoise (encoder-decoder reconstruction).
        micro_batch_size: sequences per forward/backward pass, per process.
        grad_accum: micro-batches accumulated into one optimizer step. Global batch =
            micro_batch_size * grad_accum * processes.
        max_steps: optimizer steps to train; None: derived from max_tokens.
        max_tokens: stop after this many input tokens (all processes); also sets the schedule
            length when max_steps is None.
        max_time: stop after this many minutes of training (checkpointing first); the schedule
            still follows max_steps / max_tokens.
        seed: seed of model initialisation and dropout (each process adds its rank for dropout).
        precision: fp32, bf16 (autocast), fp16 (autocast + loss scaling) or auto: bf16 on a GPU
            that supports it, else fp32.
        compile: torch.compile each Transformer block.
        activation_checkpointing: recompute each block's activations in backward (less memory, ~30% more compute).
        device: auto (cuda when available, else cpu), cpu, cuda, or cuda:N.
        out_dir: run directory: checkpoints/, metrics.jsonl, tb/, loss.png, config.yaml.
        resume: auto (the latest good checkpoint in out_dir, if any), none (start fresh: a run already
            in out_dir is moved to out_dir/previous/), or a checkpoint directory. Resuming checks the
            configuration against the checkpoint's: a change to what is trained (model, data, optimizer
            and schedule, objective, seed, batch) is refused unless train.accept_changes. A larger
            train.max_steps / max_tokens extends the run: the schedule is recomputed for the new length
            (cosine/linear decay stretch from the resumed step on, so the learning rate there rises to
            where the longer schedule has it; constant and warmup-stable-decay continue smoothly).
        accept_changes: resume even though the configuration changed what is trained; the new values
            apply from the resumed step (run.json's history records which fields changed, and when).
        max_bad_steps: stop after this many optimizer steps in a row with a NaN/Inf gradient (each is skipped).
    """

    objective: Literal["clm", "mlm", "mlm+nsp", "denoise"] = "clm"
    micro_batch_size: int = 8
    grad_accum: int = 1
    max_steps: int | None = 1000
    max_tokens: int | None = None
    max_time: float | None = None
    seed: int = 1337
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    compile: bool = False
    activation_checkpointing: bool = False
    device: str = "auto"
    out_dir: str = "runs/lmforge"
    resume: str = "auto"
    accept_changes: bool = False
    max_bad_steps: int = 10

    def __post_init__(self) -> None:
        _check(self.objective in OBJECTIVES, "train.objective", f"must be one of {OBJECTIVES}", self.objective)
        _check(self.micro_batch_size >= 1, "train.micro_batch_size", "must be >= 1", self.micro_batch_size)
        _check(self.grad_accum >= 1, "train.grad_accum", "must be >= 1", self.grad_accum)
        _check(self.max_steps is None or self.max_steps >= 1, "train.max_steps", "must be >= 1", self.max_steps)
        _check(self.max_tokens is None or self.max_tokens >= 1, "train.max_tokens", "must be >= 1", self.max_tokens)
        _check(self.max_steps is not None or self.max_tokens is not None, "train.max_steps",
               "or train.max_tokens must be set", self.max_steps)
        _check(self.max_time is None or self.max_time > 0, "train.max_time", "must be positive (minutes)",
               self.max_time)
        _check(self.precision in ("auto", "fp32", "bf16", "fp16"), "train.precision",
               "must be auto, fp32, bf16 or fp16", self.precision)
        _check(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"), "train.device",
               "must be auto, cpu, cuda or cuda:N", self.device)
        _check(bool(self.out_dir), "train.out_dir", "must be a directory path", self.out_dir)
        _check(bool(self.resume), "train.resume", "must be auto, none or a checkpoint directory", self.resume)
        _check(self.max_bad_steps >= 1, "train.max_bad_steps", "must be >= 1", self.max_bad_steps)


@dataclass
class EvalConfig:
    """Validation while training.

    Args:
        every: evaluate every this many optimizer steps; 0: only at the end.
        steps: validation batches per evaluation (per process); None: the whole validation set.
        at_end: evaluate once more after the last step.
        patience: early stopping: stop after this many evaluations in a row that do not improve
            checkpoint.metric (in checkpoint.mode); None: never stop early.
    """

    every: int = 500
    steps: int | None = 50
    at_end: bool = True
    patience: int | None = None

    def __post_init__(self) -> None:
        _check(self.every >= 0, "eval.every", "must be >= 0", self.every)
        _check(self.steps is None or self.steps >= 1, "eval.steps", "must be >= 1 or null", self.steps)
        _check(self.patience is None or self.patience >= 1, "eval.patience", "must be >= 1 or null", self.patience)


@dataclass
class CheckpointConfig:
    """Saving and pruning checkpoints (out_dir/checkpoints/step_NNNNNNNN).

    Args:
        every: save every this many optimizer steps; 0: only at the end (and on Ctrl-C).
        keep_last: keep this many most recent checkpoints (older ones are deleted).
        keep_best: also keep the checkpoint with the best `metric` (needs every to be a multiple of eval.every).
        metric: validation metric that ranks checkpoints, e.g. val_loss, val_mlm_acc.
        mode: min if lower `metric` is better, max if higher is.
    """

    every: int = 1000
    keep_last: int = 3
    keep_best: bool = True
    metric: str = "val_loss"
    mode: Literal["min", "max"] = "min"

    def __post_init__(self) -> None:
        _check(self.every >= 0, "checkpoint.every", "must be >= 0", self.every)
        _check(self.keep_last >= 1, "checkpoint.keep_last", "must be >= 1", self.keep_last)
        _check(self.mode in ("min", "max"), "checkpoint.mode", "must be min or max", self.mode)


@dataclass
class LogConfig:
    """What a person watching the run sees.

    Args:
        every: log train loss, learning rate, tokens/s and MFU every this many steps (the only
            steps where the loop waits for the device).
        progress: show a progress bar (rank 0 only).
        tensorboard: write TensorBoard event files to out_dir/tb.
        plot: write out_dir/loss.png at the end.
        peak_flops: peak FLOP/s of one device for MFU; None: the datasheet table (lmforge.hardware)
            for a known GPU (989e12 on H100/H200 in bf16, the dense tensor-core peak), a measured
            fp32 matmul rate on CPU.
    """

    every: int = 10
    progress: bool = True
    tensorboard: bool = True
    plot: bool = True
    peak_flops: float | None = None

    def __post_init__(self) -> None:
        _check(self.every >= 1, "log.every", "must be >= 1", self.every)
        _check(self.peak_flops is None or self.peak_flops > 0, "log.peak_flops", "must be positive",
               self.peak_flops)


@dataclass
class DistConfig:
    """Parallelism across processes started by torchrun (ignored in a single process).

    Args:
        strategy: ddp (replicate the model, all-reduce gradients), fsdp (FSDP2: shard
            parameters, gradients and optimizer state per block), or none (refused under torchrun
            with more than one process, which would train independent copies).
        backend: auto (nccl on CUDA, gloo on CPU), nccl or gloo.
        reshard_after_forward: FSDP: free each block's gathered parameters after forward (less
            memory, one more all-gather in backward).
        mixed_precision: FSDP with train.precision bf16 or fp16: gather parameters in that
            dtype (half the all-gather traffic and memory) and reduce gradients in fp32; the
            sharded master weights and AdamW state stay fp32. False: gather fp32 (autocast
            still computes in the low precision).
        timeout_minutes: how long a process waits in a collective for the others before the
            run fails (NCCL's own default is 10; rank 0 writing a large final model or a slow
            shared filesystem can take longer).
    """

    strategy: Literal["none", "ddp", "fsdp"] = "ddp"
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    reshard_after_forward: bool = True
    mixed_precision: bool = True
    timeout_minutes: float = 30.0

    def __post_init__(self) -> None:
        _check(self.strategy in ("none", "ddp", "fsdp"), "dist.strategy", "must be none, ddp or fsdp",
               self.strategy)
        _check(self.backend in ("auto", "nccl", "gloo"), "dist.backend", "must be auto, nccl or gloo", self.backend)
        _check(self.timeout_minutes > 0, "dist.timeout_minutes", "must be > 0", self.timeout_minutes)


@dataclass
class RunConfig:
    """A complete training run.

    Args:
        model: which model to train.
        data: where the training tokens come from.
        optim: the optimizer (AdamW, Muon) and the learning-rate schedule.
        train: objective, batch, budget, precision, output directory.
        eval: validation while training.
        checkpoint: saving and pruning checkpoints.
        log: progress bar, metrics, TensorBoard.
        dist: DDP / FSDP2 under torchrun.
    """

    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    dist: DistConfig = field(default_factory=DistConfig)

    def __post_init__(self) -> None:
        c, e = self.checkpoint, self.eval
        if c.keep_best and c.every and e.every and c.every % e.every:
            raise ValueError(f"checkpoint.every ({c.every}) must be a multiple of eval.every ({e.every}) when "
                             "checkpoint.keep_best is set, so that every checkpoint has a validation metric")

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (tuples as lists), the form written to YAML."""
        return _plain(dataclasses.asdict(self))


# Fields a resumed run may change freely: how it is run, watched and stopped, not what it trains.
FREE_ON_RESUME = ("train.max_time", "train.precision", "train.compile", "train.activation_checkpointing",
                  "train.device", "train.out_dir", "train.resume", "train.accept_changes", "train.max_bad_steps",
                  "eval.", "checkpoint.", "log.", "dist.")
EXTENDABLE = ("train.max_steps", "train.max_tokens")  # may grow on resume (extending the run), not shrink


def _flat(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for key, value in obj.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: obj}


def config_changes(old: dict[str, Any], new: RunConfig) -> dict[str, tuple[Any, Any]]:
    """{dotted field: (checkpoint's value, this run's)} for every change a resumed run may not
    make silently (see FREE_ON_RESUME and EXTENDABLE). `old` is a checkpoint's config.yaml."""
    before, after = _flat(_plain(old)), _flat(new.to_dict())
    changes = {}
    for key in sorted(set(before) | set(after)):
        a, b = before.get(key), after.get(key)
        known = (key in before and key in after) or key.startswith("model.overrides.")  # a field of both versions
        if a == b or not known or key.startswith(FREE_ON_RESUME):
            continue
        if key in EXTENDABLE and a is not None and b is not None and b >= a:
            continue
        changes[key] = (a, b)
    return changes


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def config_parser(exit_on_error: bool = False) -> ArgumentParser:
    """A jsonargparse parser for RunConfig: `--config FILE.yaml` then dotted overrides
    (`--optim.lr 3e-4`, `--model.overrides.dim 256`). The CLI uses the same fields."""
    parser = ArgumentParser(exit_on_error=exit_on_error, prog="lmforge")
    parser.add_argument("--config", action="config", help="YAML file with any of the sections below")
    parser.add_class_arguments(RunConfig, fail_untyped=True, sub_configs=True)
    return parser


def _override_args(overrides: dict[str, Any] | list[str] | None) -> list[str]:
    if overrides is None:
        return []
    if isinstance(overrides, list):
        return list(overrides)
    args = []
    for key, value in overrides.items():
        text = value if isinstance(value, str) else yaml.safe_dump(_plain(value), default_flow_style=True)
        args.append(f"--{key}={text.strip()}")  # "=" keeps a negative number from reading as an option
    return args


def load_config(path: str | os.PathLike | None = None,
                overrides: dict[str, Any] | list[str] | None = None) -> RunConfig:
    """RunConfig from a YAML file (None: the defaults) and overrides, either a dict of dotted
    keys ({"optim.lr": 3e-4}) or CLI-style arguments (["--optim.lr", "3e-4"]). Unknown keys,
    wrong types and invalid values raise ValueError naming the file and field."""
    args = []
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such config file")
        args = ["--config", str(path)]
    parser = config_parser()
    where = f"{path}: " if path is not None else ""
    try:
        return from_namespace(parser.parse_args(args + _override_args(overrides)))
    except (ArgumentError, ValueError) as e:
        message = " ".join(str(e).replace("\n...", "").split())  # jsonargparse's multi-line text on one line
        raise ValueError(f"{where}{message}") from None


def from_namespace(ns) -> RunConfig:
    """RunConfig from the namespace `config_parser()` (or the CLI's pretrain command) parsed."""
    ns = ns.clone()
    ns.pop("config", None)
    cfg = config_parser().instantiate(ns)
    return RunConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(RunConfig)})


def save_config(config: RunConfig, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (loadable by `load_config`), atomically."""
    atomic_write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False))
