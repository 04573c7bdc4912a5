"""The optimizer over the trainable parameters (AdamW, or Muon for the blocks' matrices), and
the learning-rate schedule.

Weight decay pulls weights toward zero; it is meant for the matrices that mix features
(attention and MLP projections, embeddings and the tied LM head), not for the gains
and biases of norms and linear layers, whose scale is the point. The rule is by shape:
every parameter with 2 or more dimensions is decayed (embeddings included, as in GPT-2
and nanoGPT), every vector is not.

optim.optimizer=muon (lmforge.train.muon) moves the 2-D weights of the linear layers inside
the Transformer blocks (a `blocks` component in the parameter's name) to Muon, with its own
lr (optim.muon_lr), momentum and weight decay; embeddings, the LM head and every vector stay
with AdamW as above.

Schedules after the linear warmup: cosine, linear or constant, decaying over all the
remaining steps; or warmup-stable-decay (wsd, "trapezoidal"): the peak lr until the last
optim.decay_fraction of the steps, then a linear decay to the floor. WSD's stable phase does
not depend on the run's length, so a run can be extended, or branched into a decay, late.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from lmforge.config import OptimConfig
from lmforge.train.muon import Muon


def param_groups(model: nn.Module, weight_decay: float, exclude: frozenset[int] = frozenset()) -> list[dict]:
    """Two AdamW groups: matrices (decayed) and vectors (not). Frozen parameters
    (requires_grad False: fine-tuning, LoRA) are left out, and those whose id() is in
    `exclude` (another optimizer's); a tied parameter appears once."""
    decay, no_decay = [], []
    for p in model.parameters():  # parameters() yields each shared tensor once
        if p.requires_grad and id(p) not in exclude:
            (decay if p.ndim >= 2 else no_decay).append(p)
    if not decay and not no_decay and not exclude:
        raise ValueError("the model has no trainable parameters (all have requires_grad=False)")
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def muon_param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Muon's groups (the blocks' linear weights; the fused query/key/value projections with
    their split) and AdamW's (param_groups of the rest), each with every key Muon reads."""
    fused, plain, seen = [], [], set()
    splits: dict[int, tuple[int, ...]] = {}
    for name, module in model.named_modules():
        if "blocks" not in name.split(".") or not isinstance(module, nn.Linear):
            continue
        if not module.weight.requires_grad or id(module.weight) in seen:
            continue
        seen.add(id(module.weight))
        attn = _attention_of(model, name)
        if name.endswith((".wqkv", ".wkv")) and attn is not None:  # rows: queries, keys, values / keys, values
            q, kv = attn.n_heads * attn.head_dim, attn.n_kv_heads * attn.head_dim
            splits[id(module.weight)] = (q, kv, kv) if name.endswith(".wqkv") else (kv, kv)
            fused.append(module.weight)
        else:
            plain.append(module.weight)
    muon = dict(lr=cfg.muon_lr, weight_decay=cfg.muon_weight_decay, momentum=cfg.muon_momentum, use_muon=True,
                split=None)
    groups = [{**muon, "params": plain}]
    for split in sorted(set(splits.values())):
        groups.append({**muon, "params": [p for p in fused if splits[id(p)] == split], "split": split})
    adam = [{**g, "lr": cfg.lr, "use_muon": False} for g in param_groups(model, cfg.weight_decay, frozenset(seen))
            if g["params"]]
    return adam + [g for g in groups if g["params"]]  # AdamW's first: the lr the loop logs stays optim.lr


def _attention_of(model: nn.Module, linear_name: str) -> nn.Module | None:
    """The attention module holding the linear layer `linear_name` (its head counts), or None."""
    parent = model.get_submodule(linear_name.rsplit(".", 1)[0])
    return parent if hasattr(parent, "n_kv_heads") and hasattr(parent, "head_dim") else None


def fused_available(model: nn.Module) -> bool:
    """Fused AdamW kernels exist for CUDA and CPU floating-point parameters."""
    return all(p.device.type in ("cuda", "cpu") and p.is_floating_point() for p in model.parameters())


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW with cfg's hyperparameters; fused when cfg.fused (None: when available), else foreach.
    optim.optimizer=muon: Muon for the blocks' matrices, AdamW for the rest (muon_param_groups)."""
    if cfg.optimizer == "muon":
        if any(hasattr(p, "device_mesh") for p in model.parameters()):  # an FSDP2 shard: a DTensor
            raise ValueError("optim.optimizer=muon needs whole matrices for Newton-Schulz; dist.strategy=fsdp "
                             "shards them: use dist.strategy=ddp")
        groups = muon_param_groups(model, cfg)
        return Muon(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    fused = fused_available(model) if cfg.fused is None else cfg.fused
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                             fused=fused or None, foreach=None if fused else True)


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, schedule: str, min_lr_ratio: float,
              decay_fraction: float = 0.2) -> float:
    """Multiplier of the peak lr for the update with 0-based index `step`.

    Linear warmup (step + 1) / warmup_steps, so the first update already moves; then
    decay from 1 to min_lr_ratio over the remaining steps: cosine, linear or constant (1);
    or wsd: 1 until the last decay_fraction of total_steps, then linear to min_lr_ratio.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "wsd":
        decay_steps = max(1, round(decay_fraction * total_steps))
        decay_start = max(warmup_steps, total_steps - decay_steps)
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start + 1) / max(1, total_steps - decay_start))
        return 1.0 - (1.0 - min_lr_ratio) * progress
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps - 1))
    if schedule == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif schedule == "linear":
        decay = 1.0 - progress
    else:
        raise ValueError(f"optim.schedule must be cosine, linear, constant or wsd, got {schedule!r}")
    return min_lr_ratio + (1.0 - min_lr_ratio) * decay


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int) -> LambdaLR:
    """LambdaLR over `lr_factor`; step it once after every optimizer step. A partial (not a
    lambda) so that the scheduler's state_dict round-trips."""
    factor = functools.partial(lr_factor, warmup_steps=cfg.warmup_steps, total_steps=total_steps,
                               schedule=cfg.schedule, min_lr_ratio=cfg.min_lr_ratio,
                               decay_fraction=cfg.decay_fraction)
    return LambdaLR(optimizer, factor)
