"""`lmforge plan`: a verified resource planner for any lmforge model.

    make_plan(model, seq_len=..., batch_size=..., ...) -> Plan   parameters, FLOPs,
        memory per device (weights, gradients, optimizer states, activations by layer,
        loss buffers, KV cache), step time, tokens/s, Chinchilla budget, largest micro-batch
    format_plan(plan) -> str                                     the plain-text table
    verify_plan(plan, steps) -> dict                             real steps: predicted vs measured
"""

from lmforge.plan.arch import describe
from lmforge.plan.core import Plan, engine_chunk_rows, make_plan

__all__ = ["Plan", "describe", "engine_chunk_rows", "make_plan"]
