"""Fine-tuning: one driver for every task, on lmforge's one training loop.

    finetune("classify", model="runs/bert/model", train="train.csv", valid="valid.csv",
             out="runs/agnews", epochs=3, lr=5e-5)        # -> the validation metrics
    evaluate("classify", model="runs/agnews/model", data="test.csv", out="runs/agnews/test")

What the driver does, for any task:
    load the model directory and its tokenizer (lmforge or Hugging Face format; checked to fit)
    task.setup(...)        read + tokenize the data, attach or check the head  -> Setup
    training scope         freeze the backbone / train the last K blocks / LoRA adapters
    RunConfig              AdamW (0.9, 0.999), linear warmup then linear decay to 0, grad clip 1,
                           max_steps = epochs x steps per epoch, eval + checkpoint every epoch
    train(...)             lmforge.train.loop.train; early stopping ends the batch iterator
    best model             the checkpoint with the best validation metric (keep_best)
    final evaluation       the task's full metrics on the validation set
    out/                   metrics.json, metrics.jsonl (the loop's), finetune.yaml (resolved
                           options), predictions.jsonl (each validation example's prediction:
                           classify, ner, qa, summarize, translate), report.md, task pictures
                           (confusion_matrix.png), and
                           model/: Hugging Face format where transformers has the class (LoRA
                           merged into the weights), else lmforge's;
                           adapter/ (LoRA runs): the adapter in PEFT's format, for the
                           starting model (peft.PeftModel.from_pretrained, lmforge.load(adapter=))

Writing a task (see lmforge.tasks.base for the types)
------------------------------------------------------
A task is an object with `name`, `metric` (main validation metric), `metrics` (every
scalar metric it reports, higher is better), `max_length` (default input length) and

    setup(base: Base, config: FinetuneConfig, train: Path | None, valid: Path) -> Setup

`base` is the starting checkpoint (model, tokenizer, head, special ids). `setup` reads the
files, tokenizes them into features (one dict per item the model sees), builds the model
(attach_head on base.backbone, or base.model for tasks without a head) and returns:

    Setup(model, head, train=features, valid=features,
          collate=lambda features: {"input_ids": (B, T), ...},     # CPU tensors
          step=lambda model, batch: (ObjectiveOutput(loss_sum, count, metrics), outputs),
          score=lambda model, outputs: {"f1": ..., ...},
          report=None | (metrics, out_dir) -> {heading: table}, notes=[...])

`step` is the objective: a summed loss and the number of items it sums over (the loop
divides once per optimizer step), and per-item outputs (B, ...) (a tensor, a tuple of
tensors, or None). The driver keeps the outputs of validation batches, keyed by feature
position (batches carry an "index" (B,) tensor), and passes them to `score`, so metrics
come from the same forward pass as the validation loss. A generative task may return None
outputs and generate inside `score` instead. With train=None (`evaluate`), setup must
use the head already on the model (base.head) and refuse data it does not fit.
Register the task in lmforge/tasks/__init__.py (`register(MyTask())`).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml
from torch import Tensor, nn

from lmforge.config import (
    CheckpointConfig,
    DataConfig,
    DistConfig,
    EvalConfig,
    LogConfig,
    ModelSpec,
    OptimConfig,
    RunConfig,
    TrainConfig,
)
from lmforge.dist import parallel
from lmforge.eval.report import markdown_report, write_metrics_json
from lmforge.files import atomic_write_text, check_writable
from lmforge.interop.hf import ConversionError, head_exportable, model_type_of_model
from lmforge.interop.model_dir import MODEL_DIR, save_model_dir
from lmforge.interop.peft import ADAPTER_DIR, save_adapter
from lmforge.models import HeadSpec, count_params
from lmforge.models.provenance import mark_trainable_as_trained
from lmforge.nn.lora import apply_lora, lora_layers, merge_lora
from lmforge.nn.quant import quantize
from lmforge.tasks.base import (
    ExampleBatches,
    FinetuneConfig,
    Outputs,
    Setup,
    Task,
    eval_batches,
    get_task,
    load_base,
    task_options,
)
from lmforge.train import checkpoint, loop, rundir
from lmforge.train.logging import progress_bar
from lmforge.train.loop import TrainResult, resolve_precision, seed_everything
from lmforge.train.objectives import ObjectiveOutput

log = logging.getLogger("lmforge.tasks")

PRETRAINING_HEADS = ("lm_head", "nsp_head")  # a backbone's own heads, unused under a task head


# ----------------------------------------------------------------------------- evaluation


def evaluate_task(setup: Setup, model: nn.Module, batches: list[dict[str, Tensor]], device: torch.device,
                  precision: str, progress: bool = False) -> dict[str, Any]:
    """The task's full metrics and its loss over prepared validation batches, from one
    forward pass each (the model in eval mode): `setup.step` gives the summed loss and the
    per-item outputs, which go to `setup.score` keyed by feature position.

    Under torchrun each process runs every world_size-th batch of a plain (unwrapped, or
    FSDP2-gathered) model, and the processes exchange their outputs: each example counts
    exactly once. `score` then runs on every process on the same outputs (a generative task
    generates there), and rank 0's metrics are everyone's."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    was_training = model.training
    model.eval()
    loss = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    parts: list[tuple[Tensor, Any]] = []
    with torch.no_grad():
        for batch in progress_bar(batches[rank::world], progress, "evaluation"):
            with loop.autocast(precision, device):
                out, items = setup.step(model, loop.to_device(batch, device))
            loss += out.loss.double()
            count += out.count
            if items is not None:
                parts.append((batch["index"], items))
    model.train(was_training)
    outputs: Outputs = {}
    for index, items in parts:
        per_item = (items.float().cpu().unbind(0) if isinstance(items, Tensor)
                    else list(zip(*(o.float().cpu().unbind(0) for o in items))))
        outputs.update(zip(index.tolist(), per_item))
    sums = torch.stack([loss, count]).cpu()  # host sync (evaluation only)
    if world > 1:
        gathered = parallel.gather_objects((outputs, sums))
        outputs = {k: v for part, _ in gathered for k, v in part.items()}
        sums = sum(s for _, s in gathered)
    metrics = {**setup.score(model, outputs), "loss": float(sums[0] / sums[1].clamp(min=1))}
    return parallel.broadcast_object(metrics) if world > 1 else metrics


def scalars(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The flat numbers of a metrics dict (nested tables left out), keys prefixed."""
    return {f"{prefix}{k}": v if isinstance(v, int) else float(v) for k, v in metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool)}


# ----------------------------------------------------------------------------- what trains


def freeze_pretraining_heads(backbone: nn.Module) -> None:
    """A task head never reads the backbone's LM / NSP heads: freeze their own parameters
    (not those tied to the embeddings, which the task uses)."""
    heads = {id(p) for name in PRETRAINING_HEADS if getattr(backbone, name, None) is not None
             for p in getattr(backbone, name).parameters()}
    elsewhere = {id(p) for n, p in backbone.named_parameters(remove_duplicate=False)
                 if n.split(".")[0] not in PRETRAINING_HEADS}
    for p in backbone.parameters():
        if id(p) in heads - elsewhere:
            p.requires_grad_(False)


def _last_layers_trainable(name: str, k: int, n_blocks: dict[str, int]) -> bool:
    """Is parameter `name` of a backbone trainable when only the last k blocks train?
    Blocks: the last k of each `blocks` list; embeddings: no; the rest (final norm, pooler): yes."""
    parts = name.split(".")
    if "blocks" in parts:
        i = parts.index("blocks")
        owner = ".".join(parts[:i + 1])
        return int(parts[i + 1]) >= n_blocks[owner] - k
    return not any("emb" in part for part in parts[:-1])


def apply_training_scope(model: nn.Module, head: HeadSpec | None, config: FinetuneConfig) -> str:
    """Freeze what should not train (in place): the backbone (freeze_backbone), all but the
    last K blocks (train_last_layers), or everything but LoRA adapters (lora_rank); the task
    head always trains. Returns a one-line description."""
    backbone = model.backbone if head is not None else model
    if head is not None:
        freeze_pretraining_heads(backbone)
    if (config.freeze_backbone or config.train_last_layers is not None) and head is None:
        raise ValueError("freeze_backbone / train_last_layers need a task head to train")
    what = "all parameters"
    if config.lora_rank:
        backbone.requires_grad_(False)
        wrapped = apply_lora(backbone, config.lora_targets, config.lora_rank, config.lora_alpha, config.lora_dropout)
        what = f"LoRA r={config.lora_rank} alpha={config.lora_alpha} on {len(wrapped)} layers"
    elif config.freeze_backbone:
        backbone.requires_grad_(False)
        what = "the head only (backbone frozen)"
    elif config.train_last_layers is not None:
        k = config.train_last_layers
        n_blocks = {name: len(m) for name, m in backbone.named_modules()
                    if name.split(".")[-1] == "blocks" and isinstance(m, nn.ModuleList)}
        if not n_blocks or k > min(n_blocks.values()):
            raise ValueError(f"train_last_layers {k} exceeds the model's {min(n_blocks.values(), default=0)} layers")
        for name, p in backbone.named_parameters():
            p.requires_grad_(p.requires_grad and _last_layers_trainable(name, k, n_blocks))
        what = f"the last {k} layers and the head"
    mark_trainable_as_trained(model, backbone)  # what trains is no longer its initialisation (exports)
    trainable = count_params(model, trainable_only=True)
    line = f"training {trainable:,} of {count_params(model):,} parameters: {what}"
    log.info(line)
    return line


# ----------------------------------------------------------------------------- the run


def _resolve(task: str | Task, config: FinetuneConfig | None, options: dict[str, Any]) -> tuple[Task, FinetuneConfig]:
    """The task and its FinetuneConfig: keyword options are FinetuneConfig's fields or the
    task's own (its options_type's), which end up checked and typed in config.options."""
    task = get_task(task) if isinstance(task, str) else task
    config = config or FinetuneConfig()
    shared = {f.name for f in dataclasses.fields(FinetuneConfig)}
    own = {f.name for f in dataclasses.fields(task.options_type)} if task.options_type else set()
    unknown = sorted(set(options) - shared - own)
    if unknown:
        close = {m for name in unknown for m in difflib.get_close_matches(name, own | shared, n=2)}
        hint = f" (did you mean {', '.join(sorted(close))}?)" if close else ""
        raise ValueError(f"unknown fine-tuning option(s): {', '.join(unknown)}{hint}; task {task.name}'s own "
                         f"options: {', '.join(sorted(own)) or 'none'}")
    given = config.options if isinstance(config.options, dict) else dataclasses.asdict(config.options)
    extra = options.get("options") or {}
    extra = extra if isinstance(extra, dict) else dataclasses.asdict(extra)
    task_given = {**given, **extra, **{k: v for k, v in options.items() if k in own}}
    config = dataclasses.replace(config, **{k: v for k, v in options.items() if k in shared - {"options"}},
                                 options=task_given)
    return task, dataclasses.replace(config, options=task_options(task, config))


def _with_max_length(config: FinetuneConfig, task: Task, max_seq_len: int) -> FinetuneConfig:
    """The task's default max_length when none is given, capped by the model's positions."""
    if config.max_length is not None and config.max_length > max_seq_len:
        raise ValueError(f"max_length {config.max_length} exceeds the model's max_seq_len {max_seq_len}")
    return dataclasses.replace(config, max_length=config.max_length or min(task.max_length, max_seq_len))


def selection_metric(task: Task, config: FinetuneConfig) -> tuple[str, str]:
    """(metric name, "max" or "min") that early stopping and the best model follow."""
    name = config.early_stopping_metric or task.metric
    name = name.removeprefix("val_")
    if name == "loss":
        return name, "min"
    if name not in task.metrics:
        raise ValueError(f"early_stopping_metric {name!r} is not a metric of task {task.name}; choose from "
                         f"{', '.join((*task.metrics, 'loss'))}")
    return name, "max"


def _run_config(config: FinetuneConfig, family: str, out: Path, total: int, every: int, metric: str,
                mode: str, files: tuple[str, str, str]) -> RunConfig:
    """The loop's RunConfig; files (model, train, valid) are recorded in it, so that a resume
    with other data or another starting model is caught (lmforge.train.loop.resume_changes)."""
    warmup = round(config.warmup * total) if config.warmup < 1 else int(config.warmup)
    model, train, valid = files
    return RunConfig(
        model=ModelSpec(preset=None, family=family, init_from=model),
        data=DataConfig(train=train, val=valid, tokenizer=config.tokenizer, seq_len=config.max_length,
                        seed=config.seed),
        optim=OptimConfig(lr=config.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=config.weight_decay,
                          warmup_steps=min(warmup, total), schedule="linear", min_lr_ratio=0.0, grad_clip=1.0),
        train=TrainConfig(micro_batch_size=config.batch_size, grad_accum=config.grad_accum, max_steps=total,
                          seed=config.seed, precision=config.precision, compile=config.compile, device=config.device,
                          out_dir=str(out), resume=config.resume),
        eval=EvalConfig(every=every, steps=None, at_end=True, patience=config.patience),
        checkpoint=CheckpointConfig(every=every, keep_last=1, keep_best=config.keep_best, metric=f"val_{metric}",
                                    mode=mode),
        log=LogConfig(every=config.log_every, progress=config.progress, tensorboard=config.tensorboard),
        dist=DistConfig(strategy=config.strategy),
    )


def _restore_best(model: nn.Module, result: TrainResult, out: Path) -> int:
    """Load the best checkpoint's weights when it is not the last step; returns the best step."""
    best = result.best
    if best is None or best["step"] == result.step:
        return result.step
    model.load_state_dict(checkpoint.model_weights(checkpoint.step_dir(out / "checkpoints", best["step"])))
    log.info("best %s %.4g at step %d: exporting those weights", best["metric"], best["value"], best["step"])
    return best["step"]


def hf_exportable(head: HeadSpec | None, backbone: nn.Module) -> bool:
    """Does transformers' class for this head compute what ours does? (BERT classifiers pool
    with the pooler, RoBERTa's and DistilBERT's through a hidden layer on the first token,
    GPT-2's take the last token through a bias-free `score`.)"""
    try:
        kind = model_type_of_model(backbone)
    except ConversionError:
        return False
    return head_exportable(kind, head)


def export_model(model: nn.Module, setup: Setup, base, path: Path, save_format: str, merge: bool = True) -> str:
    """Write model/ (HF format where possible) with any LoRA adapters merged; a LoRA run also
    writes adapter/ beside it (PEFT's format, lmforge.interop.peft), and only that when not
    `merge`. Returns the format of model/ ("adapter" when only the adapter was written)."""
    model.cpu()
    if lora_layers(model):
        adapter = export_adapter(model, setup, base, path.parent / "adapter")
        if not merge and adapter:
            return "adapter"
    merge_lora(model)
    fmt = save_format
    if fmt == "auto":
        fmt = "hf" if hf_exportable(setup.head, base.backbone) else "lmforge"
    if fmt == "hf":
        try:
            save_model_dir(path, model, head=setup.head, tokenizer=base.tokenizer, format="hf", special=base.special)
            return "hf"
        except ConversionError as e:
            if save_format == "hf":
                raise
            log.info("saving in lmforge format: %s", e)
    save_model_dir(path, model, head=setup.head, tokenizer=base.tokenizer, format="lmforge", special=base.special)
    return "lmforge"


def export_adapter(model: nn.Module, setup: Setup, base, path: Path) -> bool:
    """adapter/: the LoRA adapters (and the task head) as a PEFT adapter of the starting model,
    with its tokenizer; False (and a log line) when transformers has no class for the model."""
    if not hf_exportable(setup.head, base.backbone):
        log.info("no PEFT adapter written: transformers' class for this head pools differently (pooling %s)",
                 setup.head.pooling)
        return False
    try:
        # a Hub id stays one (peft users load the base from the Hub), a directory is named as it is
        named = base.name if base.name and not Path(base.name).exists() else str(base.path)
        save_adapter(model, setup.head, path, base_model=named, tokenizer=base.tokenizer)
    except ConversionError as e:
        log.info("no PEFT adapter written: %s", e)
        return False
    if json.loads((base.path / "config.json").read_text()).get("format") == "lmforge":
        log.info("%s: a PEFT adapter of %s, a model in lmforge's format: peft needs it in Hugging Face's "
                 "(lmforge convert %s BASE_HF --to hf)", path, base.path, base.path)
    rundir.record(path.parent, path.name)
    return True


def _shown(model: str | os.PathLike) -> str:
    """A model directory as a report names it: its last two parts (runs/agnews/model -> agnews/model)."""
    return "/".join(Path(model).parts[-2:])


def write_outputs(out: Path, title: str, metrics: dict[str, Any], setup: Setup, extra: dict[str, object]) -> None:
    """metrics.json, predictions.jsonl (one line per scored example, where the task gives
    them) and report.md (and the task's pictures) into out/."""
    out.mkdir(parents=True, exist_ok=True)
    before = set(os.listdir(out))
    predictions = metrics.get("predictions")
    write_metrics_json(out / "metrics.json", {k: v for k, v in metrics.items() if k != "predictions"})
    if predictions is not None:
        atomic_write_text(out / "predictions.jsonl",
                          "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions))
    sections: dict[str, object] = {"metrics": scalars(metrics)}
    if setup.report is not None:
        sections.update(setup.report(metrics, out))
    sections.update(extra)
    if setup.notes:
        sections["notes"] = "\n".join(f"- {n}" for n in setup.notes)
    atomic_write_text(out / "report.md", markdown_report(title, sections))
    rundir.record(out, "metrics.json", "report.md", *(["predictions.jsonl"] if predictions is not None else []),
                  *(set(os.listdir(out)) - before))  # the task's pictures


def finetune(task: str | Task, model: str | os.PathLike, train: str | os.PathLike, valid: str | os.PathLike,
             out: str | os.PathLike, config: FinetuneConfig | None = None, **options: Any) -> dict[str, Any]:
    """Fine-tune the model directory `model` for `task` on `train`, evaluating on `valid`
    every epoch, and write the run to `out` (see the module docstring). Options are
    FinetuneConfig's fields. Returns the final validation metrics (those in metrics.json)."""
    task, config = _resolve(task, config, options)
    if config.quantize != "none":
        raise ValueError(f"quantize: {config.quantize} is for evaluation (lmforge evaluate); fine-tuning trains "
                         "full-precision weights")
    out = Path(out)
    env = parallel.init_distributed(config.strategy, "auto", config.device)
    try:
        with rundir.open_run(out, fresh=rundir.starts_fresh(config.resume, out), main=env.is_main) as run:
            check_writable(out / "model", MODEL_DIR)  # before training, not after it
            if config.lora_rank:
                check_writable(out / "adapter", ADAPTER_DIR)
            return _finetune(task, model, Path(train), Path(valid), out, config, env, run)
    finally:
        parallel.shutdown()


def _finetune(task: Task, model: str | os.PathLike, train: Path, valid: Path, out: Path, config: FinetuneConfig,
              env: parallel.DistEnv, run: rundir.RunDir) -> dict[str, Any]:
    """`finetune` inside its run directory."""
    config = dataclasses.replace(config, progress=config.progress and env.is_main)  # bars on rank 0 only
    seed_everything(config.seed)  # the new head's initialisation
    base = load_base(model, config.tokenizer)
    config = _with_max_length(config, task, base.config.max_seq_len)
    metric, mode = selection_metric(task, config)
    setup = task.setup(base, config, train, valid)
    scope = apply_training_scope(setup.model, setup.head, config)

    batches = ExampleBatches(setup.train, setup.collate, config.batch_size, epochs=config.epochs, seed=config.seed,
                             rank=env.rank, world_size=env.world_size)
    steps_per_epoch = max(1, batches.batches_per_epoch // config.grad_accum)
    total = steps_per_epoch * config.epochs
    every = config.eval_every or steps_per_epoch
    val = eval_batches(setup.valid, setup.collate, config.batch_size)
    precision = resolve_precision(config.precision, env.device)

    def objective(m: nn.Module, batch: dict[str, Tensor]) -> ObjectiveOutput:
        return setup.step(m, batch)[0]

    def evaluate_fn(m: nn.Module) -> dict[str, float]:
        return scalars(evaluate_task(setup, m, val, env.device, precision, config.progress), "val_")

    run_config = _run_config(config, base.family, out, total, every, metric, mode, (str(model), str(train), str(valid)))
    started, cpu_started = time.perf_counter(), time.process_time()
    result = loop.train(setup.model, objective, batches, run_config, evaluate_fn=evaluate_fn)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    trained = result.model.to(env.device)  # plain on every process (gathered whole under FSDP2)
    best_step = _restore_best(trained, result, out) if config.keep_best else result.step
    metrics = evaluate_task(setup, trained, val, env.device, precision, config.progress)
    samples = sum(parallel.gather_objects(batches.items))  # all processes
    metrics["run"] = {"steps": result.step, "best_step": best_step, "stopped": result.stopped,
                      "epochs": round(result.step / steps_per_epoch, 3), "train_samples": samples,
                      "train_seconds": seconds, "train_samples_per_s": samples / max(seconds, 1e-9),
                      "train_cpu_seconds": cpu_seconds, "processes": env.world_size, "trainable": scope}
    failure = None
    if env.is_main:  # rank 0 writes; the others wait for it below
        try:
            _write_run(trained, setup, base, task, model, train, valid, out, config, metrics, run)
        except Exception as e:  # noqa: BLE001 (the other processes learn of it)
            failure = e
    parallel.raise_if_failed(failure, "writing the fine-tuned model")
    return metrics


def _write_run(trained: nn.Module, setup: Setup, base, task: Task, model: str | os.PathLike, train: Path,
               valid: Path, out: Path, config: FinetuneConfig, metrics: dict[str, Any], run: rundir.RunDir) -> None:
    """model/ (and adapter/), finetune.yaml, metrics.json, report.md; the checkpoints go unless kept."""
    run.record("model", "finetune.yaml")
    metrics["run"]["model_format"] = export_model(trained, setup, base, out / "model", config.save_format,
                                                   config.merge_lora)
    atomic_write_text(out / "finetune.yaml", run_yaml(task.name, model, train, valid, out, config))
    write_outputs(out, f"{task.name}: {_shown(model)} fine-tuned on {train.name}", metrics, setup,
                  {"run": {k: v for k, v in metrics["run"].items()}})
    if not config.keep_checkpoints:
        checkpoint.remove_run_checkpoints(out / "checkpoints", run.run_id)


def run_yaml(task: str, model: Path, train: Path, valid: Path, out: Path, config: FinetuneConfig) -> str:
    """finetune.yaml: what the run was given and resolved, in the flat form of the command's
    options, so `lmforge finetune TASK --config finetune.yaml` runs it again."""
    fields = config.to_dict()
    options = fields.pop("options")
    fields.pop("quantize")  # evaluation's, not a finetune option
    resolved = {"model": str(model), "train": str(train), "valid": str(valid), "out": str(out), **fields, **options}
    return f"# lmforge finetune {task} --config finetune.yaml\n" + yaml.safe_dump(resolved, sort_keys=False)


def evaluate(task: str | Task, model: str | os.PathLike, data: str | os.PathLike, out: str | os.PathLike | None = None,
             config: FinetuneConfig | None = None, **options: Any) -> dict[str, Any]:
    """Evaluate a fine-tuned model directory on `data` with the task's metrics; with `out`,
    write metrics.json and report.md there. The labels come with the model (its head)."""
    task, config = _resolve(task, config, options)
    base = load_base(model, config.tokenizer)
    config = _with_max_length(config, task, base.config.max_seq_len)
    setup = task.setup(base, config, None, Path(data))
    device = parallel.resolve_device(config.device)
    setup.model.to(device).eval()
    if config.quantize != "none":
        quantize(setup.model, config.quantize)
    batches = eval_batches(setup.valid, setup.collate, config.batch_size)
    metrics = evaluate_task(setup, setup.model, batches, device, resolve_precision(config.precision, device),
                            config.progress)
    if out is not None:
        write_outputs(Path(out), f"{task.name}: {_shown(model)} on {Path(data).name}", metrics, setup, {})
    return metrics
