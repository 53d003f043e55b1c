"""`cls_topk`: keep the patches the [CLS] token attends to most at the vision feature layer (FasterVLM).

Score of patch i = mean over heads of softmax(q_CLS k^T / sqrt(d))[i], the CLS row recomputed in fp32 from the
feature layer's own input inside a forward pre-hook (softmax over all keys, then the patch columns), so the model
keeps SDPA. FasterVLM reads `attentions[-2][:, :, 0, 1:]`; for `vision_feature_layer=-2` that is the same layer.
"""

from __future__ import annotations

import functools

from vlm_tools._registry import register_method
from vlm_tools.core.hooks import HookHandle, input_hidden_states
from vlm_tools.pruning.attention import query_attention
from vlm_tools.pruning.base import ContextSlot, Pruner, topk_rows
from vlm_tools.pruning.cls_topk.config import ClsTopKConfig


def _score_hook(module, args, kwargs, slot: ContextSlot, head_dim: int) -> None:
    ctx = slot.ctx
    if ctx is None or ctx.plan is None:
        return
    hidden = input_hidden_states(args, kwargs)
    plan = ctx.plan
    attn = query_attention(module, hidden, head_dim, query=0)  # (B, H, 1, L)
    end = hidden.shape[1] - plan.n_suffix
    ctx.state["scores"] = attn[:, :, 0, plan.n_prefix:end].mean(1)


@register_method("cls_topk", kind="vision", config=ClsTopKConfig,
                 description="FasterVLM: top-k patches by head-mean [CLS] attention at the vision feature layer")
class ClsTopK(Pruner):
    """FasterVLM [CLS]-attention pruning before the projector."""

    def attach(self, model, adapter, slot):
        handle = HookHandle(self.name)
        try:
            handle.forward_pre_hook(adapter.vision_attention(adapter.feature_block),
                                    functools.partial(_score_hook, slot=slot, head_dim=adapter.head_dim),
                                    with_kwargs=True)
        except BaseException:
            handle.remove()
            raise
        return handle

    def select(self, features, ctx, adapter):
        return topk_rows(ctx.state["scores"], ctx)
