"""`zoo_prune`: ZOO-Prune at the projector (Kim et al., arXiv 2509.24837).

Per vision row (the image on LLaVA-1.5, each crop on LLaVA-NeXT, with the plan's per-crop budget and only the
positions that reach the LLM as candidates): the sensitivity of the real projector at each feature-layer token
(zeroth-order central differences, or the closed-form Jacobian expectation; see `scores`), min-max normalised over
the row, then the greedy sensitivity-aware diverse selection on the projected features. Newline tokens of
LLaVA-NeXT are added by the core's packing and always kept. Rows are scored one at a time with the same chunking,
so a row's choice does not depend on the batch it is in. The direction bank is seeded (`seed`) and shared by all
tokens, rows and calls. The Jacobian estimator's per-model matrix is cached inside this method object, keyed by
the projector instance (weakly) and its weights' storage and version counters, so an in-place weight update is
noticed; so are the fp32 weight copies used to difference a bf16/fp16 projector in fp32 (`upcast`).
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from vlm_tools._registry import register_method
from vlm_tools.core.adapters import ModelAdapter
from vlm_tools.core.method import CallContext, current_index
from vlm_tools.pruning.base import Pruner
from vlm_tools.pruning.zoo_prune.config import ZooPruneConfig
from vlm_tools.pruning.zoo_prune.scores import (
    jacobian_gram,
    jacobian_sensitivity,
    minmax,
    projector_parts,
    random_directions,
    sads_select,
    zeroth_order_sensitivity,
)

__all__ = ["ZooPrune"]


@register_method("zoo_prune", kind="projector", config=ZooPruneConfig,
                 description="ZOO-Prune: projector sensitivity (zeroth-order or closed-form Jacobian) + diverse "
                             "greedy selection")
class ZooPrune(Pruner):
    """ZOO-Prune selection before the LLM."""

    def __init__(self, config: ZooPruneConfig) -> None:
        super().__init__(config)
        self._grams: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._fp32: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._bank: torch.Tensor | None = None

    def check(self, adapter: ModelAdapter) -> None:
        if self.config.estimator == "jacobian":
            projector_parts(adapter.projector)

    # -- scoring ---------------------------------------------------------------------------------------------
    def directions(self, dim: int) -> torch.Tensor:
        """The seeded `(m, dim)` direction bank (built once per method object)."""
        if self._bank is None or self._bank.shape[1] != dim:
            self._bank = random_directions(self.config.directions, dim, self.config.seed)
        return self._bank

    def gram(self, projector: nn.Module) -> torch.Tensor:
        """`(W2^T W2) o (W1 W1^T)` of this projector, computed once and cached while its weights are unchanged."""
        l1, _, l2 = projector_parts(projector)
        sig = (l1.weight.data_ptr(), l1.weight._version, l2.weight.data_ptr(), l2.weight._version,
               str(l1.weight.device))
        hit = self._grams.get(projector)
        if hit is None or hit[0] != sig:
            with torch.no_grad():
                hit = (sig, jacobian_gram(l1, l2))
            self._grams[projector] = hit
        return hit[1]

    def fp32_params(self, projector: nn.Module) -> dict[str, torch.Tensor] | None:
        """fp32 copies of a reduced-precision projector's parameters (cached while they are unchanged); None when
        the projector already is fp32/fp64 or `upcast` is off."""
        tensors = dict(projector.named_parameters())
        tensors.update(projector.named_buffers())
        if not self.config.upcast or all(t.dtype in (torch.float32, torch.float64) for t in tensors.values()
                                         if t.is_floating_point()):
            return None
        sig = tuple((n, t.data_ptr(), t._version) for n, t in tensors.items())
        hit = self._fp32.get(projector)
        if hit is None or hit[0] != sig:
            hit = (sig, {n: (t.detach().float() if t.is_floating_point() else t) for n, t in tensors.items()})
            self._fp32[projector] = hit
        return hit[1]

    def sensitivity(self, projector: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """`(T,)` raw (not normalised) sensitivities of the tokens `x` `(T, d)` with the configured estimator."""
        cfg = self.config
        with torch.no_grad():
            if cfg.estimator == "jacobian":
                l1, act, _ = projector_parts(projector)
                return jacobian_sensitivity(x, l1, act, self.gram(projector))
            return zeroth_order_sensitivity(projector, x, self.directions(x.shape[-1]), cfg.step, cfg.max_rows,
                                            params=self.fp32_params(projector))

    # -- selection -------------------------------------------------------------------------------------------
    def select(self, features: torch.Tensor, ctx: CallContext, adapter: ModelAdapter) -> list[torch.Tensor]:
        plan = ctx.plan
        projector = adapter.projector
        idx = current_index(ctx, features.device)
        scores = torch.full(idx.shape, float("nan"))
        out = []
        for r in range(plan.n_rows):
            valid = plan.valid[r].to(idx.device)[idx[r]]
            cand = torch.nonzero(valid).flatten()
            k = int(plan.budget[r])
            if k >= cand.numel():
                out.append(idx[r, cand].sort().values)
                continue
            x = features[r, cand]
            s = minmax(self.sensitivity(projector, x))
            with torch.no_grad():
                z = projector(x)
            picked = sads_select(s, z, k)
            scores[r, cand.cpu()] = s.cpu()
            out.append(idx[r, cand[picked.to(cand.device)]].sort().values)
        ctx.scores = scores
        return out
