"""`cls_topk`: keep the patches the [CLS] token attends to most at the vision feature layer (FasterVLM).

Score of patch i = mean over heads of softmax(q_CLS k^T / sqrt(d))[i], the CLS row recomputed in fp32 from the
feature layer's own input inside a forward pre-hook (softmax over all keys, then the patch columns), so the model
keeps SDPA. FasterVLM reads `attentions[-2][:, :, 0, 1:]`; for `vision_feature_layer=-2` that is the same layer.
"""

from __future__ import annotations

import functools

from vlm_tools._registry import register_method
from vlm_tools.core.hooks import attach_guarded
from vlm_tools.pruning.attention import cls_row_hook
from vlm_tools.pruning.base import Pruner, topk_rows
from vlm_tools.pruning.cls_topk.config import ClsTopKConfig


@register_method("cls_topk", kind="vision", config=ClsTopKConfig,
                 description="FasterVLM: top-k patches by head-mean [CLS] attention at the vision feature layer")
class ClsTopK(Pruner):
    """FasterVLM [CLS]-attention pruning before the projector."""

    def attach(self, model, adapter, slot):
        hook = functools.partial(cls_row_hook, slot=slot)
        return attach_guarded(self.name, lambda h: h.forward_pre_hook(adapter.vision_attention(adapter.feature_block),
                                                                      hook, with_kwargs=True))

    def select(self, features, ctx, adapter):
        return topk_rows(ctx.scores, ctx)
