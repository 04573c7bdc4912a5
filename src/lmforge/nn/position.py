"""Where a token is: learned, sinusoidal and rotary position encodings.

Attention by itself is blind to order (permute the tokens and the outputs permute
the same way), so position has to be put in:
- learned: a trainable vector per position, added to the token embedding (GPT-2, BERT, BART);
  RoBERTa's variant (after fairseq) numbers only the real tokens, from pad_id + 1;
- sinusoidal: the fixed PE(pos, 2i) = sin(pos / 10000^(2i/D)),
  PE(pos, 2i+1) = cos(pos / 10000^(2i/D)) of the original Transformer;
- rotary (RoPE): rotate each pair of query/key features by an angle proportional to
  the position, so that q.k depends only on the distance between them (Llama);
- relative bias (T5): a learned scalar per head and per bucket of distance (key - query),
  added to the attention scores; nothing is added to the embeddings.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def sinusoidal_table(n_positions: int, dim: int) -> Tensor:
    """(n_positions, dim): sines in even features, cosines in odd ones, as in the paper."""
    pos = torch.arange(n_positions, dtype=torch.float32)[:, None]  # (P, 1)
    inv_freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(n_positions, dim)
    table[:, 0::2] = torch.sin(pos * inv_freq)
    table[:, 1::2] = torch.cos(pos * inv_freq[: dim // 2])
    return table


class LearnedPositions(nn.Embedding):
    """One trainable D-vector per position: position_ids (B, T) -> (B, T, D)."""


def padding_skipping_ids(input_ids: Tensor, pad_id: int) -> Tensor:
    """(B, T) token ids -> (B, T) position ids that count real tokens only, starting at
    pad_id + 1; every padding token gets pad_id, a row no real token uses (fairseq's
    make_positions, which RoBERTa keeps). With left padding the first real token is still
    at pad_id + 1, so a sequence means the same wherever its padding is."""
    real = input_ids.ne(pad_id)
    return real.cumsum(dim=1) * real + pad_id  # (B, T)


class PaddingSkippingPositions(nn.Embedding):
    """Learned positions numbered by `padding_skipping_ids` (RoBERTa): position_ids (B, T) -> (B, T, D).

    The table has max_seq_len + pad_id + 1 rows: rows 0 .. pad_id - 1 are never used and
    row pad_id is the padding tokens'."""

    def __init__(self, max_seq_len: int, dim: int, pad_id: int) -> None:
        super().__init__(max_seq_len + pad_id + 1, dim)
        self.pad_id = pad_id

    def position_ids(self, input_ids: Tensor) -> Tensor:
        return padding_skipping_ids(input_ids, self.pad_id)


class SinusoidalPositions(nn.Module):
    """The fixed sinusoidal table as a non-trainable, non-saved buffer."""

    def __init__(self, n_positions: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("table", sinusoidal_table(n_positions, dim), persistent=False)

    def forward(self, position_ids: Tensor) -> Tensor:
        """position_ids (B, T) -> (B, T, D)."""
        return self.table[position_ids]


def rope_frequencies(head_dim: int, theta: float = 10000.0, scaling: dict | None = None) -> Tensor:
    """(head_dim // 2,) rotation speeds theta^(-2i/Dh); `scaling` applies Llama 3's
    long-context rule (slow frequencies stretched by `factor`, fast ones kept)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    if scaling:
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - low) / (high - low)
        mixed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        middle = (wavelen <= old_len / low) & (wavelen >= old_len / high)
        inv_freq = torch.where(middle, mixed, inv_freq)
    return inv_freq


class RotaryPositions(nn.Module):
    """cos/sin tables for RoPE, looked up by position: position_ids (B, T) -> 2 x (B, T, Dh)."""

    def __init__(self, n_positions: int, head_dim: int, theta: float = 10000.0, scaling: dict | None = None):
        super().__init__()
        angles = torch.outer(torch.arange(n_positions, dtype=torch.float32),
                             rope_frequencies(head_dim, theta, scaling))  # (P, Dh/2)
        angles = torch.cat([angles, angles], dim=-1)  # (P, Dh): the two halves share angles
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        return self.cos[position_ids], self.sin[position_ids]


def rotate_half(x: Tensor) -> Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x (B, H, T, Dh) by the angles of its positions; cos, sin: (B, T, Dh).

    Feature i is paired with feature i + Dh/2 (the "rotate half" layout Hugging Face
    Llama checkpoints use), so their weights need no permutation.
    """
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)  # (B, 1, T, Dh)
    return x * cos + rotate_half(x) * sin


def relative_position_bucket(relative: Tensor, bidirectional: bool, n_buckets: int, max_distance: int) -> Tensor:
    """T5's buckets of distance (Mesh TensorFlow's rule): relative = key - query positions
    (any shape) -> bucket ids in [0, n_buckets), same shape.

    Bidirectional (an encoder): half the buckets for keys after the query, half for keys
    before it; causal (a decoder): only keys at or before the query have buckets. Of each
    half, the first half of the buckets are exact distances 0, 1, 2, ...; the rest grow
    logarithmically up to max_distance, and everything farther shares the last bucket.
    """
    buckets = torch.zeros_like(relative)
    if bidirectional:
        n_buckets //= 2
        buckets = buckets + (relative > 0).long() * n_buckets
        distance = relative.abs()
    else:
        distance = (-relative).clamp(min=0)  # keys after the query (masked anyway) count as distance 0
    exact = n_buckets // 2
    # log-spaced buckets for exact <= distance < max_distance (the clamp keeps log(0) out of it)
    far = exact + (torch.log(distance.clamp(min=1).float() / exact) / math.log(max_distance / exact)
                   * (n_buckets - exact)).long()
    far = far.clamp(max=n_buckets - 1)
    return buckets + torch.where(distance < exact, distance, far)


class RelativePositionBias(nn.Module):
    """T5's relative position bias: one learned scalar per (bucket, head), looked up by the
    bucket of key - query. (T,) query and (S,) key positions -> (1, H, T, S), to be added to
    the attention scores of every layer of a stack (computed once per forward)."""

    def __init__(self, n_buckets: int, max_distance: int, n_heads: int, bidirectional: bool) -> None:
        super().__init__()
        self.n_buckets, self.max_distance, self.bidirectional = n_buckets, max_distance, bidirectional
        self.weight = nn.Parameter(torch.zeros(n_buckets, n_heads))

    def forward(self, query_pos: Tensor, key_pos: Tensor) -> Tensor:
        relative = key_pos[None, :] - query_pos[:, None]  # (T, S)
        bucket = relative_position_bucket(relative, self.bidirectional, self.n_buckets, self.max_distance)
        return self.weight[bucket].permute(2, 0, 1)[None]  # (T, S, H) -> (1, H, T, S)
