"""Config of `none` (no fields: nothing is pruned)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class NoneConfig:
    """The unpruned reference takes no budget."""

    def to_dict(self) -> dict:
        return {}
