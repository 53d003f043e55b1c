"""`divprune`: keep the most diverse tokens (greedy max-min distance, DivPrune, arXiv 2503.02175)."""

from __future__ import annotations

import torch

from vlm_tools._registry import register_method
from vlm_tools.core.method import current_index
from vlm_tools.pruning.base import Pruner
from vlm_tools.pruning.divprune.config import DivPruneConfig


def max_min_select(x: torch.Tensor, k: int, metric: str) -> torch.Tensor:
    """Greedy max-min diversity: start with the token farthest from the others, then repeatedly add the token whose
    distance to the kept set is largest. Returns `k` row indices of `x` `(n, d)`."""
    x = x.float()
    if metric == "cosine":
        x = torch.nn.functional.normalize(x, dim=-1)
        dist = 1.0 - x @ x.T
    else:
        dist = torch.cdist(x, x)
    picked = [int(dist.sum(1).argmax())]
    nearest = dist[picked[0]].clone()
    for _ in range(k - 1):  # a kept token's distance to the kept set is 0, so it is never picked again
        nxt = int(nearest.argmax())
        picked.append(nxt)
        nearest = torch.minimum(nearest, dist[nxt])
    return torch.tensor(picked)


@register_method("divprune", kind="vision", config=DivPruneConfig,
                 description="DivPrune: the most diverse tokens by greedy max-min distance")
class DivPrune(Pruner):
    """Per vision row, the `budget` tokens of maximal minimum pairwise distance (spatial order kept)."""

    def select(self, features, ctx, adapter):
        plan = ctx.plan
        idx = current_index(ctx, features.device)
        out = []
        for r in range(plan.n_rows):
            cand = torch.nonzero(plan.valid[r].to(idx.device)[idx[r]]).flatten()
            k = min(int(plan.budget[r]), cand.numel())
            picked = max_min_select(features[r, cand], k, self.config.metric).to(cand.device)
            out.append(idx[r, cand[picked]].sort().values)
        return out
