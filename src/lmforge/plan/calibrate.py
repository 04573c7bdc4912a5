"""Timing the parts of a training step on this machine, for the "measured" devices.

A whole step is n_layers copies of a few blocks plus a loss head, an embedding and an
optimizer update. Each part runs here once at the plan's shapes and precision — one block
of each stack (forward and backward, plus a second forward under activation
checkpointing), the chunked cross-entropy (or Bert's MLM + NSP heads), the embedding's
backward, and the fused optimizer update on a flat parameter — and the planner composes
the step from those times. This captures what FLOP counts cannot on a CPU: non-matmul
ops, autocast casts and first-touch page faults of large fresh buffers, which there take
as long as the matmuls. Each part's time is the fastest of a few calls, so a busy
machine disturbs it less.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.models.arch import Arch, Stack
from lmforge.models.bert import MLMHead
from lmforge.nn.block import PostNormBlock, PostNormDecoderBlock, PreNormBlock, PreNormDecoderBlock
from lmforge.nn.position import RotaryPositions
from lmforge.plan.dataflow import Shape
from lmforge.train.objectives import linear_cross_entropy

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_BLOCKS = {("pre", False): PreNormBlock, ("post", False): PostNormBlock,
           ("pre", True): PreNormDecoderBlock, ("post", True): PostNormDecoderBlock}


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "process": time.process_time}


def best_time(fn: Callable[[], None], dev: torch.device, calls: int = 3, clock: str = "wall",
              warm_up: bool = True) -> float:
    """Seconds of the fastest of `calls` calls after one warm-up. clock "wall" is elapsed
    time; "process" is this process's CPU time (all threads), which a shared CPU's other
    work does not inflate — use it with one thread."""
    now = CLOCKS[clock]
    if warm_up:
        fn()
    best = float("inf")
    for _ in range(calls):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = now()
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        best = min(best, now() - t0)
    return best


def _block_times(arch: Arch, st: Stack, shape: Shape, dev: torch.device, autocast, clock: str) -> tuple[float, float]:
    """(forward + backward, forward alone) of one block of `st`."""
    c, B = arch.config, shape.batch
    T = shape.target_len if st.cross else shape.seq_len
    block = _BLOCKS[(st.order, st.cross)](st.spec).to(dev).train()
    x = torch.randn(B, T, arch.dim, device=dev, requires_grad=True)
    memory = torch.randn(B, shape.seq_len, arch.dim, device=dev, requires_grad=True) if st.cross else None
    rope = None
    if getattr(c, "positions", None) == "rope":
        rope = RotaryPositions(T, st.spec.head_dim, c.rope_theta, c.rope_scaling).to(dev)(
            torch.arange(T, device=dev)[None])

    def forward() -> torch.Tensor:
        with autocast():
            if st.cross:
                return block(x, memory, None, True)
            return block(x, None, st.causal, rope)

    def step() -> None:
        forward().float().sum().backward()

    with torch.no_grad():
        fwd = best_time(lambda: forward(), dev, clock=clock)
    return best_time(step, dev, clock=clock), fwd


def _head_time(arch: Arch, shape: Shape, ce_chunk: int, dev: torch.device, autocast, clock: str) -> float:
    """The loss head forward and backward, and the token embedding's backward."""
    D, Vp, V, B = arch.dim, arch.padded_vocab, arch.vocab_size, shape.batch
    weight = nn.Parameter(torch.randn(Vp, D, device=dev) * 0.02)
    ids = torch.randint(0, V, (B, shape.target_len if arch.encoder_decoder else shape.seq_len), device=dev)
    if arch.family == "bert":
        head = MLMHead(arch.config, nn.Embedding(Vp, D)).to(dev)
        head.decoder.weight = weight
        pooler, nsp = nn.Linear(D, D).to(dev), nn.Linear(D, 2).to(dev)
        with_nsp = arch.config.nsp
        hidden = torch.randn(B, shape.seq_len, D, device=dev, requires_grad=True)
        rows = torch.randperm(B * shape.seq_len, device=dev)[: B * shape.mlm_rows]

        def loss() -> torch.Tensor:
            logits = head(hidden.flatten(0, 1)[rows])[..., :V].float()
            mlm_loss = F.cross_entropy(logits, ids.flatten()[: rows.numel()])
            if not with_nsp:
                return mlm_loss
            nsp_logits = nsp(torch.tanh(pooler(hidden[:, 0]))).float()
            return mlm_loss + F.cross_entropy(nsp_logits, ids[:, 0] % 2)
    else:
        hidden = torch.randn(ids.numel(), D, device=dev, requires_grad=True)

        def loss() -> torch.Tensor:
            if ce_chunk:
                return linear_cross_entropy(hidden, weight, ids.flatten(), V, chunk_rows=ce_chunk)
            return F.cross_entropy((hidden @ weight.t())[..., :V].float(), ids.flatten(), reduction="sum")

    emb = nn.Embedding(Vp, D).to(dev)

    def step() -> None:
        weight.grad = emb.weight.grad = None
        with autocast():
            value = loss()
        value.backward()
        emb(ids).sum().backward()

    return best_time(step, dev, clock=clock)


def _optimizer_time(optimizer: str, params: int, dev: torch.device, clock: str) -> float:
    """The fused update of `params` parameters, timed on at most 2^24 and scaled."""
    n = min(params, 2**24)
    p = nn.Parameter(torch.randn(n, device=dev))
    p.grad = torch.randn_like(p)
    opt = (torch.optim.AdamW([p], fused=True) if optimizer == "adamw" else
           torch.optim.SGD([p], lr=1e-3, momentum=0.9, fused=True))
    return best_time(opt.step, dev, clock=clock) * params / n


def step_parts(arch: Arch, shape: Shape, precision: str, ce_chunk: int, optimizer: str, trainable: int,
               activation_checkpointing: bool, kind: str, clock: str = "wall") -> dict[str, float]:
    """Seconds of each part of one optimizer step on this machine (see the module docstring):
    'blocks' and 'head' per micro-batch, 'optimizer' per step."""
    dev = torch.device(kind)
    dtype = _DTYPES.get(precision)
    autocast = lambda: torch.autocast(dev.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)
    blocks = 0.0
    for st in arch.stacks:
        both, fwd = _block_times(arch, st, shape, dev, autocast, clock)
        blocks += st.n_layers * (both + (fwd if activation_checkpointing else 0.0))
    return {"blocks": blocks, "head": _head_time(arch, shape, ce_chunk, dev, autocast, clock),
            "optimizer": _optimizer_time(optimizer, trainable, dev, clock)}
