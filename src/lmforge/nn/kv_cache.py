"""A preallocated key/value cache, indexed by position.

During generation each new token's keys and values are written into fixed slots
of a buffer sized for the longest sequence, instead of concatenating tensors that
grow every step. Fixed shapes and fixed addresses are what let the one-token
decode step be captured once as a CUDA graph and replayed.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class KVCache(nn.Module):
    """Keys and values of one attention layer: two (B, Hkv, S_max, Dh) buffers."""

    def __init__(
        self,
        batch_size: int,
        n_kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def max_len(self) -> int:
        return self.k.size(2)

    def update(self, pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v (B, Hkv, T, Dh) at slots pos (T,); return the whole cache (B, Hkv, S_max, Dh)."""
        self.k.index_copy_(2, pos, k.to(self.k.dtype))
        self.v.index_copy_(2, pos, v.to(self.v.dtype))
        return self.k, self.v

    def reorder(self, index: Tensor) -> None:
        """Keep the batch rows in `index` (B,), in that order: beam search's re-ranking."""
        self.k.copy_(self.k.index_select(0, index))
        self.v.copy_(self.v.index_select(0, index))
