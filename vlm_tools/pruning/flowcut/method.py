"""`flowcut`: FlowCut (arXiv 2505.19536, TungChintao/FlowCut), information-flow-guided pruning in the vision tower.

LLaVA-1.5 (one crop per image): the tower prunes progressively on the official schedule (see
`vlm_tools.pruning.flowcut.tower`): scores from every block's own attention input, cumulative 0.5 / 0.5 smoothing
from block 0, a prune after every second block up to the feature block with the entropy-driven adaptive count, and a
final cut to the budget right before the feature block. Later blocks really run on fewer tokens (forward hooks
shorten the block outputs; transformers records the shortened hidden states), so the tower itself gets faster. The
CLS token (and any trailing register tokens) stays in the sequence; survivors keep their spatial order.

LLaVA-NeXT (several crops per image): the official two-stage scheme. The tower cuts every crop to `budget // 2`
patches (official `target_num / 2` per crop; never positions that anyres unpadding removes), then a text-query
stage inside the LLM (`vlm_tools.pruning.flowcut.llm`) keeps `budget` patch tokens per image after decoder layer
`llm_layer`, scored with the last prompt token. `budget` follows the shared rule of `vlm_tools.core.adapters`
(`keep` tokens per image reach the LLM, newline tokens excluded and always kept). With `llm_layer=None` the tower
cuts each crop straight to its even share of the budget instead.

Deliberate differences from the official code (transformers-4.37 class patches, eager attention, batch size 1):

* the scores are computed in fp32 from each block's attention input (captured by hooks; keys and values are reused
  from the block when it runs in fp32, recomputed in fp32 otherwise), so the model keeps SDPA;
* the entropy of the adaptive count uses `log(p + 1e-7)` (the official LLaVA path takes `log(p)`: NaN as soon as a
  probability underflows to 0 in fp16; its Qwen path already adds the epsilon);
* it works without `output_attentions=True` (official: crash at `attn_weights[:, :, 0, 1:]` when it is off), for
  lists and batches of images (official: the list branch returns an undefined `hidden_states`) and with left
  padding (official NeXT stage raises);
* batches: each row keeps its own set; the adaptive count is shared by the rows of one image by default
  (`count_scope`), which is what the official code computes at its batch size of one;
* LLaVA-NeXT: positions removed by unpadding are never kept (the official code may keep some and drop them after
  the tower), and the LLM stage scores patch tokens only, per image (newline tokens stay).
"""

from __future__ import annotations

import functools

import torch

from vlm_tools._registry import register_method
from vlm_tools.core.adapters import LlavaNextAdapter, VisionPlan
from vlm_tools.core.hooks import HookHandle
from vlm_tools.core.method import ContextSlot, all_rows
from vlm_tools.pruning.base import Pruner
from vlm_tools.pruning.flowcut import llm as llm_stage
from vlm_tools.pruning.flowcut.config import FlowCutConfig
from vlm_tools.pruning.flowcut.tower import (
    STATE_KEY,
    TowerState,
    input_hook,
    mask_hook,
    projection_hook,
    prune_blocks,
    prune_hook,
    score_hook,
)


def tower_targets(plan: VisionPlan, two_stage: bool) -> torch.Tensor:
    """`(rows,)` patches each vision row keeps at the end of the tower stage.

    Rows of an image that is not pruned (its budget covers all its valid positions) keep all `n_patches`, so the
    tower output equals the base model's. Otherwise a row keeps its budget share, or with the LLaVA-NeXT LLM stage
    `image budget // 2` (the official per-crop `target_num / 2`), capped by its valid positions and never below its
    share of the budget.
    """
    valid = plan.valid.sum(1).tolist()
    budget = plan.budget.tolist()
    target = list(budget)
    for rows in plan.image_rows:
        total = sum(budget[r] for r in rows)
        if total >= sum(valid[r] for r in rows):
            for r in rows:
                target[r] = plan.n_patches
        elif two_stage:
            for r in rows:
                target[r] = max(min(total // 2, valid[r]), budget[r])
    return torch.tensor(target, dtype=torch.long)


def _init_hook(module, args, slot: ContextSlot, two_stage: bool, count_scope: str) -> None:
    """Forward pre-hook on the vision tower: fresh per-call FlowCut state from the call's plan."""
    ctx = slot.ctx
    if ctx is None or ctx.plan is None:
        return
    plan = ctx.plan
    rows, n = plan.n_rows, plan.n_patches
    scopes = [list(r) for r in plan.image_rows] if count_scope == "image" else [list(range(rows))]
    device = plan.valid.device
    ctx.state[STATE_KEY] = TowerState(target=tower_targets(plan, two_stage).to(device), scopes=scopes,
                                      n=torch.full((rows,), n, dtype=torch.long, device=device),
                                      index=torch.arange(n, device=device).expand(rows, -1).clone(),
                                      valid=plan.valid)


@register_method("flowcut", kind="vision", config=FlowCutConfig,
                 description="FlowCut: information-flow-guided progressive pruning inside the vision tower "
                             "(+ text-query LLM stage on LLaVA-NeXT)")
class FlowCut(Pruner):
    """FlowCut progressive pruning in the vision tower; on LLaVA-NeXT also the official LLM text-query stage."""

    def _two_stage(self, adapter) -> bool:
        return isinstance(adapter, LlavaNextAdapter) and self.config.llm_layer is not None

    def check(self, adapter):
        if adapter.feature_block < 1:
            raise ValueError("flowcut needs at least one vision block before the feature block to score and prune "
                             f"(vision_feature_layer={adapter.feature_layer})")
        if self._two_stage(adapter):
            llm_stage.check(adapter, self.config.llm_layer)

    def attach(self, model, adapter, slot):
        handle = HookHandle(self.name)
        try:
            two_stage = self._two_stage(adapter)
            handle.forward_pre_hook(adapter.vision_tower, functools.partial(
                _init_hook, slot=slot, two_stage=two_stage, count_scope=self.config.count_scope))
            for block in range(adapter.feature_block):
                attn = adapter.vision_attention(block)
                handle.forward_pre_hook(attn, functools.partial(input_hook, slot=slot), with_kwargs=True)
                handle.forward_hook(attn.k_proj, functools.partial(projection_hook, slot=slot, name="keys"))
                handle.forward_hook(attn.v_proj, functools.partial(projection_hook, slot=slot, name="values"))
                handle.forward_hook(attn, functools.partial(score_hook, slot=slot, block=block,
                                                            head_dim=adapter.head_dim))
            events = prune_blocks(adapter.feature_block)
            for block, rpl in events:
                handle.forward_hook(adapter.vision_layers[block], functools.partial(
                    prune_hook, slot=slot, block=block, rpl=rpl), prepend=True)
            impl = getattr(adapter.vision_tower.config, "_attn_implementation", None) or "eager"
            for block in range(events[0][0] + 1, adapter.n_layers):
                handle.forward_pre_hook(adapter.vision_layers[block], functools.partial(
                    mask_hook, slot=slot, attn_impl=impl), with_kwargs=True)
            if two_stage:
                llm_stage.attach(handle, model, adapter, slot, self.config.llm_layer)
        except BaseException:
            handle.remove()
            raise
        return handle

    def select(self, features, ctx, adapter):
        st: TowerState | None = ctx.state.get(STATE_KEY)
        if st is None:
            return all_rows(ctx)
        plan = ctx.plan
        counts = [plan.n_patches] * plan.n_rows
        events = dict(st.events)
        for block in range(adapter.n_layers):
            counts = events.get(block, counts)
            ctx.record_tokens(f"vision.{block}", counts)
        if st.cum is not None:
            ctx.scores = st.cum
        kept = []
        for r in range(plan.n_rows):
            idx = st.index[r, : int(st.n[r])]
            kept.append(idx[plan.valid[r].to(idx.device)[idx]])
        return kept
