"""Dropout that costs nothing when it does nothing.

nn.Dropout is the identity in eval mode and at p = 0, but calling the module still goes
through nn.Module.__call__ and F.dropout: a few microseconds each time. A one-token
decoding step of a small model is a few hundred microseconds and passes 3 dropouts per
block, so the calls alone cost ~5% of it. `dropout` skips them; when it does call the
module the result is the module's own (same random numbers, same RNG consumption).

Callers pass `self.drop if self.training else None`: even looking a submodule up costs
(nn.Module.__getattr__ runs after Python's own lookup has failed and built an
AttributeError), so eval mode does not touch the module at all.
"""

from __future__ import annotations

from torch import Tensor, nn


def dropout(module: nn.Dropout | None, x: Tensor) -> Tensor:
    """module(x), without the call when it would return x unchanged (no module, eval mode or p = 0)."""
    return x if module is None or not module.training or module.p == 0 else module(x)
