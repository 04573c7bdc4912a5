"""Log-likelihoods of continuations under a causal LM, scored the way lm-evaluation-harness
scores them, so that benchmark numbers agree with its.

A benchmark asks, for each (context, continuation) pair of strings, for
log p(continuation | context) = sum_t log p(cont_t | context, cont_<t) and whether greedy
decoding would have produced the continuation token for token.

Tokenization (lm-evaluation-harness's rule): trailing spaces of the context move to the
continuation; the context's ids are encode(context), the continuation's are
encode(context + continuation) minus as many leading ids (so a merge across the boundary
is scored as the whole encoding has it); an empty context becomes the prefix token (BOS,
else EOS). A pair longer than the model's window keeps its last max_length + 1 ids.

Shared contexts: a multiple-choice question asks for k continuations of one context.
Rather than k rows that each repeat the context, the continuations become branches of one
packed row; each branch continues the context's positions and attends to the context and
to its own earlier tokens only, so it computes exactly what its own row would:

    row          c0 c1 c2 c3 | a0 a1 | b0 b1 b2      the context, then each continuation but its last id
    positions     0  1  2  3 |  4  5 |  4  5  6
    attends to   causal      | context + own branch
    scores       c3 -> a0, b0;  a0 -> a1;  a1 -> a2;  b0 -> b1 ...

Only the scored positions reach the LM head (the largest matmul of a small model, and the
one lm-evaluation-harness runs on every position). Rows are sorted by length, longest first,
and batched with right padding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from lmforge.eval.perplexity import window_spans
from lmforge.models.gpt import soft_cap
from lmforge.train.objectives import CHUNK_ELEMENTS

Pair = tuple[list[int], list[int]]  # (context ids, continuation ids)


# ----------------------------------------------------------------------------- per-token statistics


def token_stats(hidden: Tensor, weight: Tensor, labels: Tensor, vocab_size: int,
                softcap: float | None = None) -> tuple[Tensor, Tensor]:
    """Per-token NLL and argmax hits of logits = hidden @ weight[:vocab_size].T (soft-capped
    by `softcap`, GPTConfig.logit_softcap), computed in chunks of rows so that at most
    ~CHUNK_ELEMENTS fp32 logits exist at a time.

    hidden (N, D); weight (Vpad, D); labels (N,) all valid ids -> nll (N,) fp32, correct (N,) bool.
    """
    weight = weight[:vocab_size]
    rows = max(64, CHUNK_ELEMENTS // vocab_size)
    nll, correct = [], []
    for start in range(0, hidden.size(0), rows):
        logits = soft_cap((hidden[start:start + rows] @ weight.t()).float(), softcap)  # (n, V)
        y = labels[start:start + rows]
        nll.append(F.cross_entropy(logits, y, reduction="none"))
        correct.append(logits.argmax(-1) == y)
    if not nll:
        return hidden.new_zeros(0, dtype=torch.float32), torch.zeros(0, dtype=torch.bool, device=hidden.device)
    return torch.cat(nll), torch.cat(correct)


# ----------------------------------------------------------------------------- tokenization


def prefix_token_id(tokenizer) -> int:
    """The id that stands for an empty context and precedes a rolled document: BOS, else EOS."""
    for value in (tokenizer.bos_id, tokenizer.eos_id):
        if value is not None:
            return value
    raise ValueError("the tokenizer has neither a BOS nor an EOS token to condition the first token on")


def encode_texts(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Ids of each text with the tokenizer's special tokens (a BOS where it adds one), except
    for a text that already starts with the prefix token's text, which gets none."""
    marker = tokenizer.decode([prefix_token_id(tokenizer)], skip_special_tokens=False)
    bare = [bool(marker) and t.startswith(marker) for t in texts]
    out: list[list[int]] = [[] for _ in texts]
    for special in (True, False):
        index = [i for i, b in enumerate(bare) if b != special]
        encoded = tokenizer.encode_batch([texts[i] for i in index], add_special_tokens=special) if index else []
        for i, ids in zip(index, encoded):
            out[i] = ids
    return out


def encode_pairs(tokenizer, pairs: Sequence[tuple[str, str]]) -> list[Pair]:
    """(context, continuation) strings -> (context ids, continuation ids), as described in the
    module docstring. Each distinct string is encoded once."""
    prefix = prefix_token_id(tokenizer)
    moved = []
    for context, continuation in pairs:
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces and context.strip():
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        moved.append((context, continuation))
    texts = list(dict.fromkeys([c for c, _ in moved if c] + [c + x for c, x in moved if c]))
    ids = dict(zip(texts, encode_texts(tokenizer, texts)))
    alone = list(dict.fromkeys(x for c, x in moved if not c))  # continuations of an empty context
    bare = dict(zip(alone, tokenizer.encode_batch(alone, add_special_tokens=False) if alone else []))
    out = []
    for context, continuation in moved:
        if context:
            context_ids = ids[context]
            out.append((context_ids, ids[context + continuation][len(context_ids):]))
        else:
            cont = bare[continuation]
            out.append(([prefix], cont) if not cont or cont[0] != prefix else (cont[:1], cont[1:]))
    return out


def rolling_pairs(token_ids: Sequence[int], prefix_id: int, max_length: int) -> list[Pair]:
    """One document as disjoint windows of at most max_length ids, every id predicted once: the
    prefix token, then the ids, cut into chunks of max_length (the last one reads a full window
    of earlier ids and scores only the new ones), as lm-evaluation-harness's loglikelihood_rolling.
    Uses lmforge.eval.perplexity.window_spans with stride = max_length."""
    ids = [prefix_id, *token_ids]
    if len(ids) < 2:
        return []
    return [(ids[b:s + 1], ids[s + 1:e + 1]) for b, e, s in window_spans(len(ids), max_length, max_length)]


# ----------------------------------------------------------------------------- packing


class _Row:
    """One packed row: a context and the continuations (branches) that share it."""

    def __init__(self, context: list[int]) -> None:
        n = len(context)
        self.context = context
        self.tokens = list(context)  # the context, then each branch but its last id
        self.positions = list(range(n))
        self.segments = [0] * n  # 0: context, j: branch j
        self.scored: list[int] = []  # the row index whose logits predict ...
        self.targets: list[int] = []  # ... this id ...
        self.owners: list[int] = []  # ... for this request
        self.branches = 0

    def add(self, request: int, continuation: list[int]) -> None:
        self.branches += 1
        n, start = len(self.context), len(self.tokens)
        self.tokens += continuation[:-1]
        self.positions += range(n, n + len(continuation) - 1)
        self.segments += [self.branches] * (len(continuation) - 1)
        self.scored += [n - 1, *range(start, start + len(continuation) - 1)]
        self.targets += continuation
        self.owners += [request] * len(continuation)


def _fit(pair: Pair, max_length: int, where: int) -> Pair:
    """lm-evaluation-harness's left truncation: keep the last max_length + 1 ids of the pair."""
    context, continuation = pair
    if not continuation:
        raise ValueError(f"request {where}: the continuation encodes to no tokens")
    if len(continuation) > max_length:
        raise ValueError(f"request {where}: the continuation has {len(continuation)} tokens, more than the "
                         f"model's window of {max_length}")
    keep = max_length + 1 - len(continuation)
    return (context[-keep:] if len(context) > keep else context), continuation


def pack_rows(pairs: Sequence[Pair], max_length: int, share_contexts: bool = True) -> list[_Row]:
    """Rows of at most max_length ids, continuations of one context packed together (in
    request order, a new row when one is full); sorted longest first."""
    rows: list[_Row] = []
    open_rows: dict[tuple[int, ...], _Row] = {}
    for i, pair in enumerate(pairs):
        context, continuation = _fit(pair, max_length, i)
        key = tuple(context)
        row = open_rows.get(key) if share_contexts else None
        if row is None or len(row.tokens) + len(continuation) - 1 > max_length:
            row = _Row(context)
            rows.append(row)
            open_rows[key] = row
        row.add(i, continuation)
    return sorted(rows, key=lambda r: -len(r.tokens))


def _branch_mask(segments: Tensor) -> Tensor:
    """(B, T) segment ids (0 context, j > 0 branch j, -1 padding) -> (B, 1, T, T) bool: causal,
    and a branch sees the context and itself only. Padding sees the context and earlier
    padding (never nothing, whose softmax would be NaN); real tokens never see padding."""
    T = segments.size(1)
    causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()  # (T, T)
    same = segments[:, :, None] == segments[:, None, :]  # (B, T, T)
    return (causal & (same | (segments[:, None, :] == 0)))[:, None]


def _score_batch(model: nn.Module, rows: list[_Row], device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Forward one batch of rows -> (owner (N,), nll (N,), correct (N,)) per scored token."""
    T = max(len(r.tokens) for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    pos = torch.zeros(len(rows), T, dtype=torch.long)
    seg = torch.full((len(rows), T), -1, dtype=torch.long)
    flat, targets, owners = [], [], []
    for b, r in enumerate(rows):
        n = len(r.tokens)
        ids[b, :n], pos[b, :n], seg[b, :n] = torch.tensor(r.tokens), torch.tensor(r.positions), torch.tensor(r.segments)
        flat += [b * T + i for i in r.scored]
        targets += r.targets
        owners += r.owners
    ids, pos = ids.to(device, non_blocking=True), pos.to(device, non_blocking=True)
    # Rows without branches are plain causal sequences: right padding cannot reach their real
    # tokens, so the fused causal kernel needs no mask.
    mask = _branch_mask(seg.to(device)) if any(r.branches > 1 for r in rows) else None
    hidden = model.encode(ids, mask, position_ids=pos)  # (B, T, D)
    picked = hidden.flatten(0, 1)[torch.tensor(flat, device=device)]  # (N, D)
    nll, correct = token_stats(picked, model.lm_head.weight, torch.tensor(targets, device=device),
                               model.config.vocab_size, model.config.logit_softcap)
    return torch.tensor(owners, device=device), nll, correct


@torch.inference_mode()
def score_pairs(model: nn.Module, pairs: Sequence[Pair], *, max_length: int | None = None, batch_size: int = 16,
                share_contexts: bool = True, progress: bool = False,
                desc: str = "loglikelihood") -> list[tuple[float, bool]]:
    """(log p(continuation | context), greedy) for each (context ids, continuation ids) pair.

    model: a causal LM with `encode(input_ids, mask, position_ids=...)` and `lm_head` (a GPT of
        any decoder family), run in eval mode and restored afterwards.
    max_length: the window (default and at most the model's max_seq_len); batch_size: rows per
        forward pass; share_contexts=False scores every pair in its own row (the reference the
        tests compare packing against).
    """
    limit = model.config.max_seq_len
    max_length = min(max_length or limit, limit)
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    device = next(model.parameters()).device
    rows = pack_rows(pairs, max_length, share_contexts)
    ll = torch.zeros(len(pairs), dtype=torch.float64, device=device)
    misses = torch.zeros(len(pairs), dtype=torch.long, device=device)
    was_training = model.training
    model.eval()
    try:
        with tqdm(total=len(pairs), desc=desc, unit="req", disable=not progress, dynamic_ncols=True) as bar:
            for start in range(0, len(rows), batch_size):
                batch = rows[start:start + batch_size]
                owner, nll, correct = _score_batch(model, batch, device)
                ll.index_add_(0, owner, -nll.double())
                misses.index_add_(0, owner, (~correct).long())
                bar.update(sum(r.branches for r in batch))
    finally:
        model.train(was_training)
    return list(zip(ll.tolist(), (misses == 0).tolist()))  # host sync: once, at the end


def loglikelihood(model: nn.Module, tokenizer, pairs: Sequence[tuple[str, str]], **options) -> list[tuple[float, bool]]:
    """score_pairs on (context, continuation) strings, tokenized by `encode_pairs`."""
    return score_pairs(model, encode_pairs(tokenizer, pairs), **options)


def loglikelihood_rolling(model: nn.Module, tokenizer, texts: Sequence[str], *, max_length: int | None = None,
                          **options) -> list[float]:
    """Summed log-likelihood of each whole text (every token predicted once, from the prefix
    token on; see `rolling_pairs`). Options as `score_pairs`."""
    max_length = min(max_length or model.config.max_seq_len, model.config.max_seq_len)
    prefix = prefix_token_id(tokenizer)
    windows, owner = [], []
    for i, ids in enumerate(encode_texts(tokenizer, list(texts))):
        pieces = rolling_pairs(ids, prefix, max_length)
        windows += pieces
        owner += [i] * len(pieces)
    scores = score_pairs(model, windows, max_length=max_length, share_contexts=False, **options)
    totals = [0.0] * len(texts)
    for i, (value, _) in zip(owner, scores):
        totals[i] += value
    return totals
