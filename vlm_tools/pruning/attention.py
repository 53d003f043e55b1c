"""The [CLS]-row scoring hook shared by `cls_topk` and `vtc_cls` (the math is `vlm_tools.core.attention`)."""

from __future__ import annotations

from vlm_tools.core.attention import input_hidden_states, query_attention

__all__ = ["cls_row_hook"]


def cls_row_hook(module, args, kwargs, slot) -> None:
    """Forward pre-hook (`with_kwargs=True`) on a ViT attention module: add the block's head-mean [CLS] -> patch
    attention (fp32, softmax over all keys, patch columns only) to `ctx.scores` (summed over the hooked blocks).

    Bind `slot` with `functools.partial`; does nothing outside a wrapped call.
    """
    ctx = slot.ctx
    if ctx is None or ctx.plan is None:
        return
    plan = ctx.plan
    hidden = input_hidden_states(args, kwargs)
    attn = query_attention(module, hidden, query=0)  # (rows, heads, 1, L)
    ctx.add_scores(attn[:, :, 0, plan.n_prefix:hidden.shape[1] - plan.n_suffix].mean(1))
