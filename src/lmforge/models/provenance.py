"""Which tensors of a model hold learned values: the record that keeps exports honest.

A tensor is *untrained* when it was neither loaded from a checkpoint nor trained: the
MLM and NSP heads of a BERT read from a plain `BertModel` checkpoint, the untied LM head
of a `LlamaModel` one, the NSP head of a BERT pretrained with MLM only. Such a tensor
still has its random initialisation, so an export must not present it as trained (a
`BertForPreTraining` whose heads are noise predicts noise, silently). The record is a set
of tensor names relative to the backbone, kept on the backbone module itself, so that it
survives attaching a task head, LoRA wrapping and merging (which keep the module), and is
saved in lmforge's config.json. A model built in Python carries no record: all of it
counts as trained (the caller trained it).
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

_ATTR = "lmforge_untrained"


def untrained(backbone: nn.Module) -> frozenset[str]:
    """Names (relative to the backbone) of the tensors neither loaded nor trained."""
    return frozenset(getattr(backbone, _ATTR, ()))


def set_untrained(backbone: nn.Module, names: Iterable[str]) -> None:
    """Record `names` (relative to the backbone) as untrained, replacing any earlier record."""
    object.__setattr__(backbone, _ATTR, frozenset(names))


def mark_trained(backbone: nn.Module, names: Iterable[str]) -> None:
    """`names` (relative to the backbone) are being trained: they leave the untrained set."""
    set_untrained(backbone, untrained(backbone) - set(names))


def mark_trainable_as_trained(model: nn.Module, backbone: nn.Module) -> None:
    """Every backbone parameter that will receive updates (requires_grad) counts as trained.
    `model` is the module that trains (the backbone itself, or a task head wrapping it)."""
    prefix = "" if model is backbone else "backbone."
    trained = [name.removeprefix(prefix) for name, p in model.named_parameters(remove_duplicate=False)
               if p.requires_grad and name.startswith(prefix)]
    mark_trained(backbone, trained)
