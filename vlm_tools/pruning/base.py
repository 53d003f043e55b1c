"""Pruner base: budget configs, the per-call context, and shared selection helpers.

A method is a `Pruner` subclass registered with `@register_method`. `WrappedModel` drives it per call:
1. `attach(model, adapter, slot)` (once, at wrap time) registers hooks on the instance; each hook reads the
   per-call `CallContext` from `slot.ctx` and does nothing when it is `None` (outside a wrapped call);
2. the vision tower runs; hooks score (and may shorten the sequence, updating `ctx.token_index`);
3. `select(features, ctx)` returns, per vision row, the sorted original patch indices to keep;
4. the kept features are projected and packed; the LLM runs (LLM-stage methods act through their hooks).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import torch
from torch import nn

from vlm_tools.core.adapters import ModelAdapter, VisionPlan
from vlm_tools.core.hooks import HookHandle

__all__ = ["BudgetConfig", "Pruner", "CallContext", "ContextSlot", "topk_rows", "all_rows", "row_seed"]


@dataclass(frozen=True)
class BudgetConfig:
    """Token budget shared by every pruning method.

    Attributes:
        keep: visual tokens kept per image (LLaVA-NeXT: summed over its crops, newlines excluded).
        ratio: fraction of the visual tokens removed, in (0, 1). Give `keep` or `ratio`, not both.
    """

    keep: int | None = None
    ratio: float | None = None

    def __post_init__(self) -> None:
        if self.keep is not None and self.ratio is not None:
            raise ValueError(f"give keep= or ratio=, not both (got keep={self.keep}, ratio={self.ratio})")
        if self.keep is None and self.ratio is None:
            raise ValueError("a token budget is required: keep= (tokens kept per image) or ratio= (fraction removed)")
        if self.keep is not None:
            if isinstance(self.keep, bool) or not isinstance(self.keep, int):
                raise TypeError(f"keep must be an int, got {type(self.keep).__name__}")
            if self.keep <= 0:
                raise ValueError(f"keep must be a positive number of tokens per image, got {self.keep}")
        if self.ratio is not None:
            if not isinstance(self.ratio, (int, float)) or isinstance(self.ratio, bool):
                raise TypeError(f"ratio must be a float, got {type(self.ratio).__name__}")
            if not 0.0 < float(self.ratio) < 1.0:
                raise ValueError(f"ratio is the fraction of visual tokens removed and must lie in (0, 1), "
                                 f"got {self.ratio}")

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class CallContext:
    """State of one wrapped call; created and cleared by `WrappedModel` in try/finally.

    Attributes:
        plan: layout of the vision batch and per-row budgets.
        state: method scratch space (scores, per-layer statistics).
        token_index: `(rows, T)` original patch index of each patch token at the tower output; `None` means
            all patches in order. Methods that shorten the tower sequence set it.
        layer_tokens: `(where, tokens per row)` records for the trace.
        lm_spans: per sample, `(start, length, image index)` of each image's placeholder run in the LLM input.
        kept: per vision row, the kept original patch indices (set by the wrapper after `select`).
        llm_kept: per sample and image, kept indices decided inside the LLM (LLM-stage methods).
    """

    plan: VisionPlan | None = None
    state: dict = field(default_factory=dict)
    token_index: torch.Tensor | None = None
    layer_tokens: list[tuple[str, list[int]]] = field(default_factory=list)
    lm_spans: list[list[tuple[int, int, int]]] | None = None
    kept: list[torch.Tensor] | None = None
    llm_kept: dict | None = None
    pixel_rows: torch.Tensor | None = None
    prefill_end: float | None = None


class ContextSlot:
    """Holds the current `CallContext` of one wrapped model (None between calls)."""

    __slots__ = ("ctx",)

    def __init__(self) -> None:
        self.ctx: CallContext | None = None


class Pruner:
    """Base class of every method. Subclasses set nothing by hand: `@register_method` sets name/kind/config_cls."""

    name: ClassVar[str] = ""
    kind: ClassVar[str] = ""
    config_cls: ClassVar[type] = BudgetConfig

    def __init__(self, config: Any) -> None:
        self.config = config

    @property
    def selects(self) -> bool:
        """Whether this method chooses visual tokens before the LLM (vision and projector stages)."""
        return self.kind in ("vision", "projector")

    def attach(self, model: nn.Module, adapter: ModelAdapter, slot: ContextSlot) -> HookHandle:
        """Register the method's hooks on the model instance. Default: none."""
        return HookHandle(self.name)

    @classmethod
    def example_config(cls, model: nn.Module, workdir: str | None = None) -> dict[str, Any]:
        """A small valid config for `model` (used by `vlm-tools demo` and the contract tests)."""
        if issubclass(cls.config_cls, BudgetConfig):
            from vlm_tools.core.adapters import get_adapter

            return {"keep": max(1, get_adapter(model).n_patches // 8)}
        return {}

    def check(self, adapter: ModelAdapter) -> None:
        """Raise a clear error if the method cannot run on this model (called before attaching)."""

    def select(self, features: torch.Tensor, ctx: CallContext, adapter: ModelAdapter) -> list[torch.Tensor]:
        """Kept original patch indices per vision row (sorted). `features`: `(rows, T, D)` feature-layer patches."""
        return all_rows(ctx)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"


def current_index(ctx: CallContext, device) -> torch.Tensor:
    """`(rows, T)` original patch index of each current patch token."""
    if ctx.token_index is not None:
        return ctx.token_index
    plan = ctx.plan
    return torch.arange(plan.n_patches, device=device).expand(plan.n_rows, -1)


def all_rows(ctx: CallContext) -> list[torch.Tensor]:
    """Every current patch of every row (nothing pruned)."""
    idx = current_index(ctx, ctx.plan.valid.device)
    return [idx[r] for r in range(idx.shape[0])]


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
