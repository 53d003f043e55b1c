"""Config of `divprune`."""

from __future__ import annotations

from dataclasses import dataclass

from vlm_tools.core.config import BudgetConfig


@dataclass(frozen=True)
class DivPruneConfig(BudgetConfig):
    """`keep` / `ratio` as every method.

    Attributes:
        metric: "cosine" (the paper) or "l2" distance between the feature-layer tokens.
    """

    metric: str = "cosine"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.metric not in ("cosine", "l2"):
            raise ValueError(f"metric must be 'cosine' or 'l2', got {self.metric!r}")
