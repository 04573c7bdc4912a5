"""Training memory per device: the persistent state, and a replay of one optimizer step
that finds the moment of peak tensor memory.

Persistent (between steps): fp32 weights (lmforge keeps fp32 parameters under bf16 and
fp16 autocast: autocast casts per op, so there are no separate master weights), fp32
gradients of the trainable parameters while they exist, optimizer states (AdamW: two
fp32 moments; SGD with momentum: one), non-persistent buffers (RoPE / sinusoidal tables,
BART's logit bias) and the batch.

The step replay visits the moments where memory can peak:
- end of forward: everything autograd saved (trace.py) plus the loss head's working
  set (`head_transients`) and, under autocast with activation checkpointing, the cached
  low-precision weight copies;
- start of backward (the loss head): the saved activations plus the head's gradients;
- each block's backward, in reverse: activations not yet freed, gradients produced so
  far, the block's own gradients and working buffers (with activation checkpointing,
  the recomputed block's activations);
- each embedding's backward: with a tied embedding, its dense gradient exists beside the
  LM head's buffered contribution and sometimes their sum (`tied_sum_extra`): one or two
  V x D fp32 tensors beyond the gradients — the peak of small batches;
- the optimizer step (fused AdamW / SGD: no temporaries beyond the states).
With gradient accumulation, micro-batches after the first run with every gradient alive.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lmforge.models.arch import Arch
from lmforge.plan.dataflow import Shape
from lmforge.plan.trace import FP32, INT64, Segment

#: Parameter groups outside the blocks whose gradients the loss head produces.
HEAD_GROUPS = ("norm_f", "lm_head", "mlm_head", "pooler", "nsp_head", "decoder.norm_f")


@dataclass(frozen=True)
class MemorySettings:
    """What changes the memory model beyond the dataflow (see `make_plan`)."""

    lowp: int | None  # bytes of the autocast dtype, None for fp32
    activation_checkpointing: bool
    ce_chunk: int  # rows per cross-entropy chunk; 0: unchunked
    grad_accum: int
    lora_per_block: dict[str, int] | None = None  # adapter parameters per block, by stack; None: full training


@dataclass
class Memory:
    """Bytes per device. `components` are the sizes of each kind of memory; `at_peak`
    what is alive at the predicted peak, which happens at `peak_moment`."""

    components: dict[str, int]
    at_peak: dict[str, int]
    peak: int
    peak_moment: str
    activations_per_block: dict[str, dict[str, int]] = field(default_factory=dict)


def optimizer_state_bytes(optimizer: str, trainable: int) -> int:
    """AdamW: exp_avg and exp_avg_sq (fp32); SGD (momentum 0.9): one momentum buffer."""
    return {"adamw": 2, "sgd": 1}[optimizer] * FP32 * trainable


def buffer_bytes(arch: Arch) -> int:
    """Non-parameter tensors the model holds: rotary cos/sin, sinusoidal tables, logit bias."""
    c = arch.config
    if arch.family == "gpt":
        if c.positions == "rope":
            return 2 * c.max_seq_len * c.head_dim * FP32
        return c.max_seq_len * c.dim * FP32 if c.positions == "sinusoidal" else 0
    if arch.family == "encdec":
        tables = 2 * c.max_seq_len * c.dim * FP32 if c.positions == "sinusoidal" else 0
        return tables + arch.padded_vocab * FP32
    return c.max_seq_len * c.dim * FP32 if getattr(c, "positions", None) == "sinusoidal" else 0


def batch_bytes(arch: Arch, shape: Shape) -> int:
    """int64 inputs and targets of one micro-batch."""
    B, T = shape.batch, shape.seq_len
    if arch.family == "gpt":
        return 2 * B * T * INT64
    if arch.family == "bert":
        return (B * T + 2 * B * shape.mlm_rows + (B if arch.config.nsp else 0)) * INT64
    return (B * T + 2 * B * shape.target_len) * INT64


def head_rows(arch: Arch, shape: Shape) -> int:
    """Positions the LM head scores: every target token, or Bert's masked positions."""
    B = shape.batch
    if arch.encoder_decoder:
        return B * shape.target_len
    return B * (shape.mlm_rows if arch.family == "bert" else shape.seq_len)


def head_transients(arch: Arch, shape: Shape, s: MemorySettings) -> tuple[int, int]:
    """Extra bytes the loss head holds beyond saved tensors: (during forward, start of backward).

    Chunked `linear_cross_entropy`, per chunk of n rows: the fp32 logits, `logits - lse`
    and its exp (the softmax, turned into the logits' gradient in place), and the previous
    chunk's gradient: 4 x n x V fp32; or, while the weight gradient is accumulated,
    logits, gradient, the product and (under autocast) its low-precision inputs. Backward
    scales the two saved gradients (new rows x D and V x D tensors). Unchunked: the logits
    (padded vocabulary) beside the log-softmax in forward; in backward the log-softmax's
    gradient chain (two more rows x V fp32) or the LM head's weight gradient beside the
    logits' gradient.
    """
    rows, D, V, Vp = head_rows(arch, shape), arch.dim, arch.vocab_size, arch.padded_vocab
    need_w = s.lora_per_block is None
    lowp = s.lowp or 0
    if arch.family != "bert" and s.ce_chunk:
        n = min(s.ce_chunk, rows)
        logits = n * V * FP32
        first = V * D * lowp + n * V * lowp + (n * V * lowp if arch.family == "encdec" else 0) + logits
        grad_w = 2 * logits + n * V * lowp + V * D * (FP32 + lowp) if need_w else 0
        # From the second chunk on, the previous chunk's logits and gradient stay bound to
        # their Python names until reassigned. And the hidden states, the loss's input, are
        # alive though nothing saves them.
        prev = 2 * logits if rows > n else 0
        fwd = max(first + prev, 3 * logits + prev // 2, grad_w) + rows * D * FP32
        return fwd, rows * D * FP32 + (V * D * FP32 if need_w else 0)
    E = Vp * D * FP32 if need_w else 0
    it = lowp or FP32
    fwd = rows * Vp * it + (rows * V * FP32 if lowp else 0)
    bwd = max(2 * rows * V * FP32, rows * Vp * it + E + (Vp * D * lowp if E else 0))
    return fwd, bwd


def tied_sum_extra(arch: Arch, s: MemorySettings) -> int:
    """How many V x D fp32 tensors beyond the finished gradients a tied embedding's backward
    holds: its dense gradient, plus the out-of-place sum with the LM head's buffered
    contribution when that is a transposed view (an fp32 nn.Linear / matmul head; the
    chunked loss's and autocast's contributions are fresh tensors, summed in place)."""
    transposed = s.lowp is None and (arch.family == "bert" or not s.ce_chunk)
    return 2 if transposed else 1


def _stack_of(arch: Arch, seg: Segment):
    parts = seg.name.split(".")
    if len(parts) != 2 or not parts[1].isdigit():
        return None
    return next(st for st in arch.stacks if st.name == parts[0])


def _tokens(st, shape: Shape) -> int:
    return shape.batch * (shape.target_len if st.cross else shape.seq_len)


def block_working(arch: Arch, st, shape: Shape) -> int:
    """Gradient buffers alive inside one block's backward beyond its saved tensors: the
    residual stream's gradient in and out and one gradient of the widest intermediate
    (saved tensors are released as their nodes run, so more never coexist; measured
    block peaks sit 0.7-0.9x below this on CPU)."""
    widest = max(lin.d_out for lin in st.linears()) * (2 if st.spec.mlp in ("swiglu", "gated") else 1)
    return FP32 * _tokens(st, shape) * (2 * arch.dim + widest)


def segment_saved(arch: Arch, segs: list[Segment], shape: Shape, ac: bool) -> list[int]:
    """Bytes each segment keeps for backward; a checkpointed block keeps its fp32 input
    (and a decoder block the encoder output, once for all of them)."""
    out = []
    memory_kept = False
    for seg in segs:
        st = _stack_of(arch, seg)
        if st is None or not ac:
            out.append(seg.saved_bytes)
            continue
        kept = _tokens(st, shape) * arch.dim * FP32
        if st.cross and not memory_kept:
            kept += shape.batch * shape.seq_len * arch.dim * FP32
            memory_kept = True
        out.append(kept)
    return out


def segment_grads(arch: Arch, segs: list[Segment], s: MemorySettings) -> list[int]:
    """Gradient bytes each segment's backward turns into .grad: blocks their parameters
    (or adapters), the head its own layers; embeddings and their norms land at the first
    segment, whose backward runs last."""
    head = sum(n for k, n in arch.extra.items() if k in HEAD_GROUPS)
    rest = sum(arch.extra.values()) - head
    out = []
    for i, seg in enumerate(segs):
        st = _stack_of(arch, seg)
        if s.lora_per_block is not None:
            out.append(FP32 * s.lora_per_block.get(st.name, 0) if st else 0)
        elif st is not None:
            out.append(FP32 * st.block_params())
        else:
            out.append(FP32 * (head if seg.name == "head" else rest if i == 0 else 0))
    return out


def replay(arch: Arch, segs: list[Segment], shape: Shape, s: MemorySettings, persistent: int,
           grads_total: int, shard: int) -> tuple[int, str, dict[str, int]]:
    """Walk one micro-batch's forward end and backward; return (peak, moment, what is alive).

    `persistent` excludes gradients; `grads_total` are the per-device gradients; block
    gradients are divided by `shard` (FSDP reduce-scatters them as each block finishes).
    """
    ac = s.activation_checkpointing
    saved = segment_saved(arch, segs, shape, ac)
    seg_grads = [g // shard for g in segment_grads(arch, segs, s)]
    head_fwd, head_bwd = head_transients(arch, shape, s)
    tied = arch.tied_head and s.lora_per_block is None
    E = arch.padded_vocab * arch.dim * FP32
    accumulating = s.grad_accum > 1  # later micro-batches find every gradient alive
    g_prev = grads_total if accumulating else 0
    moments: list[tuple[int, str, dict[str, int]]] = []

    def add(label: str, **parts: int) -> None:
        moments.append((persistent + g_prev + sum(parts.values()), label, parts))

    A = sum(saved)
    cache = sum(seg.saved.get("autocast weight copies", 0) for seg in segs if _stack_of(arch, seg)) if ac else 0
    add("end of forward", activations=A, loss_buffers=head_fwd, autocast_weight_cache=cache)
    add("backward: loss head", activations=A, loss_buffers=head_bwd)
    a_left, g_so_far = A - saved[-1], (0 if accumulating else seg_grads[-1])
    buffer = E if tied else 0  # the LM head's contribution to the tied embedding's gradient
    for i in range(len(segs) - 2, -1, -1):
        seg, st = segs[i], _stack_of(arch, segs[i])
        if st is not None:  # its start (recomputed under checkpointing) and its end
            recompute = seg.saved_bytes if ac else 0
            work = block_working(arch, st, shape)
            add(f"backward: {seg.name}", activations=a_left + recompute, gradients=g_so_far,
                tied_grad_buffer=buffer, working=work)
            add(f"backward: {seg.name}", activations=a_left - saved[i], gradients=g_so_far + seg_grads[i],
                tied_grad_buffer=buffer, working=work)
        elif seg.name.endswith("embed") and tied:
            extra = tied_sum_extra(arch, s) + (1 if accumulating and i == 0 else 0)
            add(f"backward: {seg.name}", activations=a_left, gradients=g_so_far, tied_grad_buffer=buffer,
                embedding_grad=E * extra)
        a_left -= saved[i]
        g_so_far += 0 if accumulating else seg_grads[i]
    add("optimizer step", gradients=grads_total - g_prev)
    peak, label, parts = max(moments, key=lambda m: m[0])
    return peak, label, parts
