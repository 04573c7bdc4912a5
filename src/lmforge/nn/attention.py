"""Attention: the formula, the fast path, the masks and the two attention layers.

    Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k) + M) V

M is the mask: 0 where a query may attend, -inf where it may not; a float mask may also
carry a learned bias (T5's relative position bias, added to every score). T5 also drops
the 1/sqrt(d_k) (scale=1): its initialisation puts that factor into the query weights.

`reference_attention` computes exactly that, step by step, and returns the
attention weights; `sdpa` hands the same computation to
`torch.nn.functional.scaled_dot_product_attention`, which picks a fused kernel
(flash, memory-efficient, cuDNN) and never materialises the T x S weight matrix.
The tests check that the two agree.

Glossary of the shape letters used across lmforge:
    B    batch size
    T    query length (tokens in this forward pass)
    S    key/value length (T for plain self-attention, the cache length when
         decoding with a KV cache, the source length for cross-attention)
    D    model width (`dim`)
    H    query heads (`n_heads`);  Hkv  key/value heads (`n_kv_heads`, < H for
         grouped-query attention)
    Dh   width of one head (`head_dim`, usually D // H)
    F    hidden width of the MLP (`hidden_dim`)
    V    vocabulary size

Masks are boolean and mean "may attend": True keeps a score, False drops it; or float,
added to the scores (-inf drops one). They broadcast to (B, H, T, S).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.nn.kv_cache import KVCache
from lmforge.nn.norm import RMSNorm
from lmforge.nn.position import apply_rope


def repeat_kv(x: Tensor, n_rep: int) -> Tensor:
    """Repeat each key/value head n_rep times: (B, Hkv, S, Dh) -> (B, Hkv*n_rep, S, Dh)."""
    if n_rep == 1:
        return x
    return x.repeat_interleave(n_rep, dim=1)


def reference_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = None,
    is_causal: bool = False,
    dropout_p: float = 0.0,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """softmax(Q K^T / sqrt(d_k) + M) V written out, for readers, tests and inspection.

    q: (B, H, T, Dh); k, v: (B, Hkv, S, Dh); mask: bool or float (added to the scores),
    broadcastable to (B, H, T, S); scale: the factor on Q K^T (None: 1/sqrt(Dh)).
    Returns (out (B, H, T, Dh), weights (B, H, T, S)).
    """
    n_rep = q.size(1) // k.size(1)
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)  # (B, H, S, Dh)
    scale = 1.0 / math.sqrt(q.size(-1)) if scale is None else scale
    scores = q @ k.transpose(-2, -1) * scale  # (B, H, T, S)
    if is_causal:
        T, S = scores.shape[-2:]
        scores = scores.masked_fill(~causal_mask(T, S, scores.device), float("-inf"))
    if mask is not None:
        scores = scores + mask if mask.is_floating_point() else scores.masked_fill(~mask, float("-inf"))
    weights = scores.softmax(dim=-1)
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p)
    return weights @ v, weights  # (B, H, T, Dh), (B, H, T, S)


def sdpa(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = None,
    is_causal: bool = False,
    dropout_p: float = 0.0,
    scale: float | None = None,
) -> Tensor:
    """The same computation through torch's fused kernels. Shapes as `reference_attention`."""
    gqa = q.size(1) != k.size(1)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=gqa
    )


def causal_mask(T: int, S: int | None = None, device: torch.device | None = None) -> Tensor:
    """(T, S) bool: query t sees keys s <= t + (S - T), i.e. aligned to the last key."""
    S = T if S is None else S
    return torch.ones(T, S, dtype=torch.bool, device=device).tril(diagonal=S - T)


def build_mask(
    T: int,
    S: int,
    *,
    causal: bool,
    key_padding: Tensor | None = None,
    query_pos: Tensor | None = None,
    device: torch.device | None = None,
    window: int | None = None,
) -> Tensor | None:
    """Build the boolean mask for one attention call, or None when none is needed.

    key_padding: (B, S), 1/True for real tokens, 0/False for padding.
    query_pos: (T,) index of each query among the S keys (decoding with a KV cache,
        where the queries are the newest tokens); default: the last T keys.
    Returns (B or 1, 1, T, S) bool, or None for an unmasked bidirectional call.
    window: causal sliding-window attention (Mistral): a query sees the `window` newest keys
        up to its own position, not the older ones.
    Every query may always attend to its own position, so that a row made only of
    padding never becomes all -inf (whose softmax is NaN and would leak into real
    positions through later layers).
    """
    if not causal and key_padding is None:
        return None
    if query_pos is None:
        query_pos = torch.arange(S - T, S, device=device)
    keys = torch.arange(S, device=query_pos.device)
    own = keys[None, :] == query_pos[:, None]  # (T, S)
    mask = keys[None, :] <= query_pos[:, None] if causal else torch.ones_like(own)
    if window is not None:
        mask = mask & (keys[None, :] > query_pos[:, None] - window)  # (T, S)
    if key_padding is not None:
        mask = mask & (key_padding.bool()[:, None, None, :] | own)  # (B, 1, T, S)
    else:
        mask = mask[None, None]  # (1, 1, T, S)
    return mask


def causal_self_mask(T: int, attention_mask: Tensor | None, cache: Sequence[KVCache] | None,
                     cache_pos: Tensor | None, device: torch.device, window: int | None = None) -> Tensor | None:
    """The causal self-attention mask of a decoder's forward pass, or None when SDPA's
    is_causal does the job (no padding, no cache). One place for what a GPT and an
    encoder-decoder's decoder both need.

    attention_mask: None; (B, T) or, with a cache, (B, S_cache) 1 = token, 0 = padding over
        the first S_cache slots (all that attention then reads); or a ready bool mask
        (B or 1, 1, T, S), used as is (a decoding loop that knows its query is the newest slot).
    cache: the layers' KVCaches (their max_len bounds S); cache_pos: (T,) the queries' slots.
    window: sliding-window attention (see build_mask); a mask is needed once T exceeds it.
    """
    if attention_mask is not None and attention_mask.dim() == 4:
        return attention_mask
    if cache is None and attention_mask is None and (window is None or T <= window):
        return None
    S = T
    if cache is not None:
        max_len = cache[0].max_len
        S = max_len if attention_mask is None else attention_mask.size(-1)
        if S > max_len:
            raise ValueError(f"the attention mask covers {S} cache slots, more than the cache's {max_len}")
    return build_mask(T, S, causal=True, key_padding=attention_mask, query_pos=cache_pos, device=device,
                      window=window)


class _Heads(nn.Module):
    """What self- and cross-attention share: head bookkeeping, the output mixing
    `wo`, the scale on Q K^T (None: 1/sqrt(Dh)), and the choice between the fused and
    the reference attention."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int | None, head_dim: int | None,
                 bias: bool, dropout: float, scale: float | None = None) -> None:
        super().__init__()
        self.scale = scale
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads or n_heads
        self.head_dim = head_dim or dim // n_heads
        if n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        self.wo = nn.Linear(self.n_heads * self.head_dim, dim, bias=bias)
        self.dropout = dropout
        # Inspection switch: the reference path exposes the weights SDPA hides.
        self.use_reference = False
        self.last_weights: Tensor | None = None

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, is_causal: bool) -> Tensor:
        p = self.dropout if self.training else 0.0
        if mask is not None and mask.is_floating_point() and mask.dtype != q.dtype:
            mask = mask.to(q.dtype)  # a float mask (a position bias) in the queries' precision under autocast
        if self.use_reference:
            y, self.last_weights = reference_attention(q, k, v, mask, is_causal, p, self.scale)
            return y
        return sdpa(q, k, v, mask, is_causal, p, self.scale)


class SelfAttention(_Heads):
    """Multi-head (or grouped-query) self-attention with one fused QKV projection.

    Each of the H heads attends in its own Dh-wide subspace; their outputs are
    concatenated and mixed by `wo`. With n_kv_heads < n_heads, groups of query
    heads share one key/value head (grouped-query attention), shrinking the KV cache.

    value_embed: the layer takes value embeddings (modded-nanogpt): a table looked up by
    the input tokens, ve (B, T, Hkv * Dh), mixed into the values by two learned scalars,
    v <- l0 * v + l1 * ve (both 0.5 at init), so each token's identity reaches every later
    position directly, without going through the residual stream.
    """

    def __init__(
        self,
        dim: int,
        n_heads: int,
        n_kv_heads: int | None = None,
        head_dim: int | None = None,
        bias: bool = True,
        dropout: float = 0.0,
        qkv_bias: bool | None = None,
        scale: float | None = None,
        value_embed: bool = False,
    ) -> None:
        super().__init__(dim, n_heads, n_kv_heads, head_dim, bias, dropout, scale)
        qkv_dim = (self.n_heads + 2 * self.n_kv_heads) * self.head_dim
        # qkv_bias: biases on the query/key/value projections only (Qwen2); None: as `bias`.
        self.wqkv = nn.Linear(dim, qkv_dim, bias=bias if qkv_bias is None else qkv_bias)
        self.value_mix = nn.Parameter(torch.tensor([0.5, 0.5])) if value_embed else None  # (l0, l1)

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None = None,
        is_causal: bool = False,
        rope: tuple[Tensor, Tensor] | None = None,
        cache: KVCache | None = None,
        cache_pos: Tensor | None = None,
        ve: Tensor | None = None,
    ) -> Tensor:
        """x: (B, T, D) -> (B, T, D).

        mask: bool (B or 1, 1, T, S), or float (B or 1, H or 1, T, S) added to the scores
        (T5's position bias, -inf where masked); is_causal: use SDPA's built-in causal mask
        (only without mask and cache); rope: (cos, sin) each (B or 1, T, Dh);
        cache/cache_pos: write this step's keys/values at slots cache_pos (T,) and
        attend over the first S cache slots, S = the mask's width (all of them without
        a mask). Eager decoding passes a mask over the slots written so far, so that
        attention costs what the sequence needs; a CUDA graph needs fixed shapes and
        passes the whole cache. ve: (B, T, Hkv * Dh) this layer's value embeddings of the
        tokens (a layer built with value_embed only).
        """
        B, T, _ = x.shape
        H, Hkv, Dh = self.n_heads, self.n_kv_heads, self.head_dim
        # One view and one split for the three projections (fewer ops than a split and three views:
        # a one-token decoding step is dominated by per-op overhead, not arithmetic); split_with_sizes
        # is Tensor.split without its Python wrapper.
        qkv = self.wqkv(x).view(B, T, H + 2 * Hkv, Dh).transpose(1, 2)  # (B, H + 2*Hkv, T, Dh)
        q, k, v = qkv.split_with_sizes([H, Hkv, Hkv], dim=1)  # (B, H, T, Dh), (B, Hkv, T, Dh), (B, Hkv, T, Dh)
        q, k = self.normalize(q, k)
        if ve is not None:
            v = self.value_mix[0] * v + self.value_mix[1] * ve.view(B, T, Hkv, Dh).transpose(1, 2)  # (B, Hkv, T, Dh)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(cache_pos, k, v, None if mask is None else mask.size(-1))  # (B, Hkv, S, Dh)
        y = self._attend(q, k, v, mask, is_causal)  # (B, H, T, Dh)
        y = y.transpose(1, 2).reshape(B, T, H * Dh)  # (B, T, H*Dh)
        return self.wo(y)

    def normalize(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """Queries and keys as they enter the scores: as projected (QKNormSelfAttention normalises them)."""
        return q, k


class QKNormSelfAttention(SelfAttention):
    """Self-attention whose queries and keys are RMS-normalised per head before RoPE (Qwen3,
    OLMo 2, modded-nanogpt): q <- RMSNorm(q), k <- RMSNorm(k), each over its Dh dimensions
    with a learned gain. Bounded q.k keeps the attention logits from growing with the
    weights, so training tolerates higher learning rates."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int | None = None, head_dim: int | None = None,
                 bias: bool = True, dropout: float = 0.0, qkv_bias: bool | None = None, eps: float = 1e-6,
                 value_embed: bool = False) -> None:
        super().__init__(dim, n_heads, n_kv_heads, head_dim, bias, dropout, qkv_bias, value_embed=value_embed)
        self.q_norm, self.k_norm = RMSNorm(self.head_dim, eps), RMSNorm(self.head_dim, eps)

    def normalize(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        return self.q_norm(q), self.k_norm(k)  # (B, H, T, Dh), (B, Hkv, T, Dh)


class CrossAttention(_Heads):
    """Decoder-to-encoder attention: queries from the decoder, keys and values from
    the encoder output ("memory"). Same heads and output mixing as `SelfAttention`,
    but the projection is split: `wq` on x, `wkv` on the memory, so that the
    memory's keys and values are computed once per generated sequence. The heads are
    head_dim wide (None: dim // n_heads; T5 sets its own d_kv)."""

    def __init__(self, dim: int, n_heads: int, bias: bool = True, dropout: float = 0.0,
                 head_dim: int | None = None, scale: float | None = None) -> None:
        super().__init__(dim, n_heads, None, head_dim, bias, dropout, scale)
        inner = self.n_heads * self.head_dim
        self.wq = nn.Linear(dim, inner, bias=bias)
        self.wkv = nn.Linear(dim, 2 * inner, bias=bias)

    def project_memory(self, memory: Tensor) -> tuple[Tensor, Tensor]:
        """memory: (B, S, D) -> keys, values, each (B, H, S, Dh)."""
        B, S, _ = memory.shape
        k, v = self.wkv(memory).view(B, S, 2, self.n_heads, self.head_dim).unbind(2)  # (B, S, H, Dh)
        return k.transpose(1, 2), v.transpose(1, 2)  # (B, H, S, Dh)

    def forward(
        self,
        x: Tensor,
        memory: Tensor | None = None,
        mask: Tensor | None = None,
        memory_kv: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """x: (B, T, D), memory: (B, S, D) -> (B, T, D).

        mask: bool (B, 1, 1, S) hiding padded memory positions; memory_kv: the
        output of `project_memory`, passed instead of memory when already computed.
        """
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, Dh)
        k, v = memory_kv if memory_kv is not None else self.project_memory(memory)
        y = self._attend(q, k, v, mask, False)  # (B, H, T, Dh)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))
