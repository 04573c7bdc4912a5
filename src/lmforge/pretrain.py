"""Pretraining as a library call: RunConfig in, a trained model's final metrics out.

    pretrain(config)                       # data from config.data
    pretrain(config, data=my_builder)      # any data: a DataBuilder

The model comes from config.model (preset + overrides); its vocabulary and special ids
from the data (the tokenizer). The objective picks the family: clm trains a GPT, mlm and
mlm+nsp a Bert, denoise an EncoderDecoder.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge import hub
from lmforge.config import RunConfig
from lmforge.data.pretraining import DataBuilder, prepared_data, prepares_into_run, synthetic_data
from lmforge.dist import parallel
from lmforge.dist.parallel import DistEnv
from lmforge.files import check_writable
from lmforge.hardware import ACCELERATORS
from lmforge.interop.hf import ConversionError, model_type_of
from lmforge.interop.model_dir import MODEL_DIR, load_model, save_model_dir
from lmforge.models import FAMILIES, ModelConfig, build, count_params, family_of, preset
from lmforge.models.arch import check_fits
from lmforge.models.provenance import set_untrained
from lmforge.models.weights import load_tensors
from lmforge.plan import make_plan
from lmforge.plan.arch import resolve_config
from lmforge.tokenizer import Tokenizer
from lmforge.train import checkpoint, rundir
from lmforge.train.loop import resolve_precision, seed_everything, train
from lmforge.train.objectives import FAMILY_OF_OBJECTIVE, get_objective

# ----------------------------------------------------------------------------- model


def _init_from_model(spec) -> bool:
    """Is model.init_from a model (a directory with config.json, or a Hub id) rather than a
    training checkpoint? Then the architecture is the model's own."""
    if spec.init_from is None:
        return False
    path = Path(spec.init_from)
    return (path / "config.json").is_file() or (not path.exists() and hub.is_hub_id(spec.init_from))


def model_config(config: RunConfig, **data_overrides: Any) -> ModelConfig:
    """The architecture: preset (or the family's defaults; or, when model.init_from names a
    model, that model's own), then the data's fields (vocab_size, special ids), then
    model.overrides. The family must suit the objective."""
    spec, objective = config.model, config.train.objective
    starts = _init_from_model(spec)
    base = resolve_config(spec.init_from) if starts else preset(spec.preset) if spec.preset else \
        FAMILIES[spec.family][0]()
    family, named = family_of(base), spec.init_from if starts else spec.preset
    if spec.family is not None and spec.family != family:
        raise ValueError(f"model.family is {spec.family!r} but {named!r} is a {family} model")
    if family not in FAMILY_OF_OBJECTIVE[objective]:
        raise ValueError(f"train.objective {objective!r} trains a {' or '.join(FAMILY_OF_OBJECTIVE[objective])} "
                         f"model, but {named!r} is a {family} model")
    known = {f.name for f in dataclasses.fields(base)}
    unknown = sorted(set(spec.overrides) - known)
    if unknown:
        raise ValueError(f"model.overrides: unknown {family} model field(s) {unknown}; known: {sorted(known)}")
    # The data's fields (vocab_size, special ids) apply where the family has them.
    fields = {**{k: v for k, v in data_overrides.items() if k in known}, **spec.overrides}
    if starts:
        if fields.get("vocab_size", base.vocab_size) != base.vocab_size:
            raise ValueError(f"data.tokenizer has {fields['vocab_size']} tokens but model.init_from {named!r} has "
                             f"{base.vocab_size}: continue pretraining with the model's own tokenizer")
        cfg = type(base).from_dict({**base.to_dict(), **fields})
    else:
        cfg = preset(spec.preset, **fields) if spec.preset else type(base).from_dict(fields)
    if objective == "mlm+nsp" and not cfg.nsp:
        raise ValueError(f"train.objective 'mlm+nsp' needs a next-sentence head, which {named or 'this model'!r} has "
                         "not (model.nsp is false, as in RoBERTa and DistilBERT): use train.objective mlm")
    if config.data.seq_len > cfg.max_seq_len:
        raise ValueError(f"data.seq_len ({config.data.seq_len}) is longer than the model's max_seq_len "
                         f"({cfg.max_seq_len})")
    return cfg


def init_weights(model: nn.Module, path: str | Path) -> None:
    """Start from the weights of a training checkpoint (verified first), an lmforge or
    Hugging Face model directory, or a Hub id: matched strictly by name and shape."""
    path = Path(path)
    if (path / checkpoint.MANIFEST).is_file():
        checkpoint.verify(path)
        # One file, or the shards of a run of several processes.
        load_tensors(model, checkpoint.model_weights(path), path)
        return
    loaded = load_model(path)  # any format lmforge reads, its names mapped to lmforge's
    try:
        model.load_state_dict(loaded.backbone.state_dict())
    except RuntimeError as e:
        raise ValueError(f"{path}: its weights do not fit the configured model ({str(e).splitlines()[0]})") from None


# ----------------------------------------------------------------------------- pretrain


def plan_summary(mcfg: ModelConfig, config: RunConfig, env: DistEnv) -> str:
    """What `lmforge plan` predicts for this run, in a line or two, with a warning when the
    predicted peak memory exceeds the device's (on the CPU: the machine's RAM). Step time is
    predicted on GPUs only: on the CPU the planner would have to time this very setup."""
    t, d = config.train, config.data
    on_gpu = env.device.type == "cuda"
    device = "h100"  # FLOPs and memory do not depend on it; the CPU's own kernels via backend
    if on_gpu:
        name = torch.cuda.get_device_name(env.device)
        device = next((key for key, a in ACCELERATORS.items() if a.match in name), "measured")
    plan = make_plan(mcfg, seq_len=d.seq_len, batch_size=t.micro_batch_size, grad_accum=t.grad_accum,
                     precision=resolve_precision(t.precision, env.device),
                     activation_checkpointing=t.activation_checkpointing, devices=env.world_size,
                     strategy=config.dist.strategy if env.world_size > 1 else "ddp", device=device,
                     mlm_fraction=d.mlm_probability, backend=None if on_gpu else "cpu")
    mem = plan.memory
    capacity = plan.device["memory"] if on_gpu else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    line = (f"plan: {plan.flops['model_flops_per_token'] / 1e6:,.1f} MFLOP/token, peak memory "
            f"{mem['peak'] / 2**30:.2f} GiB of {capacity / 2**30:.1f} GiB")
    if on_gpu:
        line += f", predicted {plan.time['step_seconds']:.3g} s/step, {plan.time['tokens_per_second']:,.0f} tokens/s"
    lines = [line + " (details: lmforge plan --verify)"]
    if mem["reserved_estimate"] > capacity:
        lines.append(f"WARNING: this run is predicted NOT to fit in memory (train.micro_batch_size="
                     f"{t.micro_batch_size}): lower it and raise train.grad_accum, or set "
                     "train.activation_checkpointing=true or dist.strategy=fsdp")
    return "\n".join(lines)


# Tensors an objective never updates from scratch: exported without them (mlm: BertForMaskedLM,
# not a BertForPreTraining with a random NSP head).
UNTRAINED_BY_OBJECTIVE = {"mlm": ("pooler.weight", "pooler.bias", "nsp_head.weight", "nsp_head.bias")}


def export(model: nn.Module, tokenizer: Tokenizer | None, path: Path) -> Path:
    """Save the trained model for `lmforge.load` and transformers: Hugging Face format where
    transformers has the architecture, else lmforge's (e.g. the original Transformer)."""
    try:
        model_type_of(model.config)
    except ConversionError:
        return save_model_dir(path, model, tokenizer=tokenizer, format="lmforge")
    return save_model_dir(path, model, tokenizer=tokenizer, format="hf")


def pretrain(config: RunConfig, *, data: DataBuilder | None = None) -> dict[str, Any]:
    """Build the model and data from `config`, train (resuming when a checkpoint is found),
    and return the final metrics: step, tokens, stopped, train_loss, val_* metrics, best,
    checkpoint (path), out_dir, params.

    data: a DataBuilder (config, env) -> PretrainData; None: synthetic tokens when
    config.data.synthetic, else config.data's prepared shards.
    """
    env = parallel.init_distributed(config.dist.strategy, config.dist.backend, config.train.device,
                                     config.dist.timeout_minutes)
    out = Path(config.train.out_dir)
    try:
        with rundir.open_run(out, fresh=rundir.starts_fresh(config.train.resume, out), main=env.is_main):
            return _pretrain(config, data, env)
    finally:
        parallel.shutdown()


def _pretrain(config: RunConfig, data: DataBuilder | None, env: DistEnv) -> dict[str, Any]:
    """`pretrain` inside its run directory."""
    check_writable(Path(config.train.out_dir) / "model", MODEL_DIR)  # before training, not after it
    if data is None and prepares_into_run(config):
        rundir.record(config.train.out_dir, "data")  # text files are prepared into out_dir/data, the run's own
    if data is not None:
        pdata = data(config, env)
    elif config.data.synthetic:
        vocab = config.model.overrides.get("vocab_size") or model_config(config).vocab_size
        pdata = synthetic_data(config, env, vocab)
    else:
        pdata = prepared_data(config, env)
    mcfg = model_config(config, **pdata.model_overrides)
    check_fits(mcfg, where="model: ")
    seed_everything(config.train.seed)  # the same initial weights on every process
    model = build(mcfg)
    if config.model.init_from:
        init_weights(model, config.model.init_from)
    else:
        set_untrained(model, UNTRAINED_BY_OBJECTIVE.get(config.train.objective, ()))
    n_params = count_params(model)
    if env.is_main:
        t = config.train
        print(f"lmforge pretrain: {family_of(mcfg)} {config.model.preset or ''} {n_params:,} parameters "
              f"({count_params(model, positions=False):,} without positions), objective {t.objective}, "
              f"global batch {t.micro_batch_size * t.grad_accum * env.world_size} x {config.data.seq_len} "
              f"tokens, {env.world_size} process(es), dist {config.dist.strategy}, out {t.out_dir}")
        print(plan_summary(mcfg, config, env))
    result = train(model, get_objective(config.train.objective), pdata.train, config, val_batches=pdata.val,
                   save_extra=pdata.save_extra)
    if result.stopped != "interrupted":
        # Every process holds the whole trained model (gathered under FSDP2); rank 0 writes it,
        # the others wait, so that no process leaves before the model is on disk.
        failure = None
        if env.is_main:
            rundir.record(result.out_dir, "model")
            try:
                export_dir = export(result.model, pdata.tokenizer, Path(result.out_dir) / "model")
                print(f"lmforge pretrain: final model in {export_dir}")
            except Exception as e:  # noqa: BLE001 (the other processes learn of it below)
                failure = e
        parallel.raise_if_failed(failure, "exporting the final model")
    return {"step": result.step, "tokens": result.tokens, "stopped": result.stopped,
            "train_loss": result.train_loss, **result.val, "best": result.best,
            "checkpoint": str(result.checkpoint) if result.checkpoint else None,
            "out_dir": str(result.out_dir), "params": n_params}

