"""Pruning methods: the `Pruner` base and the selection helpers every pruning method shares.

A pruning method is a `Pruner` (a `vlm_tools.core.method.Method` of kind "vision", "projector" or "llm") with a
`BudgetConfig` subclass as its config, registered with one `@register_method(...)` line. The protocol, the typed
per-call context and the order in which the core calls a method are documented in `vlm_tools.core.method`.
"""

from __future__ import annotations

import zlib

import torch

from vlm_tools.core.method import CallContext, Method, current_index

__all__ = ["Pruner", "topk_rows", "row_seed"]


class Pruner(Method):
    """Base class of the token-pruning methods (kinds "vision", "projector", "llm")."""


def topk_rows(scores: torch.Tensor, ctx: CallContext) -> list[torch.Tensor]:
    """Per row, the `budget[row]` highest-scoring valid current tokens, as sorted original patch indices.

    Args:
        scores: `(rows, T)` scores of the current patch tokens (higher is kept); compared in fp32.
        ctx: the call context (budgets, valid positions, current token index).
    """
    plan = ctx.plan
    idx = current_index(ctx, scores.device)
    valid = plan.valid.to(scores.device).gather(1, idx)
    s = scores.float().masked_fill(~valid, float("-inf"))
    out = []
    for r in range(s.shape[0]):
        k = int(plan.budget[r])
        top = torch.topk(s[r], k=min(k, s.shape[1]), sorted=False).indices
        out.append(idx[r, top].sort().values)
    return out


def row_seed(seed: int, pixels: torch.Tensor) -> int:
    """A seed for one vision row that depends on the user seed and the row's pixels only (batch-invariant)."""
    data = pixels.detach().float().cpu().contiguous().numpy().tobytes()
    return (int(seed) * 1_000_003 + zlib.crc32(data)) % (2**63 - 1)
