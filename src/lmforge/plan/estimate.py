"""The arithmetic of a plan: segments -> parameters, FLOPs, memory per device, time."""

from __future__ import annotations

from typing import Any

from lmforge.hardware import GiB
from lmforge.models.arch import Arch, lora_params
from lmforge.models.flops import encdec_flops_per_sequence, flops_per_token
from lmforge.plan.calibrate import step_parts
from lmforge.plan.dataflow import Shape, walk
from lmforge.plan.device import Device
from lmforge.plan.memory import (
    MemorySettings,
    batch_bytes,
    buffer_bytes,
    head_rows,
    head_transients,
    optimizer_state_bytes,
    replay,
)
from lmforge.plan.trace import FP32, Segment, Walk, WalkOptions

PRECISIONS = {"fp32": None, "bf16": 2, "fp16": 2}
CHINCHILLA_TOKENS_PER_PARAM = 20
CUDA_CONTEXT = GiB // 2  # CUDA context and cuBLAS workspaces, outside the allocator's count
ALLOCATOR_SLACK = 1.05  # caching-allocator fragmentation on top of the tensor peak


def make_shape(arch: Arch, s: dict[str, Any], batch: int | None = None) -> Shape:
    """The micro-batch of settings `s` (or of `batch` sequences)."""
    mlm_rows = max(1, round(s["mlm_fraction"] * s["seq_len"]))
    return Shape(batch or s["batch_size"], s["seq_len"], s["target_len"], mlm_rows)


def segments(arch: Arch, shape: Shape, s: dict[str, Any], backend: str) -> list[Segment]:
    """One micro-batch's forward pass, walked symbolically (trace.py, dataflow.py)."""
    opts = WalkOptions(shape.batch, PRECISIONS[s["precision"]], backend, s["lora_rank"] == 0,
                       s["lora_rank"], tuple(s["lora_targets"]))
    return walk(arch, Walk(opts), shape, s["ce_chunk"])


def parameters(arch: Arch, s: dict[str, Any]) -> dict[str, int]:
    """Exact counts (equal to `count_params` of the built model, adapters included)."""
    lora = lora_params(arch, s["lora_rank"], tuple(s["lora_targets"]))
    total = arch.total_params + lora
    return {
        "total": total,
        "trainable": lora if s["lora_rank"] else total,
        "embedding": arch.embedding_params,
        "non_embedding": total - arch.embedding_params,
        "without_positions": total - arch.position_params,
        "lora_adapters": lora,
    }


def memory_per_device(arch: Arch, shape: Shape, s: dict[str, Any], backend: str,
           segs: list[Segment] | None = None) -> dict[str, Any]:
    """Per-device memory: component sizes, the replayed peak and what is alive at it."""
    segs = segs if segs is not None else segments(arch, shape, s, backend)
    p = parameters(arch, s)
    d, lora = s["devices"], s["lora_rank"] > 0
    shard = d if s["strategy"] == "fsdp" and d > 1 else 1
    comp = {
        "weights": p["total"] * FP32 // shard,
        "gradients": p["trainable"] * FP32 // shard,
        "optimizer_states": optimizer_state_bytes(s["optimizer"], p["trainable"]) // shard,
        "buffers": buffer_bytes(arch),
        "batch": batch_bytes(arch, shape),
    }
    if shard > 1:  # all-gathered blocks (current + prefetched), the unsharded root, one block's full gradients
        biggest = max(st.block_params() for st in arch.stacks)
        comp["fsdp_unsharded"] = (2 * biggest + sum(arch.extra.values()) + (0 if lora else biggest)) * FP32
    elif d > 1:  # DDP's gradient buckets: a second copy of the gradients
        comp["ddp_buckets"] = comp["gradients"]
    per_block = None
    if lora:
        per_block = {st.name: lora_params(_one_stack(arch, st), s["lora_rank"], tuple(s["lora_targets"]))
                     // st.n_layers for st in arch.stacks}
    ms = MemorySettings(PRECISIONS[s["precision"]], s["activation_checkpointing"], s["ce_chunk"], s["grad_accum"],
                        per_block)
    persistent = sum(v for k, v in comp.items() if k != "gradients")
    peak, moment, parts = replay(arch, segs, shape, ms, persistent, comp["gradients"], shard)
    comp["activations_saved"] = sum(seg.saved_bytes for seg in segs)
    comp["loss_buffers_forward"], comp["loss_buffers_backward"] = head_transients(arch, shape, ms)
    blocks = {}
    for seg in segs:
        stack = seg.name.split(".")[0]
        if seg.name.endswith(".0") and stack in {st.name for st in arch.stacks}:
            blocks[stack] = dict(seg.saved, total=seg.saved_bytes)
    at_peak = {"weights": comp["weights"], "optimizer_states": comp["optimizer_states"],
               "buffers_and_batch": comp["buffers"] + comp["batch"]}
    for k in ("fsdp_unsharded", "ddp_buckets"):
        if k in comp:
            at_peak[k] = comp[k]
    if s["grad_accum"] > 1:
        at_peak["gradients"] = comp["gradients"]
    for k, v in parts.items():
        at_peak[k] = at_peak.get(k, 0) + v
    return {"components": comp, "peak": peak, "peak_moment": moment, "at_peak": at_peak,
            "activations_per_block": blocks}


def _one_stack(arch: Arch, st) -> Arch:
    return Arch(arch.family, arch.config, (st,), arch.dim, arch.vocab_size, arch.padded_vocab)


def reserved(peak: int, kind: str) -> int:
    """What the device must hold for a tensor peak: on CUDA, allocator slack and the context."""
    return int(peak * ALLOCATOR_SLACK) + CUDA_CONTEXT if kind == "cuda" else peak


def max_micro_batch(arch: Arch, s: dict[str, Any], device: Device, limit: int = 1 << 16) -> int:
    """Largest micro-batch whose predicted peak fits the device's memory (0 if none).
    Binary search: the predicted peak grows with the batch size."""
    def fits(b: int) -> bool:
        peak = memory_per_device(arch, make_shape(arch, s, b), s, device.kind)["peak"]
        return reserved(peak, device.kind) <= device.memory

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def gemm_shapes(arch: Arch, shape: Shape) -> list[tuple[int, int, int]]:
    """Distinct (tokens, in, out) matmuls of a micro-batch, for measuring a device on them."""
    out = {(shape.batch * (shape.target_len if st.cross else shape.seq_len), lin.d_in, lin.d_out)
           for st, lin in arch.linears()}
    out.add((head_rows(arch, shape), arch.dim, arch.padded_vocab))
    return sorted(out)


def tokens_per_micro_batch(arch: Arch, shape: Shape) -> int:
    """Tokens a micro-batch feeds the model (source + target for encoder-decoder)."""
    return shape.batch * (shape.seq_len + (shape.target_len if arch.encoder_decoder else 0))


def formula(arch: Arch, shape: Shape, n_no_pos: int) -> tuple[str, int, int]:
    """The textbook FLOPs of one micro-batch: (formula, training, inference forward)."""
    c, B = arch.config, shape.batch
    if arch.encoder_decoder:
        enc, dec = arch.stacks
        S, T, H, Q = shape.seq_len, shape.target_len, c.n_heads, c.head_dim
        n_enc = enc.n_layers * enc.block_params()
        n_dec = dec.n_layers * dec.block_params() + arch.extra.get("lm_head", arch.extra["tok_emb"])
        text = ("B * [6 * (N_enc * S + N_dec * T) + 12 * H * Q * (L_enc * S^2 + L_dec * (T^2 + T * S))] "
                "(N_dec with the LM head; inference: 2 and 4 for 6 and 12)")
        train = encdec_flops_per_sequence(n_enc, n_dec, H, Q, enc.n_layers, dec.n_layers, S, T)
        return text, round(B * train), round(B * train / 3)  # inference: the forward third
    st = arch.stacks[0]
    T, L, H, Q = shape.seq_len, st.n_layers, st.spec.n_heads, st.spec.head_dim
    text = ("6 * N + 12 * L * H * Q * T per token (N without position embeddings); "
            "inference 2 * N + 4 * L * H * Q * T")
    train = flops_per_token(n_no_pos, L, H, Q, T)
    return text, round(B * T * train), round(B * T * train / 3)


def flops(arch: Arch, shape: Shape, s: dict[str, Any], segs: list[Segment]) -> dict[str, Any]:
    """Exact matmul FLOPs of one micro-batch from the walk, and the textbook formula."""
    fwd = sum(seg.fwd_flops for seg in segs)
    bwd = sum(seg.bwd_flops for seg in segs)
    recompute = sum(seg.recompute_flops for seg in segs)
    if s["activation_checkpointing"]:
        recompute += sum(seg.fwd_flops for seg in segs if seg.name.split(".")[-1].isdigit())
    tokens = tokens_per_micro_batch(arch, shape)
    text, f_train, f_infer = formula(arch, shape, parameters(arch, s)["without_positions"])
    accum = s["grad_accum"]
    return {
        "formula": text,
        "formula_per_token": f_train / tokens,
        "formula_inference_per_token": f_infer / tokens,
        "matmul_forward_per_micro_batch": fwd,
        "matmul_backward_per_micro_batch": bwd,
        "attention_forward_per_micro_batch": sum(seg.attn_fwd_flops for seg in segs),
        "recompute_per_micro_batch": recompute,
        "model_flops_per_token": (fwd + bwd) / tokens,
        "model_flops_per_step": (fwd + bwd) * accum,
        "hardware_flops_per_step": (fwd + bwd + recompute) * accum,
        "tokens_per_micro_batch": tokens,
    }


def measured_step_seconds(arch: Arch, shape: Shape, s: dict[str, Any], kind: str,
                          clock: str = "wall") -> tuple[float, dict]:
    """A step composed from its parts timed on this machine now (calibrate.py):
    grad_accum x (blocks + loss head and embedding) + optimizer update (sharded by FSDP)."""
    trainable = parameters(arch, s)["trainable"] // (s["devices"] if s["strategy"] == "fsdp" else 1)
    parts = step_parts(arch, shape, s["precision"], s["ce_chunk"], s["optimizer"], trainable,
                       s["activation_checkpointing"], kind, clock)
    return s["grad_accum"] * (parts["blocks"] + parts["head"]) + parts["optimizer"], parts


def step_time(arch: Arch, shape: Shape, s: dict[str, Any], device: Device, fl: dict[str, Any]) -> dict:
    """Seconds per optimizer step on each device (data parallel: devices run in parallel,
    gradient communication assumed overlapped with backward).

    Named devices: hardware FLOPs / (peak x MFU). Measured devices: the parts of a step
    timed on this machine (calibrate.py), composed: grad_accum x (blocks + loss head and
    embedding) + optimizer update (divided by the devices under FSDP)."""
    peak = device.peak.get(s["precision"]) or next(iter(device.peak.values()))
    if device.mfu is not None:
        seconds = fl["hardware_flops_per_step"] / (peak * device.mfu)
        how = f"hardware FLOPs / ({peak / 1e12:.1f} TFLOP/s peak x MFU {device.mfu})"
    else:
        seconds, parts = measured_step_seconds(arch, shape, s, device.kind)
        how = (f"parts timed here: blocks {parts['blocks']:.3f} s + loss head and embedding {parts['head']:.3f} s "
               f"per micro-batch, optimizer {parts['optimizer']:.3f} s; matmul peak {peak / 1e9:.1f} GFLOP/s")
    tokens = fl["tokens_per_micro_batch"] * s["grad_accum"] * s["devices"]
    chinchilla = CHINCHILLA_TOKENS_PER_PARAM * parameters(arch, s)["total"]
    return {
        "step_seconds": seconds,
        "tokens_per_step": tokens,
        "tokens_per_second": tokens / seconds,
        "mfu": fl["model_flops_per_step"] / seconds / peak,
        "peak_flops": peak,
        "model": how,
        "chinchilla_tokens": chinchilla,
        "chinchilla_seconds": chinchilla / (tokens / seconds),
    }


def communication(arch: Arch, s: dict[str, Any]) -> dict[str, Any]:
    """Bytes of data-parallel communication per optimizer step, as lmforge's dist/ runs it.

    DDP all-reduces the fp32 gradients of the trainable parameters once per step (no_sync
    on the micro-batches before the last). FSDP2 all-gathers each block's parameters before
    its forward and again before its backward (reshard_after_forward), and the root's
    (embeddings, final norm, heads) likewise, on every micro-batch, in the training
    precision (bf16/fp16 gathers: dist.mixed_precision); it reduce-scatters the fp32
    gradients once per step. `payload`: the tensors' bytes per collective kind; `sent`:
    what each device sends in a ring (an all-reduce 2(d-1)/d of its payload, an all-gather
    or reduce-scatter (d-1)/d). The loss, token-count and gradient-norm reductions (a few
    scalars per step) are left out."""
    d, accum = s["devices"], s["grad_accum"]
    if d <= 1:
        return {"payload": {}, "sent_per_device": 0, "ring_factor": 0.0}
    p = parameters(arch, s)
    grads = p["trainable"] * FP32
    if s["strategy"] == "ddp":
        payload = {"all_reduce": grads}
        sent = 2 * (d - 1) / d * grads
    else:
        gathered = 2 * p["total"] * (PRECISIONS[s["precision"]] or FP32) * accum  # forward + backward
        payload = {"all_gather": gathered, "reduce_scatter": grads}
        sent = (d - 1) / d * (gathered + grads)
    return {"payload": payload, "sent_per_device": int(sent), "ring_factor": (d - 1) / d}


def kv_cache(arch: Arch, shape: Shape, s: dict[str, Any]) -> dict[str, int]:
    """Generation memory for a batch of `batch_size` sequences: the preallocated KV cache
    (batch, n_kv_heads, max length, head_dim per layer, for keys and values) in the
    compute dtype, plus cross-attention keys/values for encoder-decoders."""
    it = PRECISIONS[s["precision"]] or FP32
    B = shape.batch
    if arch.family == "bert":
        return {"kv_cache": 0, "inference_weights": arch.total_params * it}
    if arch.family == "gpt":
        st = arch.stacks[0]
        kv = 2 * st.n_layers * B * st.spec.n_kv_heads * shape.seq_len * st.spec.head_dim * it
        return {"kv_cache": kv, "max_len": shape.seq_len, "inference_weights": arch.total_params * it}
    dec = arch.stacks[1]
    inner = dec.spec.n_heads * dec.spec.head_dim  # the model width, but in T5
    kv = 2 * dec.n_layers * B * inner * (shape.target_len + shape.seq_len) * it
    return {"kv_cache": kv, "max_len": shape.target_len, "inference_weights": arch.total_params * it}
