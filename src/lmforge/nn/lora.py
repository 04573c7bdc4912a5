"""LoRA: low-rank adapters on chosen linear layers (Hu et al. 2021, "LoRA: Low-Rank
Adaptation of Large Language Models").

A frozen projection W (out, in) gets a trainable low-rank update:

    y = x W^T + b + (alpha / r) * (dropout(x) A^T) B^T        A: (r, in), B: (out, r)

A starts random (Kaiming-uniform, as in the reference implementation) and B at zero, so
the wrapped model computes exactly what the original did until training moves B. Only
r * (in + out) numbers per layer train instead of in * out. After training,
`merge_lora` folds (alpha / r) B A into W and puts plain nn.Linear layers back: the
exported model needs no adapter code and runs at the original speed.

Targets are lmforge's module names (the last component of the dotted name): `wqkv`, `wo`
(self-attention), `wq`, `wkv` (cross-attention), `up`, `down`, `gate` (MLP).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LORA_PARAMS = ("lora_A", "lora_B")


class LoRALinear(nn.Linear):
    """An nn.Linear whose weight and bias are the frozen originals, plus the adapter A, B.

    It is still an nn.Linear (same `weight` / `bias` names, so state-dict keys of the base
    layer do not move); lora_A (r, in) and lora_B (out, r) are added beside them.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        nn.Module.__init__(self)
        if rank < 1:
            raise ValueError(f"lora_rank must be >= 1, got {rank}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # the same Parameter objects, frozen
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's own init, as the LoRA reference
        self.lora_dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        """x (..., in) -> (..., out)."""
        update = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)  # (..., out) via (..., r)
        return F.linear(x, self.weight, self.bias) + self.scale * update

    def merged_weight(self) -> Tensor:
        """W + (alpha / r) B A, computed in at least fp32 and cast back to W's dtype."""
        dtype = torch.promote_types(self.weight.dtype, torch.float32)
        delta = self.lora_B.to(dtype) @ self.lora_A.to(dtype)  # (out, in)
        return (self.weight.to(dtype) + self.scale * delta).to(self.weight.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}"


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


def apply_lora(model: nn.Module, targets: Sequence[str], rank: int, alpha: float, dropout: float = 0.0) -> list[str]:
    """Wrap every nn.Linear of `model` whose last name component is in `targets` (in place).

    The wrapped weights are frozen; the adapters are trainable. Freezing the rest of the
    model is the caller's choice (the fine-tuning driver freezes the backbone).
    Returns the wrapped modules' names; raises ValueError when a target matches nothing.
    """
    if rank < 1:
        raise ValueError(f"lora_rank must be >= 1, got {rank}")
    targets = list(targets)
    if not targets:
        raise ValueError("lora_targets: give at least one module name (e.g. wqkv, wo)")
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    found = {t: [n for n, m in linears.items() if n.rsplit(".", 1)[-1] == t and not isinstance(m, LoRALinear)]
             for t in targets}
    missing = [t for t, names in found.items() if not names]
    if missing:
        available = sorted({n.rsplit(".", 1)[-1] for n in linears})
        raise ValueError(f"lora_targets: no linear layer named {missing[0]!r} in the model; "
                         f"available: {', '.join(available)}")
    wrapped = sorted({n for names in found.values() for n in names})
    for name in wrapped:
        _replace(model, name, LoRALinear(linears[name], rank, alpha, dropout))
    return wrapped


def wrap_linear(model: nn.Module, name: str, rank: int, alpha: float, dropout: float = 0.0) -> LoRALinear:
    """Wrap the one nn.Linear called `name` (a dotted module name) in place; returns the wrapper."""
    layer = model.get_submodule(name)
    if not isinstance(layer, nn.Linear) or isinstance(layer, LoRALinear):
        raise ValueError(f"{name} is not a plain linear layer")
    wrapped = LoRALinear(layer, rank, alpha, dropout)
    _replace(model, name, wrapped)
    return wrapped


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight (W += (alpha / r) B A) and put a plain nn.Linear
    (holding the same weight and bias Parameters) back in its place. In place; returns model."""
    for name, layer in lora_layers(model).items():
        layer.weight.copy_(layer.merged_weight())
        plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                          device="meta")  # no allocation: the Parameters are swapped in next
        plain.weight, plain.bias = layer.weight, layer.bias
        _replace(model, name, plain)
    return model


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Only the adapter tensors ({...}.lora_A, {...}.lora_B), e.g. to save a small adapter file."""
    return {k: v for k, v in model.state_dict().items() if k.rsplit(".", 1)[-1] in LORA_PARAMS}
