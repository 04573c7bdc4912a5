"""`verify_plan`: run the planned setup for a few real steps and put the measurements
beside the predictions.

The step is the training engine's recipe in plain PyTorch: the model built from the
plan's config, a random batch, the engine's objectives (objective.py) under autocast per
the plan's precision (fp16 with a GradScaler), lmforge.dist's activation checkpointing
per block when planned, `zero_grad(set_to_none=True)`, grad accumulation, and fused AdamW
(or SGD with momentum 0.9). Peak memory and step time are measured as
described in measure.py, on CUDA when the plan's device is a GPU and one is present,
else on CPU. A plan made for a GPU but verified on CPU is re-planned for the CPU
(its kernels differ). LoRA plans run nn.lora's adapters on the frozen model (alpha 16,
no adapter dropout). Multi-device plans are refused: verification runs one device.
"""

from __future__ import annotations

from typing import Any

import torch

from lmforge.dist.parallel import apply_activation_checkpointing
from lmforge.models import build
from lmforge.nn.lora import apply_lora
from lmforge.plan.arch import describe
from lmforge.plan.core import Plan, make_plan
from lmforge.plan.estimate import make_shape, measured_step_seconds
from lmforge.plan.measure import measure_peak, phase, state_tensors, time_steps
from lmforge.plan.objective import loss, random_batch

_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _optimizer(name: str, params, fused: bool) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1, fused=fused)
    return torch.optim.SGD(params, lr=1e-3, momentum=0.9, fused=fused)


def training_step(plan: Plan, device: torch.device):
    """Build the model, optimizer and batch of `plan` on `device`; return (step, state):
    step() runs one optimizer step; state() releases the gradients (as the next step's
    zero_grad would) and lists the tensors a step starts from."""
    s = plan.settings
    arch = describe(plan.config)
    model = build(plan.config).to(device)
    model.train()
    if s["lora_rank"]:  # the fine-tuning recipe: frozen model, trainable adapters
        model.requires_grad_(False)
        apply_lora(model, s["lora_targets"], s["lora_rank"], alpha=16.0)
    if s["activation_checkpointing"]:
        apply_activation_checkpointing(model)
    optimizer = _optimizer(s["optimizer"], [p for p in model.parameters() if p.requires_grad], fused=True)
    batch = random_batch(arch, make_shape(arch, s), device)
    dtype = _AUTOCAST.get(s["precision"])
    scaler = torch.amp.GradScaler(device.type) if s["precision"] == "fp16" else None
    chunk = s["ce_chunk"]

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        for _ in range(s["grad_accum"]):
            autocast = torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)
            with phase("forward"), autocast:
                value = loss(model, arch, batch, chunk) / s["grad_accum"]
            with phase("backward"):
                (scaler.scale(value) if scaler else value).backward()
        with phase("optimizer"):
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()

    def state() -> list[torch.Tensor]:  # what a step starts from: gradients already released
        optimizer.zero_grad(set_to_none=True)
        return state_tensors(model, optimizer, batch.values())

    return step, state


def verify_plan(plan: Plan, steps: int = 3, device: str | None = None, clock: str = "wall") -> dict[str, Any]:
    """Run `steps` timed training steps (after a warm-up) of the plan's setup and return
    predicted beside measured peak memory and step time, with relative errors.

    device: "cuda" or "cpu" (default: CUDA when the plan targets a GPU and one is present).
    clock: "wall", or "process" (CPU seconds of this process, for a shared CPU: run with
    one thread, and the prediction's part timings use the same clock).
    """
    s = plan.settings
    if s["devices"] > 1:
        raise ValueError("verify: runs on one device; plan with --devices 1 to verify")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"verify: steps must be a positive integer, got {steps!r}")
    if clock not in ("wall", "process"):
        raise ValueError(f"verify: clock must be 'wall' or 'process', got {clock!r}")
    kind = device or ("cuda" if plan.device["kind"] == "cuda" and torch.cuda.is_available() else "cpu")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError("verify: device 'cuda' requested but CUDA is not available")
    if kind != s["backend"]:  # other kernels, other device: plan again for where it runs
        plan = make_plan(plan.config, **{**s, "device": "cpu" if kind == "cpu" else "measured", "backend": kind,
                                         "mfu": None})
    dev = torch.device(kind)
    step, state = training_step(plan, dev)
    step()  # warm-up: creates optimizer states, picks kernels
    peak, phases = measure_peak(step, state, dev, steps=1)
    predicted_peak, predicted_time = plan.memory["peak"], plan.time["step_seconds"]
    if plan.device["mfu"] is None:
        # A measured device: alternate real steps with fresh timings of the step's parts, so
        # that both see the same machine (on a shared CPU its speed drifts by several x
        # within minutes); the fastest of each is compared. The prediction still never
        # looks at the real step.
        measured, predicted = [], []
        arch = describe(plan.config)
        for _ in range(steps):
            measured.append(time_steps(step, 1, dev, clock))
            predicted.append(measured_step_seconds(arch, make_shape(arch, s), s, kind, clock)[0])
        seconds, predicted_time = min(measured), min(predicted)
    else:
        seconds = time_steps(step, steps, dev, clock)
    return {
        "model": plan.model,
        "device": plan.device["name"],
        "settings": {k: s[k] for k in ("seq_len", "target_len", "batch_size", "grad_accum", "precision",
                                       "optimizer", "activation_checkpointing", "ce_chunk")},
        "predicted_peak_bytes": predicted_peak,
        "measured_peak_bytes": peak,
        "peak_error": predicted_peak / peak - 1.0,
        "predicted_peak_moment": plan.memory["peak_moment"],
        "measured_phase_peaks": phases,
        "predicted_step_seconds": predicted_time,
        "planned_step_seconds": plan.time["step_seconds"],
        "measured_step_seconds": seconds,
        "time_error": predicted_time / seconds - 1.0,
        "plan": plan,
    }

