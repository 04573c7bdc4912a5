"""Dropout that costs nothing when it does nothing.

nn.Dropout is the identity in eval mode and at p = 0, but calling the module still goes
through nn.Module.__call__ and F.dropout: a few microseconds each time. A one-token
decoding step of a small model is a few hundred microseconds and passes 3 dropouts per
block, so the calls alone cost ~5% of it. `dropout` skips them; when it does call the
module the result is the module's own (same random numbers, same RNG consumption).
"""

from __future__ import annotations

from torch import Tensor, nn


def dropout(module: nn.Dropout, x: Tensor) -> Tensor:
    """module(x), without the call when it would return x unchanged (eval mode or p = 0)."""
    return module(x) if module.training and module.p > 0 else x
