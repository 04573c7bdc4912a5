"""The training step `verify` runs: random batches, each family's loss, activation
checkpointing per block, and the chunked cross-entropy.

Plain PyTorch on purpose: what the planner predicts must be what this code does.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lmforge.plan.arch import Arch
from lmforge.plan.dataflow import Shape


def _ce_sum(hidden: Tensor, targets: Tensor, head: Callable[[Tensor], Tensor]) -> Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def chunked_cross_entropy(hidden: Tensor, targets: Tensor, head: Callable[[Tensor], Tensor],
                          chunk: int | None) -> Tensor:
    """Mean cross-entropy of head(hidden) against targets. hidden (N, D), targets (N,).

    With `chunk`, the head and the loss run on `chunk` rows at a time under activation
    checkpointing: at most one chunk's logits (chunk x V) exist at once, forward or
    backward, and backward keeps only `hidden`, recomputing each chunk's logits.
    """
    if not chunk:
        return F.cross_entropy(head(hidden).float(), targets)
    total = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, hidden.size(0), chunk):
        total = total + checkpoint(_ce_sum, hidden[i:i + chunk], targets[i:i + chunk], head, use_reentrant=False)
    return total / hidden.size(0)


def random_batch(arch: Arch, shape: Shape, device: torch.device | str, seed: int = 0) -> dict[str, Tensor]:
    """Random token ids shaped like a training batch of the family's objective."""
    g = torch.Generator().manual_seed(seed)
    B, T, V = shape.batch, shape.seq_len, arch.vocab_size
    ids = lambda n: torch.randint(0, V, (B, n), generator=g)
    batch = {"input_ids": ids(T)}
    if arch.family == "gpt":
        batch["targets"] = ids(T)
    elif arch.family == "bert":
        # exactly mlm_rows masked positions per row, as flat indices into (B * T)
        pos = torch.stack([torch.randperm(T, generator=g)[: shape.mlm_rows] for _ in range(B)])  # (B, k)
        batch["masked"] = (pos + T * torch.arange(B)[:, None]).flatten()
        batch["mlm_targets"] = torch.randint(0, V, (B * shape.mlm_rows,), generator=g)
        batch["nsp_targets"] = torch.randint(0, 2, (B,), generator=g)
    else:
        batch["decoder_input_ids"] = ids(shape.target_len)
        batch["targets"] = ids(shape.target_len)
    return {k: v.to(device) for k, v in batch.items()}


def loss(model: nn.Module, arch: Arch, batch: dict[str, Tensor], ce_chunk: int | None) -> Tensor:
    """The family's pretraining loss on a batch from `random_batch`."""
    V = arch.vocab_size
    if arch.family == "gpt":
        h = model.encode(batch["input_ids"])  # (B, T, D)
        head = lambda x: model.lm_head(x)[..., :V]
        return chunked_cross_entropy(h.flatten(0, 1), batch["targets"].flatten(), head, ce_chunk)
    if arch.family == "bert":
        h = model.encode(batch["input_ids"])  # (B, T, D)
        masked = h.flatten(0, 1)[batch["masked"]]  # (B * k, D): the MLM head runs on masked positions only
        mlm = chunked_cross_entropy(masked, batch["mlm_targets"], model.mlm_logits, ce_chunk)
        return mlm + F.cross_entropy(model.nsp_logits(h).float(), batch["nsp_targets"])
    memory = model.encode(batch["input_ids"])
    h = model.decode(batch["decoder_input_ids"], memory)  # (B, T, D)
    return chunked_cross_entropy(h.flatten(0, 1), batch["targets"].flatten(), model.logits, ce_chunk)


class Checkpointed(nn.Module):
    """Wraps a block: its forward runs under non-reentrant activation checkpointing, so
    backward keeps only the block's inputs and recomputes the rest."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, *args, **kwargs):
        return checkpoint(self.block, *args, use_reentrant=False, **kwargs)


def checkpoint_blocks(model: nn.Module) -> None:
    """Wrap every block of every stack (GPT/Bert `blocks`, encoder and decoder blocks)."""
    for module in list(model.modules()):
        blocks = getattr(module, "blocks", None)
        if isinstance(blocks, nn.ModuleList):
            for i, b in enumerate(blocks):
                if not isinstance(b, Checkpointed):
                    blocks[i] = Checkpointed(b)
