"""`vtc_cls`: VTC-CLS (arXiv 2412.05819, THU-MIG/VTC-CLS), [CLS] attention summed over the last vision blocks.

Score of patch i = sum over blocks l in `[start, end]` of mean over heads of softmax(q_CLS k^T / sqrt(d))[i]. The
official code reads `attentions[layer:-1]` of an eager CLIP forward (so `end` is the penultimate block L-2) and
keeps `topk(token_num)` in the original spatial order, for one image at batch size 1.

Here each block's [CLS] row is recomputed in fp32 from the block's own attention input inside a forward pre-hook
(softmax over all keys, then the patch columns), so the tower keeps SDPA and nothing else changes; any batch size
works and each vision row (a LLaVA-NeXT crop) is ranked on its own with its own budget from the shared budget rule
(`vlm_tools.core.adapters`). Positions removed by LLaVA-NeXT's unpadding are never picked.
"""

from __future__ import annotations

import functools

from vlm_tools._registry import register_method
from vlm_tools.core.hooks import attach_guarded
from vlm_tools.pruning.attention import cls_row_hook
from vlm_tools.pruning.base import Pruner, topk_rows
from vlm_tools.pruning.vtc_cls.config import VtcClsConfig

@register_method("vtc_cls", kind="vision", config=VtcClsConfig,
                 description="VTC-CLS: top-k patches by [CLS] attention summed over the last vision blocks")
class VtcCls(Pruner):
    """VTC-CLS: sum of head-mean [CLS] attention over a range of vision blocks, top-k per crop, spatial order."""

    def check(self, adapter):
        self.config.block_range(adapter.n_layers)

    def attach(self, model, adapter, slot):
        start, end = self.config.block_range(adapter.n_layers)
        hook = functools.partial(cls_row_hook, slot=slot)

        def register(handle):
            for block in range(start, end + 1):
                handle.forward_pre_hook(adapter.vision_attention(block), hook, with_kwargs=True)

        return attach_guarded(self.name, register)

    def select(self, features, ctx, adapter):
        return topk_rows(ctx.scores, ctx)
