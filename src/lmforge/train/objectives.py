"""Training objectives: a model and a batch in, a summed loss and what it sums over out.

    clm       causal LM: next-token cross-entropy from GPT hidden states
    mlm       masked LM: cross-entropy on the masked positions only, + masked-token accuracy
    mlm+nsp   masked LM + next sentence prediction (BERT), + both accuracies
    denoise   encoder-decoder reconstruction of the original text (BART, T5) by teacher forcing

Every objective returns the SUM of its per-item losses and the number of items (tokens,
sequences), never a mean: the loop adds both over the micro-batches of a step (and over
processes) and divides once, so accumulating k micro-batches equals one batch k times
larger, however the label tokens fall between them.

Batches are dicts of tensors already on the device. Labels follow the collators'
convention (lmforge.data.collators): aligned with the position whose output predicts them
(causal LM labels are already shifted), -100 where no loss is taken.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.data.batching import IGNORE_INDEX
from lmforge.models.gpt import soft_cap
from lmforge.nn.quant import head_weight

# Rows of logits per chunk: chunk_rows * V fp32 logits (~256 MiB) exist at a time, however long the batch.
CHUNK_ELEMENTS = 2**26
# On a CPU, chunks of ~4 MiB of logits stay in cache between the passes that read them (log-softmax,
# exp, the two gradient matmuls), but every chunk reads the LM head's weight again in its three
# matmuls, so a chunk has at least CPU_MIN_ROWS rows (a 50k vocabulary's 154 MB weight read per 64
# rows made GPT-2's loss 30% slower). One thread, hidden 2048 x 192 / 2048 x 128: 512-row chunks
# take 0.85x / 0.72x the time of F.cross_entropy on full logits for V = 2048 / 8192 (one big
# chunk: 0.85x / 0.92x).
CPU_CHUNK_ELEMENTS = 2**20
CPU_MIN_ROWS = 512


class ObjectiveOutput(NamedTuple):
    """loss: () summed loss over `count` items; count: () number of items it sums over;
    metrics: name -> (summed value, count), e.g. "mlm_acc" -> (correct, masked tokens).
    A NamedTuple (a pytree) so that DDP and FSDP can see the tensors in it."""

    loss: Tensor
    count: Tensor
    metrics: dict[str, tuple[Tensor, Tensor]]


Objective = Callable[[nn.Module, dict[str, Tensor]], ObjectiveOutput]


class LossModule(nn.Module):
    """model + objective as one module whose forward returns the ObjectiveOutput.

    DDP and FSDP act on forward calls: wrapping the objective makes the whole loss one
    forward of the wrapped root, so the objective may call any of the model's methods
    (encode, lm_head, mlm_logits, ...) with the root's parameters gathered."""

    def __init__(self, model: nn.Module, objective: Objective) -> None:
        super().__init__()
        self.model, self.objective = model, objective

    def forward(self, batch: dict[str, Tensor]) -> ObjectiveOutput:
        return self.objective(self.model, batch)


# ----------------------------------------------------------------------------- chunked CE


def _chunk_rows(vocab_size: int, cpu: bool = False) -> int:
    if cpu:
        return max(CPU_MIN_ROWS, CPU_CHUNK_ELEMENTS // vocab_size)
    return max(64, CHUNK_ELEMENTS // vocab_size)


def _chunk_logits(h: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """(n, D) hidden -> (n, V) fp32 logits (the matmul itself runs in autocast's dtype)."""
    logits = h @ weight.t()
    if bias is not None:
        logits = logits + bias
    return logits.float()


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(h_i W^T + b, y_i), chunk by chunk, with both gradients computed in forward.

    d loss / d logits = softmax(logits) - onehot(y) is known as soon as a chunk's logits
    are, so each chunk's logits live only inside its loop iteration: memory is one chunk
    of (rows, V) instead of the whole (N, V), and nothing is recomputed in backward.
    Soft-capped logits s = c tanh(z / c) add the chain rule's factor ds/dz = 1 - tanh(z / c)^2."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, rows: int,
                softcap: float | None) -> Tensor:
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]  # a frozen head needs no grad_w
        grad_h = torch.zeros_like(hidden)
        grad_w = torch.zeros(weight.shape if need_w else (0,), dtype=torch.float32, device=weight.device)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.size(0), rows):
            h, y = hidden[start:start + rows], labels[start:start + rows]
            logits = _chunk_logits(h, weight, bias)  # (n, V)
            if softcap is not None:
                capped = torch.tanh(logits / softcap)  # (n, V)
                logits = softcap * capped
            valid = y != IGNORE_INDEX
            target = y.clamp(min=0)[:, None]
            # One fused log-softmax pass instead of logsumexp's passes plus a subtraction: on a CPU these
            # (n, V) passes cost about as much as the matmuls. (Peak memory stays three (n, V) tensors.)
            logp = logits.log_softmax(dim=-1)
            loss -= (logp.gather(1, target).squeeze(1) * valid).sum()
            g = logp.exp()  # softmax, (n, V)
            del logp
            g.scatter_add_(1, target, torch.full_like(target, -1, dtype=g.dtype))
            g *= valid[:, None]
            if softcap is not None:
                g *= 1 - capped.square()  # d(c tanh(z / c)) / dz
            if need_h:
                grad_h[start:start + rows] = (g.to(h.dtype) @ weight.to(h.dtype)).to(hidden.dtype)
            if need_w:
                grad_w += (g.t().to(h.dtype) @ h).float()
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        grad_h, grad_w = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        return (grad_h * grad_loss if need_h else None, grad_w * grad_loss if need_w else None,
                None, None, None, None)


def linear_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, vocab_size: int, *,
                         bias: Tensor | None = None, chunk_rows: int | None = None,
                         softcap: float | None = None) -> Tensor:
    """Summed cross-entropy of logits = hidden @ weight[:vocab_size].T (+ bias) against labels,
    without materialising all the logits.

    hidden (N, D); weight (Vpad, D) — the LM head, padded rows sliced off here; labels (N,)
    with -100 = ignored; bias (Vpad,) or None, a constant (no gradient); chunk_rows: rows per
    chunk (default: about CHUNK_ELEMENTS logits; on a CPU about CPU_CHUNK_ELEMENTS, at least
    CPU_MIN_ROWS rows); softcap: the logits soft-capped as lmforge.models.gpt.soft_cap does
    (GPTConfig.logit_softcap). -> () fp32.
    """
    weight = weight[:vocab_size]
    bias = None if bias is None else bias[:vocab_size].detach()
    rows = chunk_rows or _chunk_rows(vocab_size, cpu=hidden.device.type == "cpu")
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, bias, labels, rows, softcap)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.size(0), rows):
        logits = soft_cap(_chunk_logits(hidden[start:start + rows], weight, bias), softcap)
        total += F.cross_entropy(logits, labels[start:start + rows], ignore_index=IGNORE_INDEX, reduction="sum")
    return total


def _lm_labels(batch: dict[str, Tensor]) -> tuple[Tensor, bool]:
    """Causal LM labels (B, T) aligned with input_ids: the batch's own, or input_ids shifted
    left (then the last position has no target). Returns (labels, shifted_here)."""
    if "labels" in batch:
        return batch["labels"], False
    ids = batch["input_ids"]
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, :-1] = ids[:, 1:]
    if "attention_mask" in batch:
        labels[:, :-1].masked_fill_(batch["attention_mask"][:, 1:] == 0, IGNORE_INDEX)
    return labels, True


# ----------------------------------------------------------------------------- objectives


def clm(model: nn.Module, batch: dict[str, Tensor]) -> ObjectiveOutput:
    """Causal LM on a GPT: batch input_ids (B, T), optional attention_mask (B, T) and labels (B, T)."""
    hidden = model.encode(batch["input_ids"], batch.get("attention_mask"))  # (B, T, D)
    labels, _ = _lm_labels(batch)
    labels = labels.reshape(-1)
    loss = linear_cross_entropy(hidden.reshape(-1, hidden.size(-1)), head_weight(model.lm_head), labels,
                                model.config.vocab_size, softcap=model.config.logit_softcap)
    return ObjectiveOutput(loss, (labels != IGNORE_INDEX).sum(), {})


def _masked_lm(model: nn.Module, hidden: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """MLM head on the masked positions only -> (summed loss, masked count, correct count)."""
    selected = labels != IGNORE_INDEX  # (B, T)
    # host sync: boolean indexing has a data-dependent shape; it keeps the (M, V) head GEMM to masked tokens.
    logits = model.mlm_logits(hidden[selected]).float()  # (M, V)
    targets = labels[selected]  # (M,)
    loss = F.cross_entropy(logits, targets, reduction="sum")
    return loss, selected.sum(), (logits.argmax(-1) == targets).sum()


def mlm(model: nn.Module, batch: dict[str, Tensor]) -> ObjectiveOutput:
    """Masked LM on a Bert: input_ids, attention_mask, optional token_type_ids, labels (B, T)."""
    hidden = model.encode(batch["input_ids"], batch.get("attention_mask"), batch.get("token_type_ids"))
    loss, count, correct = _masked_lm(model, hidden, batch["labels"])
    return ObjectiveOutput(loss, count, {"mlm_acc": (correct, count)})


def mlm_nsp(model: nn.Module, batch: dict[str, Tensor]) -> ObjectiveOutput:
    """BERT pretraining: masked LM + next sentence prediction (nsp_labels (B,): 0 = IsNext).

    BERT minimises mean MLM loss + mean NSP loss. In the sum/count form the NSP sum is
    weighted by masked/sequences, so that loss / count = mean MLM + mean NSP in each
    micro-batch."""
    hidden = model.encode(batch["input_ids"], batch.get("attention_mask"), batch.get("token_type_ids"))
    mlm_loss, count, correct = _masked_lm(model, hidden, batch["labels"])
    nsp_logits = model.nsp_logits(hidden).float()  # (B, 2)
    nsp_labels = batch["nsp_labels"]
    nsp_loss = F.cross_entropy(nsp_logits, nsp_labels, reduction="sum")
    n_seq = torch.full((), nsp_labels.numel(), device=nsp_logits.device)  # a fill, not a host copy
    loss = mlm_loss + nsp_loss * count / n_seq
    return ObjectiveOutput(loss, count, {
        "mlm_loss": (mlm_loss.detach(), count), "nsp_loss": (nsp_loss.detach(), n_seq),
        "mlm_acc": (correct, count), "nsp_acc": ((nsp_logits.argmax(-1) == nsp_labels).sum(), n_seq)})


def denoise(model: nn.Module, batch: dict[str, Tensor]) -> ObjectiveOutput:
    """Encoder-decoder reconstruction by teacher forcing: input_ids, attention_mask (B, S)
    corrupted source; labels (B, T) the original; decoder_input_ids (B, T) when the batch has
    them, else labels shifted right behind the decoder start token (model.shift_right)."""
    labels = batch["labels"]
    decoder_input_ids = batch.get("decoder_input_ids")
    if decoder_input_ids is None:
        decoder_input_ids = model.shift_right(labels)
    memory = model.encode(batch["input_ids"], batch.get("attention_mask"))  # (B, S, D)
    hidden = model.decode(decoder_input_ids, memory, batch.get("attention_mask"),
                          decoder_attention_mask=batch.get("decoder_attention_mask"))  # (B, T, D)
    labels = labels.reshape(-1)
    loss = linear_cross_entropy(hidden.reshape(-1, hidden.size(-1)), head_weight(model.lm_head), labels,
                                model.config.vocab_size, bias=model.lm_bias)
    return ObjectiveOutput(loss, (labels != IGNORE_INDEX).sum(), {})


OBJECTIVES: dict[str, Objective] = {"clm": clm, "mlm": mlm, "mlm+nsp": mlm_nsp, "denoise": denoise}
# The model families each pretraining objective trains.
FAMILY_OF_OBJECTIVE = {"clm": ("gpt",), "mlm": ("bert",), "mlm+nsp": ("bert",), "denoise": ("encdec", "t5")}


def get_objective(name: str) -> Objective:
    if name not in OBJECTIVES:
        raise ValueError(f"train.objective must be one of {tuple(OBJECTIVES)}, got {name!r}")
    return OBJECTIVES[name]
