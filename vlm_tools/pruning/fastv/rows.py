"""Attention rows of single queries in a decoder layer, recomputed in fp32 from the attention module's inputs.

The model keeps SDPA (or flash) attention; a forward pre-hook on `layer.self_attn` sees the post-LayerNorm hidden
states, the rotary `position_embeddings=(cos, sin)` and the attention mask the layer will use. From these, the rows
wanted (e.g. the last token's) are recomputed: `q = RoPE(q_proj(h_q))`, `K = RoPE(k_proj(h))` repeated over the
query heads of each key/value group (GQA), `softmax(q K^T * scaling)` over the keys the mask lets the query see.
Shared by FastV (ranking image tokens at layer K-1) and the text-dominance metrics.

Supported attention modules: LLaMA-style (`q_proj`, `k_proj`, `head_dim`, `num_key_value_groups`, `scaling`, the
rotate-half RoPE) as in LLaMA, Mistral, Qwen2 and SmolLM2 language models.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["check_lm_attention", "rotate_half", "rotated_queries", "rotated_keys", "visible_keys", "attention_rows",
           "layer_inputs"]


def check_lm_attention(attn: nn.Module) -> None:
    """Raise a clear error if `attn` is not a LLaMA-style attention module whose rows can be recomputed."""
    missing = [a for a in ("q_proj", "k_proj", "head_dim", "num_key_value_groups") if not hasattr(attn, a)]
    if missing:
        raise TypeError(f"cannot recompute attention rows of {type(attn).__name__}: it lacks {', '.join(missing)}; "
                        "supported: LLaMA-style attention (LLaMA, Mistral, Qwen2, SmolLM2)")
    for extra in ("q_norm", "k_norm"):
        if getattr(attn, extra, None) is not None:
            raise TypeError(f"{type(attn).__name__} normalises queries/keys per head ({extra}); recomputing its "
                            "attention rows is not supported")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """`(-x2, x1)` for the two halves of the last dimension (the rotate-half form of RoPE)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _proj(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    bias = None if linear.bias is None else linear.bias.float()
    return F.linear(x.float(), linear.weight.float(), bias)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, heads, L, d); cos/sin: (B, L, d)
    cos, sin = cos.float().unsqueeze(1), sin.float().unsqueeze(1)
    return x * cos + rotate_half(x) * sin


def _batch(t: torch.Tensor, b: int) -> torch.Tensor:
    return t.expand(b, *t.shape[1:]) if t.shape[0] == 1 and b != 1 else t


def rotated_queries(attn: nn.Module, hidden: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                    rows: torch.Tensor) -> torch.Tensor:
    """Post-RoPE fp32 queries of one position per sample.

    Args:
        attn: the attention module.
        hidden: its input hidden states `(B, L, D)`.
        position_embeddings: the `(cos, sin)` it receives, `(B or 1, L, head_dim)` each.
        rows: `(B,)` query position of each sample.

    Returns:
        `(B, heads, 1, head_dim)`.
    """
    b = hidden.shape[0]
    ar = torch.arange(b, device=hidden.device)
    h = hidden[ar, rows].unsqueeze(1)
    q = _proj(attn.q_proj, h).view(b, 1, -1, attn.head_dim).transpose(1, 2)
    cos, sin = (_batch(t, b)[ar, rows].unsqueeze(1) for t in position_embeddings)
    return _rope(q, cos, sin)


def rotated_keys(attn: nn.Module, hidden: torch.Tensor,
                 position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Post-RoPE fp32 keys of every position, `(B, kv_heads, L, head_dim)` (what the KV cache holds, in fp32)."""
    b, n, _ = hidden.shape
    k = _proj(attn.k_proj, hidden).view(b, n, -1, attn.head_dim).transpose(1, 2)
    cos, sin = (_batch(t, b) for t in position_embeddings)
    return _rope(k, cos, sin)


def visible_keys(mask: torch.Tensor | None, rows: torch.Tensor, n_keys: int, q_len: int) -> torch.Tensor:
    """`(B, n_keys)` keys each sample's query row may attend to, read off the mask the layer receives.

    Args:
        mask: the layer's `attention_mask`: `None` (causal, no padding), a 4-D boolean mask (True = attend) or a 4-D
            additive float mask (0 = attend), `(B or 1, 1, q_len, n_keys)`.
        rows: `(B,)` query row of each sample inside the mask's query axis.
        n_keys: number of keys.
        q_len: number of query rows of the call (the queries are the last `q_len` key positions).
    """
    b = rows.shape[0]
    if mask is None:  # causal without padding: query row r sits at key position n_keys - q_len + r
        pos = torch.arange(n_keys, device=rows.device)
        return pos[None, :] <= (n_keys - q_len + rows)[:, None]
    if mask.dim() != 4:
        raise ValueError(f"expected a 4-D attention mask, got shape {tuple(mask.shape)}")
    m = _batch(mask, b)[torch.arange(b, device=mask.device), 0, rows.to(mask.device)]
    if m.dtype == torch.bool:
        return m
    return m > torch.finfo(m.dtype).min / 2


def attention_rows(q: torch.Tensor, keys: torch.Tensor, scaling: float, visible: torch.Tensor,
                   groups: int) -> torch.Tensor:
    """Softmax attention rows in fp32.

    Args:
        q: `(B, heads, 1, d)` post-RoPE queries.
        keys: `(B, kv_heads, n_keys, d)` post-RoPE keys.
        scaling: the layer's logit scale (`head_dim ** -0.5` for LLaMA).
        visible: `(B, n_keys)` keys the query may see.
        groups: query heads per key/value head (GQA), keys are repeated accordingly.

    Returns:
        `(B, heads, n_keys)` probabilities (zero on hidden keys).
    """
    k = keys.float().repeat_interleave(groups, dim=1) if groups > 1 else keys.float()
    logits = (q.float() @ k.transpose(-1, -2))[:, :, 0] * scaling
    logits = logits.masked_fill(~visible[:, None, :].to(logits.device), float("-inf"))
    return torch.softmax(logits, dim=-1)


def layer_inputs(args: tuple, kwargs: dict) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor],
                                                      torch.Tensor | None]:
    """`(hidden_states, position_embeddings, attention_mask)` of an attention/decoder call seen by a pre-hook."""
    hidden = args[0] if args else kwargs.get("hidden_states")
    if hidden is None:
        raise RuntimeError("hooked layer was called without hidden_states")
    pos = kwargs.get("position_embeddings")
    if pos is None and len(args) > 1 and isinstance(args[1], tuple):
        pos = args[1]
    if pos is None:
        raise RuntimeError("hooked layer was called without position_embeddings=(cos, sin)")
    return hidden, pos, kwargs.get("attention_mask")
