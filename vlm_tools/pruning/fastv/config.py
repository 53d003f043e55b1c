"""Config of `fastv`."""

from __future__ import annotations

from dataclasses import dataclass

from vlm_tools.core.config import BudgetConfig


@dataclass(frozen=True)
class FastVConfig(BudgetConfig):
    """`keep` / `ratio` as every method (FastV's R is `ratio`: the fraction of image tokens dropped).

    Attributes:
        layer: K, the first decoder layer that runs without the dropped tokens (FastV's headline K=2). The ranking
            is the head-mean attention the last token pays to each image token inside layer K-1, so K >= 1; and
            K must be below the number of decoder layers (checked when attaching).
    """

    layer: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.layer, bool) or not isinstance(self.layer, int):
            raise TypeError(f"layer must be an int, got {type(self.layer).__name__}")
        if self.layer < 1:
            raise ValueError(f"layer (K) must be >= 1: the ranking reads the attention of layer K-1, got {self.layer}")
