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
from vlm_tools.core.hooks import HookHandle, input_hidden_states
from vlm_tools.pruning.attention import query_attention
from vlm_tools.pruning.base import ContextSlot, Pruner, topk_rows
from vlm_tools.pruning.vtc_cls.config import VtcClsConfig

_KEY = "vtc_cls"


def _accumulate_hook(module, args, kwargs, slot: ContextSlot, head_dim: int) -> None:
    """Add this block's head-mean [CLS] -> patch attention (fp32) to the per-call running sum."""
    ctx = slot.ctx
    if ctx is None or ctx.plan is None:
        return
    plan = ctx.plan
    hidden = input_hidden_states(args, kwargs)
    attn = query_attention(module, hidden, head_dim, query=0)  # (rows, heads, 1, L), softmax over all keys
    row = attn[:, :, 0, plan.n_prefix:hidden.shape[1] - plan.n_suffix].mean(1)
    ctx.state[_KEY] = row if _KEY not in ctx.state else ctx.state[_KEY] + row


@register_method("vtc_cls", kind="vision", config=VtcClsConfig,
                 description="VTC-CLS: top-k patches by [CLS] attention summed over the last vision blocks")
class VtcCls(Pruner):
    """VTC-CLS: sum of head-mean [CLS] attention over a range of vision blocks, top-k per crop, spatial order."""

    def check(self, adapter):
        self.config.block_range(adapter.n_layers)

    def attach(self, model, adapter, slot):
        start, end = self.config.block_range(adapter.n_layers)
        handle = HookHandle(self.name)
        try:
            for block in range(start, end + 1):
                handle.forward_pre_hook(adapter.vision_attention(block),
                                        functools.partial(_accumulate_hook, slot=slot, head_dim=adapter.head_dim),
                                        with_kwargs=True)
        except BaseException:
            handle.remove()
            raise
        return handle

    def select(self, features, ctx, adapter):
        scores = ctx.state[_KEY]
        ctx.state["scores"] = scores
        return topk_rows(scores, ctx)
