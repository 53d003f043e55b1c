"""Config of `none` (no fields: nothing is pruned)."""

from __future__ import annotations

from dataclasses import dataclass

from vlm_tools.core.config import MethodConfig


@dataclass(frozen=True)
class NoneConfig(MethodConfig):
    """The unpruned reference takes no budget."""
