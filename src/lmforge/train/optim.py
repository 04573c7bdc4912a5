"""AdamW over the trainable parameters, and the learning-rate schedule.

Weight decay pulls weights toward zero; it is meant for the matrices that mix features
(attention and MLP projections, embeddings and the tied LM head), not for the gains
and biases of norms and linear layers, whose scale is the point. The rule is by shape:
every parameter with 2 or more dimensions is decayed (embeddings included, as in GPT-2
and nanoGPT), every vector is not.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from lmforge.config import OptimConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: matrices (decayed) and vectors (not). Frozen parameters
    (requires_grad False: fine-tuning, LoRA) are left out; a tied parameter appears once."""
    decay, no_decay = [], []
    for p in model.parameters():  # parameters() yields each shared tensor once
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters (all have requires_grad=False)")
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def fused_available(model: nn.Module) -> bool:
    """Fused AdamW kernels exist for CUDA and CPU floating-point parameters."""
    return all(p.device.type in ("cuda", "cpu") and p.is_floating_point() for p in model.parameters())


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW with cfg's hyperparameters; fused when cfg.fused (None: when available), else foreach."""
    fused = fused_available(model) if cfg.fused is None else cfg.fused
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                             fused=fused or None, foreach=None if fused else True)


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, schedule: str, min_lr_ratio: float) -> float:
    """Multiplier of the peak lr for the update with 0-based index `step`.

    Linear warmup (step + 1) / warmup_steps, so the first update already moves; then
    decay from 1 to min_lr_ratio over the remaining steps: cosine, linear or constant (1).
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps - 1))
    if schedule == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif schedule == "linear":
        decay = 1.0 - progress
    else:
        raise ValueError(f"optim.schedule must be cosine, linear or constant, got {schedule!r}")
    return min_lr_ratio + (1.0 - min_lr_ratio) * decay


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int) -> LambdaLR:
    """LambdaLR over `lr_factor`; step it once after every optimizer step. A partial (not a
    lambda) so that the scheduler's state_dict round-trips."""
    factor = functools.partial(lr_factor, warmup_steps=cfg.warmup_steps, total_steps=total_steps,
                               schedule=cfg.schedule, min_lr_ratio=cfg.min_lr_ratio)
    return LambdaLR(optimizer, factor)
