"""Plain-text and JSON renderings of a plan and of a verification."""

from __future__ import annotations

import json
from typing import Any

from lmforge.models import ENCODER_DECODERS
from lmforge.plan.core import Plan


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def human_count(n: float, unit: str = "") -> str:
    for scale, suffix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {suffix}{unit}"
    return f"{n:.0f} {unit}".rstrip()


def human_seconds(t: float) -> str:
    for scale, suffix in ((86400 * 365, "years"), (86400, "days"), (3600, "h"), (60, "min")):
        if t >= scale:
            return f"{t / scale:.2f} {suffix}"
    return f"{t:.3f} s"


def _rows(title: str, rows: list[tuple[str, str]]) -> list[str]:
    width = max(len(k) for k, _ in rows)
    return [title, *(f"  {k:<{width}}  {v}" for k, v in rows), ""]


def format_plan(plan: Plan) -> str:
    """The plan as a plain-text table (what `lmforge plan` prints)."""
    s, p, f, m, t = plan.settings, plan.params, plan.flops, plan.memory, plan.time
    setting = (f"seq {s['seq_len']}" + (f" -> target {s['target_len']}" if plan.family in ENCODER_DECODERS else "") +
               f", micro-batch {s['batch_size']} x accum {s['grad_accum']} x {s['devices']} device(s) "
               f"({s['strategy']}), {s['precision']}, {s['optimizer']}"
               + (", activation checkpointing" if s["activation_checkpointing"] else "")
               + (f", LoRA r={s['lora_rank']} on {'/'.join(s['lora_targets'])}" if s["lora_rank"] else "")
               + f", CE chunk {s['ce_chunk'] or 'none'}")
    out = [f"lmforge plan: {plan.model} ({plan.family}) on {plan.device['name']}", f"  {setting}", ""]
    out += _rows("parameters", [
        ("total", f"{p['total']:,}"), ("trainable", f"{p['trainable']:,}"),
        ("embedding / non-embedding", f"{p['embedding']:,} / {p['non_embedding']:,}"),
        ("N for FLOPs (no positions)", f"{p['without_positions']:,}"),
    ])
    out += _rows("FLOPs", [
        ("formula", f["formula"]),
        ("formula, per token", f"{human_count(f['formula_per_token'], 'FLOP')} train, "
                               f"{human_count(f['formula_inference_per_token'], 'FLOP')} inference"),
        ("exact matmul, per token", human_count(f["model_flops_per_token"], "FLOP")),
        ("per step (model / hardware)", f"{human_count(f['model_flops_per_step'], 'FLOP')} / "
                                        f"{human_count(f['hardware_flops_per_step'], 'FLOP')} (with recompute)"),
    ])
    comp = m["components"]
    mem_rows = [(k.replace("_", " "), human_bytes(v)) for k, v in comp.items()]
    for stack, parts in m["activations_per_block"].items():
        mem_rows.append((f"activations per block ({stack})", human_bytes(parts["total"]) + "  (" + ", ".join(
            f"{k} {human_bytes(v)}" for k, v in parts.items() if k != "total") + ")"))
    mem_rows += [("peak (predicted)", f"{human_bytes(m['peak'])} at {m['peak_moment']}"),
                 ("  alive at peak", ", ".join(f"{k.replace('_', ' ')} {human_bytes(v)}"
                                                for k, v in m["at_peak"].items() if v)),
                 ("device needs / has", f"{human_bytes(m['reserved_estimate'])} / {human_bytes(m['device_memory'])}"
                                        f" -> {'fits' if m['fits'] else 'DOES NOT FIT'}"),
                 ("largest micro-batch that fits", str(plan.max_micro_batch))]
    out += _rows("memory per device", mem_rows)
    g = plan.generation
    out += _rows("generation", [("KV cache" + (f" (batch {s['batch_size']}, {g['max_len']} tokens)"
                                               if "max_len" in g else ""), human_bytes(g["kv_cache"])),
                                ("weights in the compute dtype", human_bytes(g["inference_weights"]))])
    out += _rows("time", [
        ("step", f"{human_seconds(t['step_seconds'])}  ({t['model']})"),
        ("tokens/s (all devices)", human_count(t["tokens_per_second"])),
        ("MFU", f"{t['mfu'] * 100:.1f}%"),
        ("Chinchilla tokens (20 x N)",
         f"{human_count(t['chinchilla_tokens'])} -> {human_seconds(t['chinchilla_seconds'])}"),
    ])
    c = plan.communication
    if c.get("payload"):
        kinds = ", ".join(f"{k.replace('_', '-')} {human_bytes(v)}" for k, v in c["payload"].items())
        out += _rows("communication per step", [("sent by each device", f"{human_bytes(c['sent_per_device'])}  "
                                                                         f"({kinds}; ring)")])
    out += ["notes", *(f"  - {n}" for n in plan.notes)]
    if plan.device.get("note"):
        out.append(f"  - {plan.device['note']}")
    return "\n".join(out)


def plan_json(plan: Plan) -> str:
    """The plan as JSON (what `lmforge plan --json` prints)."""
    return json.dumps(plan.to_dict(), indent=2)


def verify_json(result: dict[str, Any]) -> str:
    """A `verify_plan` result as JSON, the plan itself included as a dict."""
    return json.dumps({**result, "plan": result["plan"].to_dict()}, indent=2)


def format_verify(result: dict[str, Any]) -> str:
    """Predicted beside measured, from `verify_plan`."""
    rows = [
        ("peak memory", human_bytes(result["predicted_peak_bytes"]), human_bytes(result["measured_peak_bytes"]),
         f"{result['peak_error'] * 100:+.1f}%"),
        ("step time", human_seconds(result["predicted_step_seconds"]), human_seconds(result["measured_step_seconds"]),
         f"{result['time_error'] * 100:+.1f}%"),
    ]
    lines = [f"verify: {result['model']} on {result['device']}",
             f"  {'':<12} {'predicted':>14} {'measured':>14} {'error':>8}"]
    lines += [f"  {a:<12} {b:>14} {c:>14} {d:>8}" for a, b, c, d in rows]
    lines.append(f"  predicted peak at: {result['predicted_peak_moment']}")
    if result["measured_phase_peaks"]:
        lines.append("  measured peak by phase: " + ", ".join(
            f"{k} {human_bytes(v)}" for k, v in result["measured_phase_peaks"].items()))
    return "\n".join(lines)
