"""Pure functions on next-token logits: penalties, filters and the choice of a token.

Every function takes logits (N, V) -- N rows (prompts x beams or samples), V the
vocabulary -- and returns a new tensor; none reads a value back to the host, so a
decoding loop built from them runs without synchronising with the GPU.

Where transformers defines a processor with the same name, these follow its
definition, so that lmforge and `transformers.generate` pick the same tokens:
    repetition penalty   divide positive, multiply negative logits of tokens already present
    no-repeat n-gram     ban every token that would complete an n-gram already in the context
    top-k                keep the k largest logits
    top-p (nucleus)      keep the smallest set of most likely tokens whose probability reaches p
A removed token gets -inf, i.e. probability 0 after the softmax.

`context` (N, L) is the token history the penalties look at (the prompt and the
tokens generated so far, oldest first), and `context_mask` (N, L) marks its real
tokens, so that left padding is never mistaken for text.
"""

from __future__ import annotations

import torch
from torch import Tensor

NEG_INF = float("-inf")


def greedy(logits: Tensor) -> Tensor:
    """The most likely token of each row: logits (N, V) -> ids (N,)."""
    return logits.argmax(dim=-1)


def apply_temperature(logits: Tensor, temperature: float) -> Tensor:
    """logits / T: (N, V) -> (N, V). T < 1 sharpens the distribution, T > 1 flattens it."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 to scale logits, got {temperature} (0 means greedy: use `greedy`)")
    return logits / temperature


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Keep the k largest logits of each row (ties with the k-th kept too): (N, V) -> (N, V)."""
    if k <= 0:
        raise ValueError(f"top_k must be a positive integer, got {k}")
    k = min(k, logits.size(-1))
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (N, 1)
    return logits.masked_fill(logits < kth, NEG_INF)


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability
    reaches p (at least one token): (N, V) -> (N, V).

    A token is kept when the probability of the tokens ranked before it is still < p.
    """
    if not 0.0 < p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {p}")
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (N, V)
    probs = sorted_logits.float().softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # (N, V): probability ranked strictly ahead
    drop_sorted = mass_before >= p
    drop_sorted[..., 0] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, NEG_INF)


def present_tokens(context: Tensor, context_mask: Tensor | None, vocab_size: int) -> Tensor:
    """Which tokens occur in each row's context: context (N, L) -> bool (N, V)."""
    ids = context if context_mask is None else context.masked_fill(~context_mask.bool(), vocab_size)
    ids = ids.clamp(max=vocab_size)  # ids past the logits (never generated) go to the spare column
    seen = torch.zeros(context.size(0), vocab_size + 1, dtype=torch.bool, device=context.device)
    return seen.scatter_(1, ids, True)[:, :vocab_size]


def apply_repetition_penalty(logits: Tensor, context: Tensor, context_mask: Tensor | None, penalty: float) -> Tensor:
    """Make tokens already in the context less likely (penalty > 1), as in the CTRL paper
    and transformers: a positive logit is divided by the penalty, a negative one multiplied.

    logits (N, V), context (N, L), context_mask (N, L) or None -> (N, V).
    """
    if penalty <= 0:
        raise ValueError(f"repetition_penalty must be > 0, got {penalty}")
    seen = present_tokens(context, context_mask, logits.size(-1))
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def ban_repeated_ngrams(logits: Tensor, context: Tensor, context_mask: Tensor | None, n: int) -> Tensor:
    """Forbid every token that would complete an n-gram already present in the context.

    The last n-1 context tokens are matched against the first n-1 tokens of every
    earlier n-token window; each match bans the window's last token.
    logits (N, V), context (N, L) ending with the latest token -> (N, V).
    """
    if n <= 0:
        raise ValueError(f"no_repeat_ngram_size must be a positive integer, got {n}")
    N, L = context.shape
    V = logits.size(-1)
    if L < n:
        return logits
    prefix = context[:, L - n + 1:]  # (N, n-1)
    windows = context.unfold(1, n, 1)  # (N, L-n+1, n)
    match = (windows[..., :-1] == prefix[:, None, :]).all(dim=-1)  # (N, L-n+1)
    if context_mask is not None:
        real = context_mask.bool()
        match &= real.unfold(1, n, 1).all(dim=-1) & real[:, L - n + 1:].all(dim=-1, keepdim=True)
    banned_ids = torch.where(match, windows[..., -1].clamp(max=V), V)
    banned = torch.zeros(N, V + 1, dtype=torch.bool, device=logits.device).scatter_(1, banned_ids, True)
    return logits.masked_fill(banned[:, :V], NEG_INF)


def suppress_tokens(logits: Tensor, token_ids: int | list[int]) -> Tensor:
    """Make the given tokens impossible (e.g. EOS before min_new_tokens): (N, V) -> (N, V)."""
    out = logits.clone()
    out[:, token_ids] = NEG_INF
    return out


def force_token(logits: Tensor, token_id: int) -> Tensor:
    """Leave only `token_id` possible (score 0, the rest -inf), as transformers' forced
    BOS/EOS processors do: (N, V) -> (N, V)."""
    out = torch.full_like(logits, NEG_INF)
    out[:, token_id] = 0.0
    return out


def sample(logits: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Draw one token per row from softmax(logits): (N, V) -> ids (N,).

    Exponential race: argmax_i p_i / E_i with E_i ~ Exp(1) picks i with probability
    p_i, needs one random tensor and no host round trip (unlike rejection loops), and
    is reproducible through `generator`. Rows with -inf logits never pick those tokens.
    """
    probs = logits.float().softmax(dim=-1)
    race = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / race).argmax(dim=-1)


def token_logprobs(logits: Tensor, ids: Tensor, top: int = 0) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Log-probabilities of the chosen tokens, and optionally the `top` most likely.

    logits (N, V), ids (N,) -> (logprob of ids (N,), top ids (N, top) or None, their logprobs (N, top) or None).
    """
    logp = logits.float().log_softmax(dim=-1)
    chosen = logp.gather(-1, ids[:, None])[:, 0]
    if top <= 0:
        return chosen, None, None
    values, indices = torch.topk(logp, min(top, logp.size(-1)), dim=-1)
    return chosen, indices, values
