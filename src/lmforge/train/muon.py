"""Muon: momentum orthogonalised by Newton-Schulz for the matrices of the Transformer blocks,
AdamW for everything else (embeddings, the LM head, biases, norm gains), in one optimizer.

For a weight matrix W (rows x cols) with gradient G, Muon (Keller Jordan's, as modded-nanogpt
uses it) keeps a momentum buffer M and steps along its orthogonalised Nesterov form:

    M <- beta M + (1 - beta) G
    U <- (1 - beta) G + beta M                      (Nesterov: look one momentum step ahead)
    O <- NS5(U)                                     (U = P S Q^T  ->  about P Q^T)
    W <- (1 - lr wd) W - lr sqrt(max(1, rows / cols)) O

O keeps U's singular vectors and sets every singular value near 1: the update moves all
directions of the matrix at one rate, where Adam's elementwise scaling lets a few large
directions dominate. NS5 is five steps of a quintic Newton-Schulz iteration, from
X = U / ||U||_F (so that every singular value starts in [0, 1]):

    A = X X^T        X <- a X + (b A + c A^2) X        (a, b, c) = (3.4445, -4.7750, 2.0315)

Each step maps every singular value s to a s + b s^3 + c s^5; the coefficients push small
ones up fast and leave all of them in about [0.7, 1.2] (not exactly 1: speed over accuracy).
X is transposed first when it is tall, so that A is the smaller Gram matrix. A fused
projection (attention's wqkv) is orthogonalised block by block, as the separate matrices it
stacks (its parameter group's `split`). Embeddings and the LM head are not hidden-layer
matrices (one row per token, seen only when the token is), and vectors have no singular
values: those follow AdamW, with the group's own lr, betas, eps and weight decay.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # modded-nanogpt's quintic (a, b, c)
NS_STEPS = 5


def newton_schulz(G: Tensor, steps: int = NS_STEPS) -> Tensor:
    """About the orthogonal factor P Q^T of G = P S Q^T (rows x cols), by `steps` quintic
    Newton-Schulz iterations; in bf16 on a GPU (as modded-nanogpt), fp32 elsewhere."""
    a, b, c = NS_COEFFICIENTS
    X = G.to(torch.bfloat16 if G.is_cuda else torch.float32)
    tall = G.size(-2) > G.size(-1)
    if tall:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # singular values in [0, 1]
    for _ in range(steps):
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return (X.mT if tall else X).to(G.dtype)


def orthogonalised_update(update: Tensor, split: tuple[int, ...] | None = None) -> Tensor:
    """NS5 of `update`, scaled by sqrt(max(1, rows / cols)) (so a tall matrix's update has the
    RMS of a square one's); with `split`, of each block of rows on its own (a fused projection)."""
    blocks = update.split(list(split), dim=0) if split else (update,)
    return torch.cat([newton_schulz(u) * math.sqrt(max(1.0, u.size(0) / u.size(1))) for u in blocks])


class Muon(torch.optim.Optimizer):
    """Muon for the parameter groups with use_muon=True (2-D weights), AdamW for the others.

    Every group has lr, weight_decay, betas, eps (AdamW's), momentum (Muon's beta) and
    use_muon; a Muon group may have split (row sizes of the stacked matrices of a fused
    projection). One optimizer, so that one LR schedule (LambdaLR) scales every group's
    own peak lr, and one state dict holds both.
    """

    def __init__(self, param_groups: list[dict], lr: float = 3e-4, betas: tuple[float, float] = (0.9, 0.95),
                 eps: float = 1e-8, weight_decay: float = 0.0, momentum: float = 0.95) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, momentum=momentum, use_muon=False,
                        split=None)
        super().__init__(param_groups, defaults)
        for group in self.param_groups:
            if group["use_muon"] and any(p.ndim != 2 for p in group["params"]):
                raise ValueError("Muon orthogonalises matrices: a use_muon group holds a parameter that is not 2-D")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    (self._muon if group["use_muon"] else self._adamw)(p, group)
        return loss

    def _muon(self, p: Tensor, group: dict) -> None:
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p)
        buf, g, beta = state["momentum_buffer"], p.grad, group["momentum"]
        buf.lerp_(g, 1 - beta)  # M <- beta M + (1 - beta) G
        update = g.lerp(buf, beta)  # U <- (1 - beta) G + beta M
        p.mul_(1 - group["lr"] * group["weight_decay"])
        p.add_(orthogonalised_update(update, group["split"]), alpha=-group["lr"])

    def _adamw(self, p: Tensor, group: dict) -> None:
        """torch.optim.AdamW's update, written out (the tests check they agree)."""
        state = self.state[p]
        if "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
        (b1, b2), g = group["betas"], p.grad
        state["step"] += 1
        t = state["step"].item()  # host sync: a CPU scalar (the state's step count), no device wait
        state["exp_avg"].lerp_(g, 1 - b1)
        state["exp_avg_sq"].mul_(b2).addcmul_(g, g, value=1 - b2)
        p.mul_(1 - group["lr"] * group["weight_decay"])
        denom = (state["exp_avg_sq"].sqrt() / math.sqrt(1 - b2**t)).add_(group["eps"])
        p.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / (1 - b1**t))
