"""Config of `random`."""

from __future__ import annotations

from dataclasses import dataclass

from vlm_tools.core.config import BudgetConfig


@dataclass(frozen=True)
class RandomConfig(BudgetConfig):
    """`keep` / `ratio` as every method.

    Attributes:
        seed: base seed; each crop's choice is seeded by (seed, its pixels), so it is reproducible and does not
            depend on the batch the image is in.
    """

    seed: int = 0
