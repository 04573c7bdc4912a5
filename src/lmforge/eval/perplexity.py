"""Perplexity of a causal language model over text longer than its context.

A model with a context of max_len tokens cannot read a long text at once. Cutting the
text into disjoint chunks (stride == max_len) is fast but pessimistic: the first tokens
of every chunk are predicted from almost no context. The strided evaluation slides a
max_len window forward by `stride` tokens and scores only the tokens the previous
window did not, so every scored token sees at least max_len - stride + 1 tokens of
context (fewer only near the start of the text), at the price of max_len / stride
times more compute:

    tokens      t0 t1 t2 t3 t4 t5 t6 t7 t8 t9        max_len = 4, stride = 2
    window 0    [t0 t1 t2 t3]                         predicts t1 t2 t3 t4
    window 1          [t2 t3 t4 t5]                   scores t5 t6 only
    window 2                [t4 t5 t6 t7]             scores t7 t8 only
    window 3                      [t5 t6 t7 t8]       scores t9 only

Every token after the first is scored exactly once (the first has nothing to be
predicted from), so the summed NLL covers n - 1 tokens whatever the stride.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.eval.metrics import bits_per_byte, bits_per_char, perplexity


def window_spans(n_tokens: int, max_len: int, stride: int) -> list[tuple[int, int, int]]:
    """The evaluation windows over a sequence of n_tokens ids, as (begin, end, score_from):
    the model reads ids[begin:end] (at most max_len of them) and its logits at positions
    score_from..end-1 are scored, predicting ids[score_from + 1 : end + 1]."""
    if n_tokens < 2:
        raise ValueError(f"need at least 2 tokens to score one, got {n_tokens}")
    if max_len < 1:
        raise ValueError(f"max_len must be positive, got {max_len}")
    if not 1 <= stride <= max_len:
        raise ValueError(f"stride must be in 1..max_len ({max_len}), got {stride}")
    last = n_tokens - 1  # the last input position that still has a next token to predict
    spans, scored_to, end = [], 0, min(max_len, last)
    while True:
        spans.append((max(0, end - max_len), end, scored_to))
        if end == last:
            return spans
        scored_to, end = end, min(end + stride, last)


def _model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@torch.inference_mode()
def sliding_window_nll(
    model: nn.Module,
    token_ids: Tensor | Sequence[int],
    max_len: int,
    stride: int | None = None,
    batch_size: int = 4,
    device: torch.device | str | None = None,
) -> dict:
    """Summed next-token negative log-likelihood of one long token sequence.

    model: a causal LM, `model(input_ids (B, T)) -> logits (B, T, V)` (a GPT). Run in eval
        mode (no dropout) and restored to its previous mode afterwards.
    token_ids: (N,) ids of the whole text.
    max_len: window length (at most the model's max_seq_len); stride: how far each window
        moves (default max_len: plain chunked evaluation).
    batch_size: windows per forward pass. device: default the model's.
    Returns {"nll_sum" (nats), "n_tokens" (= N - 1), "mean_nll", "ppl", "n_windows"}.
    """
    ids = torch.as_tensor(token_ids, dtype=torch.long)
    if ids.dim() != 1:
        raise ValueError(f"token_ids must be 1-D (N,), got shape {tuple(ids.shape)}")
    stride = max_len if stride is None else stride
    model_max = getattr(getattr(model, "config", None), "max_seq_len", None)
    if model_max is not None and max_len > model_max:
        raise ValueError(f"max_len ({max_len}) is longer than the model's max_seq_len ({model_max})")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    spans = window_spans(ids.numel(), max_len, stride)
    device = torch.device(device) if device is not None else _model_device(model)
    ids = ids.to(device)
    nll_sum = torch.zeros((), dtype=torch.float64, device=device)
    n_scored = 0
    was_training = model.training
    model.eval()
    try:
        i = 0
        while i < len(spans):
            # Windows in one batch must share a length; only the first can be shorter.
            length = spans[i][1] - spans[i][0]
            batch = [spans[i]]
            while (i + len(batch) < len(spans) and len(batch) < batch_size
                   and spans[i + len(batch)][1] - spans[i + len(batch)][0] == length):
                batch.append(spans[i + len(batch)])
            i += len(batch)
            x = torch.stack([ids[b:e] for b, e, _ in batch])  # (B, L)
            y = torch.stack([ids[b + 1:e + 1] for b, e, _ in batch])  # (B, L): the next tokens
            for row, (b, _, s) in enumerate(batch):
                y[row, : s - b] = -100  # already scored by the previous window
            first = min(s - b for b, _, s in batch)  # no logits needed before this column
            logits = model(x)[:, first:]  # (B, L - first, V)
            nll_sum += F.cross_entropy(logits.float().flatten(0, 1), y[:, first:].flatten(),
                                       ignore_index=-100, reduction="sum")
            n_scored += sum(e - s for _, e, s in batch)
    finally:
        model.train(was_training)
    total = float(nll_sum)  # host sync: once, at the end
    mean = total / n_scored
    return {"nll_sum": total, "n_tokens": n_scored, "mean_nll": mean, "ppl": perplexity(mean),
            "n_windows": len(spans)}


def perplexity_of_text(
    model: nn.Module,
    tokenizer,
    text: str,
    max_len: int,
    stride: int | None = None,
    *,
    batch_size: int = 4,
    device: torch.device | str | None = None,
    add_special_tokens: bool = False,
) -> dict:
    """Perplexity of a text under a causal LM, plus tokenizer-independent rates.

    tokenizer: anything with `encode(text, add_special_tokens=...) -> list[int]`.
    Perplexity is per token, so it only compares models that share a tokenizer; bits per
    character (total nats / ln 2 / len(text)) and bits per UTF-8 byte compare any two.
    The first token is context only (nothing predicts it), so its characters count in the
    denominator without nats in the numerator; with a tokenizer that prepends a BOS token
    (add_special_tokens=True) every text token is predicted.
    Returns sliding_window_nll's dict plus "n_chars", "n_bytes", "bits_per_char", "bits_per_byte".
    """
    if not text:
        raise ValueError("text is empty")
    ids = tokenizer.encode(text, add_special_tokens=add_special_tokens)
    if len(ids) < 2:
        raise ValueError(f"text encodes to {len(ids)} token(s); need at least 2 to measure perplexity")
    out = sliding_window_nll(model, ids, max_len, stride, batch_size=batch_size, device=device)
    n_chars, n_bytes = len(text), len(text.encode("utf-8"))
    out.update(n_chars=n_chars, n_bytes=n_bytes, bits_per_char=bits_per_char(out["nll_sum"], n_chars),
               bits_per_byte=bits_per_byte(out["nll_sum"], n_bytes))
    return out
