"""Config of `cls_topk`."""

from __future__ import annotations

from dataclasses import dataclass

from vlm_tools.core.config import BudgetConfig


@dataclass(frozen=True)
class ClsTopKConfig(BudgetConfig):
    """`keep` / `ratio` as every method; the score is the head-mean [CLS]->patch attention at the feature layer."""
