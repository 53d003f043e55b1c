"""`random`: a seeded uniform choice of `budget` valid patches per crop (the baseline every method must beat)."""

from __future__ import annotations

import torch

from vlm_tools._registry import register_method
from vlm_tools.core.method import current_index
from vlm_tools.pruning.base import Pruner, row_seed
from vlm_tools.pruning.random.config import RandomConfig


@register_method("random", kind="vision", config=RandomConfig,
                 description="seeded uniform random choice of patches (baseline)")
class RandomPruner(Pruner):
    """Uniform random selection, seeded per crop by (seed, pixels)."""

    def select(self, features, ctx, adapter):
        plan = ctx.plan
        idx = current_index(ctx, features.device)
        out = []
        for r in range(plan.n_rows):
            cand = idx[r][plan.valid[r].to(idx.device)[idx[r]]]
            gen = torch.Generator().manual_seed(row_seed(self.config.seed, ctx.pixel_rows[r]))
            order = torch.randperm(cand.numel(), generator=gen).to(cand.device)
            out.append(cand[order[: int(plan.budget[r])]].sort().values)
        return out
