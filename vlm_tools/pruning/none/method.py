"""`none`: every visual token is kept; runs the same prepare step, so timings and traces compare like for like."""

from __future__ import annotations

from vlm_tools._registry import register_method
from vlm_tools.pruning.base import Pruner
from vlm_tools.pruning.none.config import NoneConfig


@register_method("none", kind="vision", config=NoneConfig,
                 description="unpruned reference through the same code path (all visual tokens kept)")
class NoPruning(Pruner):
    """Keeps every visual token (selects nothing: the core keeps every row)."""

    @property
    def selects(self) -> bool:
        return False
