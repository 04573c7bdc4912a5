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

    def update(self, pos: Tensor, k: Tensor, v: Tensor, length: int | None = None) -> tuple[Tensor, Tensor]:
        """Write k, v (B, Hkv, T, Dh) at slots pos (T,); return the first `length` slots of the
        cache (B, Hkv, length, Dh), views without a copy (None: all S_max of them)."""
        # Each buffer fetched once: nn.Module attribute lookups are slow enough to show in a decode step.
        k_all, v_all = self.k, self.v
        k_all.index_copy_(2, pos, k if k.dtype == k_all.dtype else k.to(k_all.dtype))
        v_all.index_copy_(2, pos, v if v.dtype == v_all.dtype else v.to(v_all.dtype))
        if length is None or length == k_all.size(2):
            return k_all, v_all
        return k_all.narrow(2, 0, length), v_all.narrow(2, 0, length)

    def reorder(self, index: Tensor) -> None:
        """Keep the batch rows in `index` (B,), in that order: beam search's re-ranking."""
        self.k.copy_(self.k.index_select(0, index))
        self.v.copy_(self.v.index_select(0, index))
