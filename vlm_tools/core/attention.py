"""The fp32 attention kit: attention rows recomputed from a layer's own inputs, so the model keeps SDPA / flash.

Vision towers (CLIP / DINOv2 in transformers, timm ViTs): `vit_project` gives the fp32 per-head projections of an
attention module's input (HF `q_proj`/`k_proj`/`v_proj`, or the matching rows of timm's fused `qkv` with its
`q_norm`/`k_norm`), `query_attention` the softmax rows of chosen queries (the [CLS] row is `query=0`).

Language models (LLaMA-style attention: LLaMA, Mistral, Qwen2, SmolLM2): a forward pre-hook on `layer.self_attn`
sees the post-LayerNorm hidden states, the rotary `position_embeddings=(cos, sin)` and the layer's mask
(`layer_inputs`); from these `rotated_queries` / `rotated_keys` rebuild the post-RoPE fp32 queries and keys (what
the KV cache holds), `visible_keys` reads which keys a query may see, and `attention_rows` gives the softmax rows
with grouped key/value heads repeated (GQA).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "linear_fp32", "split_heads", "project_heads", "repeat_kv", "rotate_half", "apply_rope",
    "vit_head_dim", "vit_scale", "vit_project", "query_attention",
    "check_lm_attention", "rotated_queries", "rotated_keys", "visible_keys", "attention_rows", "layer_inputs",
    "input_hidden_states",
]


# -- shared pieces ----------------------------------------------------------------------------------------------

def linear_fp32(linear: nn.Linear, x: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
    """`linear(x)` computed in fp32 (optionally only the output features `rows` of the weight)."""
    w, b = linear.weight, linear.bias
    if rows is not None:
        w, b = w[rows], None if b is None else b[rows]
    return F.linear(x.float(), w.float(), None if b is None else b.float())


def split_heads(y: torch.Tensor, head_dim: int) -> torch.Tensor:
    """`(B, L, H * d)` -> `(B, H, L, d)` in fp32."""
    b, n, _ = y.shape
    return y.float().view(b, n, -1, head_dim).transpose(1, 2)


def project_heads(linear: nn.Linear, x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """`linear(x)` in fp32, as `(B, heads, L, head_dim)`."""
    return split_heads(linear_fp32(linear, x), head_dim)


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """`(B, kv_heads, L, d)` -> `(B, kv_heads * groups, L, d)`: each key/value head serves `groups` query heads."""
    return x.repeat_interleave(groups, dim=1) if groups > 1 else x


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """`(-x2, x1)` for the two halves of the last dimension (the rotate-half form of RoPE)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on `(B, heads, L, d)` with per-position `(B or 1, L, d)` cos / sin, in fp32."""
    cos, sin = cos.float().unsqueeze(1), sin.float().unsqueeze(1)
    return x.float() * cos + rotate_half(x.float()) * sin


def _batch(t: torch.Tensor, b: int) -> torch.Tensor:
    return t.expand(b, *t.shape[1:]) if t.shape[0] == 1 and b != 1 else t


def input_hidden_states(args: tuple, kwargs: dict) -> torch.Tensor:
    """The `hidden_states` argument of a module call seen by a `with_kwargs=True` pre-hook."""
    if args:
        return args[0]
    for key in ("hidden_states", "x"):
        if key in kwargs:
            return kwargs[key]
    raise RuntimeError("hooked module was called without hidden_states")


# -- vision towers ----------------------------------------------------------------------------------------------

def vit_head_dim(attn: nn.Module) -> int:
    """Per-head width of a ViT attention module (HF CLIP / DINOv2, timm)."""
    if hasattr(attn, "head_dim"):
        return int(attn.head_dim)
    raise TypeError(f"{type(attn).__name__} does not expose head_dim; supported: HF CLIP / DINOv2 and timm attention")


def vit_scale(attn: nn.Module) -> float:
    """The logit scale of a ViT attention module (`scale` / `scaling`, else `head_dim ** -0.5`)."""
    return float(getattr(attn, "scale", getattr(attn, "scaling", vit_head_dim(attn) ** -0.5)))


_PARTS = {"q": 0, "k": 1, "v": 2}


def vit_project(attn: nn.Module, x: torch.Tensor, part: str) -> torch.Tensor:
    """fp32 query, key or value heads `(B, H, L, d)` of a ViT attention module for its input `x` `(B, L, D)`.

    HF CLIP / DINOv2 use `q_proj`/`k_proj`/`v_proj`; timm's `Attention` has one fused `qkv` linear (its rows for the
    part are used) and applies `q_norm` / `k_norm` per head (in the module's dtype, as timm does).
    """
    if part not in _PARTS:
        raise ValueError(f"part must be one of q, k, v, got {part!r}")
    hd = vit_head_dim(attn)
    if hasattr(attn, f"{part}_proj"):
        return project_heads(getattr(attn, f"{part}_proj"), x, hd)
    if not hasattr(attn, "qkv"):
        raise TypeError(f"cannot recompute attention of {type(attn).__name__}: it has neither {part}_proj nor a fused "
                        "qkv projection; supported: HF CLIP / DINOv2 and timm attention")
    width = attn.qkv.weight.shape[0] // 3
    i = _PARTS[part]
    y = split_heads(linear_fp32(attn.qkv, x, slice(i * width, (i + 1) * width)), hd)
    norm = getattr(attn, f"{part}_norm", None)
    if norm is not None and not isinstance(norm, nn.Identity):
        y = norm(y.to(x.dtype)).float()
    return y


def query_attention(attn: nn.Module, hidden: torch.Tensor, query: int | slice = 0,
                    key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention rows of the given query positions against all keys of a ViT attention layer, in fp32.

    Args:
        attn: a CLIP / DINOv2 / timm attention module.
        hidden: the module's input (the block's post-LayerNorm hidden states), `(B, L, D)`.
        query: a position or slice of query positions (0 = CLS).
        key_mask: `(B, L)` keys that may be attended (None: all).

    Returns:
        `(B, heads, Q, L)` probabilities (softmax over the visible keys).
    """
    q_in = hidden[:, query:query + 1] if isinstance(query, int) else hidden[:, query]
    q = vit_project(attn, q_in, "q")
    k = vit_project(attn, hidden, "k")
    logits = (q @ k.transpose(-1, -2)) * vit_scale(attn)
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask[:, None, None, :].to(logits.device), float("-inf"))
    return torch.softmax(logits, dim=-1)


# -- language models --------------------------------------------------------------------------------------------

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
    q = project_heads(attn.q_proj, hidden[ar, rows].unsqueeze(1), attn.head_dim)
    cos, sin = (_batch(t, b)[ar, rows].unsqueeze(1) for t in position_embeddings)
    return apply_rope(q, cos, sin)


def rotated_keys(attn: nn.Module, hidden: torch.Tensor,
                 position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Post-RoPE fp32 keys of every position, `(B, kv_heads, L, head_dim)` (what the KV cache holds, in fp32)."""
    b = hidden.shape[0]
    k = project_heads(attn.k_proj, hidden, attn.head_dim)
    cos, sin = (_batch(t, b) for t in position_embeddings)
    return apply_rope(k, cos, sin)


def visible_keys(mask: torch.Tensor | None, rows: torch.Tensor, n_keys: int, q_len: int) -> torch.Tensor:
    """`(B, n_keys)` keys each sample's query row may attend to, read off the mask the layer receives.

    Args:
        mask: the layer's `attention_mask`: `None` (causal, no padding), a 4-D boolean mask (True = attend) or a 4-D
            additive float mask (0 = attend), `(B or 1, 1, q_len, n_keys)`.
        rows: `(B,)` query row of each sample inside the mask's query axis.
        n_keys: number of keys.
        q_len: number of query rows of the call (the queries are the last `q_len` key positions).
    """
    if mask is None:  # causal without padding: query row r sits at key position n_keys - q_len + r
        pos = torch.arange(n_keys, device=rows.device)
        return pos[None, :] <= (n_keys - q_len + rows)[:, None]
    if mask.dim() != 4:
        raise ValueError(f"expected a 4-D attention mask, got shape {tuple(mask.shape)}")
    b = rows.shape[0]
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
    k = repeat_kv(keys.float(), groups)
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
