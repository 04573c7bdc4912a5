"""The training step `verify` runs: random batches in the collators' format and the
training engine's own objectives (lmforge.train.objectives).

- GPT: causal LM through `linear_cross_entropy` (chunked, gradients computed in forward),
- Bert: masked LM on exactly `mlm_rows` positions per sequence + NSP (`mlm_nsp`; `mlm`
  for an encoder without an NSP head: RoBERTa, DistilBERT),
- encoder-decoder: teacher-forced reconstruction through `linear_cross_entropy`.
`chunk_rows` picks the cross-entropy's rows per chunk (the engine's default: the largest
chunk of about 2^26 logits); 0 runs a plain `F.cross_entropy` over all logits instead,
for comparison. Bert's MLM head is never chunked (it runs on the masked rows only).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.data.batching import IGNORE_INDEX
from lmforge.models.arch import Arch
from lmforge.models.gpt import soft_cap
from lmforge.plan.dataflow import Shape
from lmforge.train.objectives import linear_cross_entropy, mlm, mlm_nsp


def random_batch(arch: Arch, shape: Shape, device: torch.device | str, seed: int = 0) -> dict[str, Tensor]:
    """Random token ids shaped like a training batch of the family's objective."""
    g = torch.Generator().manual_seed(seed)
    B, T, V = shape.batch, shape.seq_len, arch.vocab_size
    ids = lambda n: torch.randint(0, V, (B, n), generator=g)
    batch = {"input_ids": ids(T)}
    if arch.family == "gpt":
        batch["labels"] = ids(T)
    elif arch.family == "bert":
        labels = torch.full((B, T), IGNORE_INDEX)
        for row in labels:  # exactly mlm_rows masked positions per sequence
            row[torch.randperm(T, generator=g)[: shape.mlm_rows]] = torch.randint(0, V, (shape.mlm_rows,), generator=g)
        batch["labels"] = labels
        if arch.config.nsp:
            batch["nsp_labels"] = torch.randint(0, 2, (B,), generator=g)
    else:
        batch["labels"] = ids(shape.target_len)
    return {k: v.to(device) for k, v in batch.items()}


def _cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, vocab_size: int, chunk_rows: int,
                   bias: Tensor | None = None, softcap: float | None = None) -> Tensor:
    hidden, labels = hidden.reshape(-1, hidden.size(-1)), labels.reshape(-1)
    if chunk_rows:
        return linear_cross_entropy(hidden, weight, labels, vocab_size, bias=bias, chunk_rows=chunk_rows,
                                    softcap=softcap)
    logits = hidden @ weight.t() if bias is None else hidden @ weight.t() + bias
    return F.cross_entropy(soft_cap(logits[..., :vocab_size].float(), softcap), labels, reduction="sum")


def loss(model: nn.Module, arch: Arch, batch: dict[str, Tensor], chunk_rows: int) -> Tensor:
    """The family's summed pretraining loss on a batch from `random_batch`."""
    V = arch.vocab_size
    if arch.family == "gpt":
        hidden = model.encode(batch["input_ids"])  # (B, T, D)
        return _cross_entropy(hidden, model.lm_head.weight, batch["labels"], V, chunk_rows,
                              softcap=arch.config.logit_softcap)
    if arch.family == "bert":
        return (mlm_nsp if arch.config.nsp else mlm)(model, batch).loss
    memory = model.encode(batch["input_ids"])  # (B, S, D)
    hidden = model.decode(model.shift_right(batch["labels"]), memory)  # (B, T, D)
    return _cross_entropy(hidden, model.lm_head.weight, batch["labels"], V, chunk_rows, bias=model.lm_bias)
