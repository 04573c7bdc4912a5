"""What every family's architecture config shares: validation and vocabulary padding; and
the label value every loss skips."""

from __future__ import annotations

import dataclasses
from typing import Any

IGNORE_INDEX = -100  # a label no loss counts (torch.nn.functional.cross_entropy's default ignore_index)


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class ArchConfig:
    """Mixin for the per-family config dataclasses (architecture only)."""

    vocab_size: int
    vocab_multiple: int

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding and LM head: a multiple of `vocab_multiple` (128), which
        keeps the biggest matrix multiply on fast tensor-core tile sizes. The extra rows
        are never produced as logits."""
        return round_up(self.vocab_size, self.vocab_multiple)

    def _check_positive(self, *names: str) -> None:
        for name in names:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{type(self).__name__}.{name} must be a positive integer, got {value!r}")

    def _check_choice(self, name: str, choices: tuple[str, ...]) -> None:
        if getattr(self, name) not in choices:
            raise ValueError(f"{type(self).__name__}.{name} must be one of {choices}, got {getattr(self, name)!r}")

    def _check_heads(self, dim_name: str = "dim") -> None:
        dim, heads = getattr(self, dim_name), self.n_heads
        if getattr(self, "head_dim", None) is None and dim % heads:
            raise ValueError(f"{type(self).__name__}.{dim_name} ({dim}) must be divisible by n_heads ({heads})")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        """Build from a dict, refusing unknown keys by name (a typo must not pass silently)."""
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}; known: {sorted(known)}")
        return cls(**d)
