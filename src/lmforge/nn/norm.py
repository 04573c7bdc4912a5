"""Normalisation layers: LayerNorm (GPT-2, BERT, BART) and RMSNorm (Llama).

LayerNorm(x) = (x - mean) / sqrt(var + eps) * weight + bias
RMSNorm(x)   = x / sqrt(mean(x^2) + eps) * weight   (no centring, no bias)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        """(..., D) -> (..., D); the statistics in fp32 even under bf16 autocast."""
        y = F.rms_norm(x.float(), (x.size(-1),), eps=self.eps)
        return self.weight * y.to(x.dtype)


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm calling the kernel directly: F.layer_norm's Python-side checks cost about
    a microsecond per call, and a one-token decoding step makes two per block. Same
    parameters, state-dict keys and results (torch.layer_norm still dispatches tensor
    subclasses and autocast)."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


def make_norm(kind: str, dim: int, eps: float, bias: bool = True) -> nn.Module:
    """kind: "layernorm" or "rmsnorm"."""
    if kind == "layernorm":
        return LayerNorm(dim, eps=eps, bias=bias)
    if kind == "rmsnorm":
        return RMSNorm(dim, eps=eps)
    raise ValueError(f"norm: unknown kind {kind!r} (expected 'layernorm' or 'rmsnorm')")
