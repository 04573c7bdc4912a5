"""Plain attributes for a module tree's submodules, parameters and buffers, for a while.

nn.Module keeps submodules, parameters and buffers in registries (`_modules`,
`_parameters`, `_buffers`) that `self.name` reaches through `nn.Module.__getattr__`,
which Python calls only after its normal lookup has failed -- and on CPython 3.11
that failure first builds an AttributeError with a formatted message. Each such access
costs a microsecond or two. A one-token decoding step of a small model makes about
25 of them per block (self.attn, self.wqkv, self.weight, self.bias, ...): measured
with callgrind, a quarter of all the instructions of a 4-layer dim-192 GPT's step.

`direct_attributes` puts each registry entry into the instance's own __dict__ as
well, where the normal lookup finds it at once, and removes them on exit. They are
the very same objects, so nothing computed changes -- except that a dropout which is the
identity (eval mode, or p = 0) is put there as the identity function itself, sparing
nn.Module.__call__ and F.dropout three times a block; and nn.Module.__setattr__ drops
an instance attribute of the same name whenever a submodule or parameter is
reassigned (a LoRA wrapper put in, a weight retied), so such a reassignment made
meanwhile is still seen (a buffer reassigned meanwhile is not: tensors are updated in
place in inference loops). Meant for eager inference loops that do not reshape the
model while they run. A tree with compiled parts (torch.compile'd forwards, whose
guards watch module attributes) is left as it is.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import Tensor, nn


def _identity(x: Tensor) -> Tensor:
    return x


def _no_op_dropout(module: object) -> bool:
    return isinstance(module, nn.Dropout) and (not module.training or module.p == 0)


@contextlib.contextmanager
def direct_attributes(*roots: nn.Module) -> Iterator[None]:
    """Within the block, every module under `roots` also holds its registered children,
    parameters and buffers as plain attributes (the same objects)."""
    added: list[tuple[dict, str]] = []
    modules = [module for root in roots for module in root.modules()]
    if any("forward" in m.__dict__ or m.__dict__.get("_compiled_call_impl") is not None for m in modules):
        modules = []  # a forward replaced (compiled, wrapped): leave the tree alone
    try:
        for module in modules:
            own = module.__dict__
            for registry in (module._modules, module._parameters, module._buffers):
                for name, value in registry.items():
                    if name not in own:  # already there: someone else's, or an enclosing call's
                        own[name] = _identity if _no_op_dropout(value) else value
                        added.append((own, name))
        yield
    finally:
        for own, name in added:
            own.pop(name, None)
