"""Attention rows recomputed from a layer's input in fp32, so the model itself keeps SDPA/flash attention."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["query_attention", "project_heads", "cls_row_hook"]


def project_heads(linear: nn.Linear, x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """`linear(x)` in fp32, reshaped to `(B, heads, L, head_dim)`."""
    bias = None if linear.bias is None else linear.bias.float()
    y = F.linear(x.float(), linear.weight.float(), bias)
    b, n, _ = y.shape
    return y.view(b, n, -1, head_dim).transpose(1, 2)


def query_attention(attn: nn.Module, hidden: torch.Tensor, head_dim: int, query: int | slice = 0) -> torch.Tensor:
    """Softmax attention rows of the given query positions against all keys of a ViT attention layer.

    Args:
        attn: a CLIP / DINOv2 attention module (has `q_proj`, `k_proj`).
        hidden: the module's input (the block's post-LayerNorm hidden states), `(B, L, D)`.
        head_dim: per-head width.
        query: a position or slice of query positions (0 = CLS).

    Returns:
        `(B, heads, Q, L)` fp32 attention probabilities (softmax over all L keys).
    """
    q_in = hidden[:, query:query + 1] if isinstance(query, int) else hidden[:, query]
    q = project_heads(attn.q_proj, q_in, head_dim)
    k = project_heads(attn.k_proj, hidden, head_dim)
    scale = getattr(attn, "scale", getattr(attn, "scaling", head_dim ** -0.5))
    return torch.softmax((q @ k.transpose(-1, -2)) * scale, dim=-1)


def cls_row_hook(module, args, kwargs, slot, head_dim: int, key: str) -> None:
    """Forward pre-hook (`with_kwargs=True`) on a ViT attention module: add the block's head-mean [CLS] -> patch
    attention (fp32, softmax over all keys, patch columns only) to `ctx.state[key]` (summed over hooked blocks).

    Bind `slot`, `head_dim` and `key` with `functools.partial`; does nothing outside a wrapped call.
    """
    from vlm_tools.core.hooks import input_hidden_states

    ctx = slot.ctx
    if ctx is None or ctx.plan is None:
        return
    plan = ctx.plan
    hidden = input_hidden_states(args, kwargs)
    attn = query_attention(module, hidden, head_dim, query=0)  # (rows, heads, 1, L)
    row = attn[:, :, 0, plan.n_prefix:hidden.shape[1] - plan.n_suffix].mean(1)
    ctx.state[key] = row if key not in ctx.state else ctx.state[key] + row
