"""`lmforge plan`: a verified resource planner for any lmforge model.

    make_plan(model, seq_len=..., batch_size=..., ...) -> Plan   parameters, FLOPs,
        memory per device (weights, gradients, optimizer states, activations by layer,
        loss buffers, KV cache), step time, tokens/s, Chinchilla budget, largest micro-batch
    format_plan(plan) -> str, plan_json(plan) -> str              the table, the JSON
    verify_plan(plan, steps) -> dict                             real steps: predicted vs measured
    format_verify(result) -> str, verify_json(result) -> str
"""

from lmforge.plan.arch import describe
from lmforge.plan.core import Plan, engine_chunk_rows, make_plan
from lmforge.plan.report import format_plan, format_verify, plan_json, verify_json
from lmforge.plan.verify import verify_plan

__all__ = ["Plan", "describe", "engine_chunk_rows", "format_plan", "format_verify", "make_plan", "plan_json",
           "verify_json", "verify_plan"]
