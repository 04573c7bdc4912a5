"""Position-wise feed-forward networks: FFN(x) = W2 act(W1 x) and the gated ones,
FFN(x) = W2 (act(W_gate x) * W1 x): SwiGLU (act = SiLU, Llama), GEGLU (GELU, T5 v1.1).

act = relu2, ReLU(x)^2 (Primer; modded-nanogpt's MLP): as cheap as ReLU, smooth at 0 to first
order, and sparse; a plain MLP with it matches a gated one without the third matrix.

The MLP is where most parameters live (2 * D * F, with F usually 4D); it acts on
each position independently.
"""

from __future__ import annotations

import functools

import torch.nn.functional as F
from torch import Tensor, nn


def relu2(x: Tensor) -> Tensor:
    """ReLU(x)^2, elementwise."""
    return F.relu(x).square()


ACTIVATIONS = {
    "gelu": F.gelu,  # exact (erf) GELU: BERT, BART
    "gelu_tanh": functools.partial(F.gelu, approximate="tanh"),  # GPT-2's "gelu_new"
    "relu": F.relu,  # the original Transformer
    "silu": F.silu,
    "relu2": relu2,  # squared ReLU (Primer, modded-nanogpt); transformers' "relu2"
}


def activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"activation: unknown {name!r} (expected one of {sorted(ACTIVATIONS)})")
    return ACTIVATIONS[name]


class MLP(nn.Module):
    """x -> down(dropout(act(up(x)))): (B, T, D) -> (B, T, D) through width F."""

    def __init__(self, dim: int, hidden_dim: int, act: str = "gelu", bias: bool = True, dropout: float = 0.0):
        super().__init__()
        self.up = nn.Linear(dim, hidden_dim, bias=bias)
        self.down = nn.Linear(hidden_dim, dim, bias=bias)
        self.act = activation(act)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(self.dropout(self.act(self.up(x))))


class GatedMLP(nn.Module):
    """x -> down(dropout(act(gate(x)) * up(x))): a gated MLP. (B, T, D) -> (B, T, D).

    The gate decides, feature by feature, how much of the linear branch passes; with a third
    matrix, F is usually shrunk (Llama: 8D/3) to keep the parameter count of a plain MLP."""

    def __init__(self, dim: int, hidden_dim: int, act: str = "silu", bias: bool = False, dropout: float = 0.0):
        super().__init__()
        self.gate = nn.Linear(dim, hidden_dim, bias=bias)
        self.up = nn.Linear(dim, hidden_dim, bias=bias)
        self.down = nn.Linear(hidden_dim, dim, bias=bias)
        self.act = activation(act)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(self.dropout(self.act(self.gate(x)) * self.up(x)))


class SwiGLU(GatedMLP):
    """x -> down(silu(gate(x)) * up(x)): the gated MLP of Llama."""

    def __init__(self, dim: int, hidden_dim: int, bias: bool = False, dropout: float = 0.0):
        super().__init__(dim, hidden_dim, "silu", bias, dropout)


MLP_KINDS = ("mlp", "swiglu", "gated")


def make_mlp(kind: str, dim: int, hidden_dim: int, act: str, bias: bool, dropout: float = 0.0) -> nn.Module:
    """kind: "mlp" (with activation `act`), "swiglu" (SiLU-gated) or "gated" (gated by `act`:
    "gelu_tanh" is T5 v1.1's gated-gelu)."""
    if kind == "mlp":
        return MLP(dim, hidden_dim, act, bias, dropout)
    if kind == "swiglu":
        return SwiGLU(dim, hidden_dim, bias, dropout)
    if kind == "gated":
        return GatedMLP(dim, hidden_dim, act, bias, dropout)
    raise ValueError(f"mlp: unknown kind {kind!r} (expected one of {MLP_KINDS})")
