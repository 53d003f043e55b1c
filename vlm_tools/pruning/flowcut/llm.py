"""FlowCut's LLaVA-NeXT text-query stage inside the LLM (official `modeling_llama_flowcut.py`), on HF's own cache.

After the tower stage (each crop cut to `budget // 2` patches), decoder layer `llm_layer` (official: 1) scores each
image's patch tokens with the last prompt token, from that layer's attention input in fp32:

* relation `mean_h softmax(q_last k_i^T / sqrt(d))` and semantic `mean_h softmax(v_last v_i^T / sqrt(d))`, softmax
  over the image's patch tokens, queries and keys after RoPE, grouped KV heads repeated;
* `S = (relation / sum + semantic / sum) * ||mean_h v_i||_1`; the `budget` highest patch tokens stay (order kept).

The drop itself is the core's LLM token-drop primitive (`vlm_tools.core.lm_drop.LmDrop` with
`after_layer=llm_layer`, `positions="renumber"`, no scatter-back): layers `> llm_layer` run on (and cache) the kept
tokens only while layers `<= llm_layer` keep the full prefix in their cache, exactly as in the official code; RoPE
positions are renumbered without the removed tokens (official: contiguous positions after the prune; decode
positions shifted by the number removed in those layers), for the prefill and every decode step. Differences:
newline tokens are never removed (the official NeXT code has none for multi-crop images), each image of a sample is
scored on its own, any padding side works (rows are re-padded on the batch's padding side; official: left padding
raises), and tokens after the prompt are kept. Per-token `labels` cannot be used while this stage prunes (the
logits cover the shortened sequence).
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

from vlm_tools.core.adapters import ModelAdapter
from vlm_tools.core.attention import apply_rope, input_hidden_states, project_heads, repeat_kv
from vlm_tools.core.hooks import HookHandle
from vlm_tools.core.lm_drop import LmDrop
from vlm_tools.core.method import CallContext, ContextSlot

__all__ = ["LLM_KEY", "attach", "check", "text_query_scores", "image_targets"]

#: `ctx.state` key of the stage's private scratch (per `(sample, image)` text-query scores, for inspection)
LLM_KEY = "flowcut_llm"


def drop_of(llm_layer: int) -> LmDrop:
    """The stage's token drop: after `llm_layer`, renumbered positions, logits over the shortened sequence."""
    return LmDrop(after_layer=llm_layer, positions="renumber", scatter_back=False)


def check(adapter: ModelAdapter, llm_layer: int) -> None:
    """Raise a clear error if the LLM stage cannot run on this model."""
    n = len(adapter.lm_layers)
    if llm_layer >= n:
        raise ValueError(f"flowcut llm_layer={llm_layer} but the language model has {n} decoder layers "
                         f"(valid: 0..{n - 1}, or None to prune in the vision tower only)")
    attn = adapter.lm_layers[llm_layer].self_attn
    missing = [m for m in ("q_proj", "k_proj", "v_proj") if not hasattr(attn, m)]
    if missing:
        raise ValueError(f"flowcut's LLM stage needs q/k/v projections (LLaMA-style decoder); "
                         f"{type(attn).__name__} lacks {missing}")
    drop_of(llm_layer).check(adapter, "flowcut's LLaVA-NeXT LLM stage (or pass llm_layer=None for tower-only "
                                      "pruning)")


def image_targets(ctx: CallContext) -> list[int]:
    """Patch tokens each image keeps after the stage (its budget, summed over its crops)."""
    plan = ctx.plan
    return [int(plan.budget[rows].sum()) for rows in plan.image_rows]


def text_query_scores(attn: nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, query: int,
                      keys: torch.Tensor) -> torch.Tensor:
    """FlowCut's LLM-stage score of the tokens `keys` of one row, queried by the token at `query` (fp32).

    Args:
        attn: the decoder layer's attention module (`q_proj`, `k_proj`, `v_proj`, `head_dim`).
        hidden: the row's attention input (post-LayerNorm hidden states), `(L, D)`.
        cos: the row's RoPE cosines `(L, d)`; sin: sines.
        query: position of the query token (the last prompt token).
        keys: positions of the scored tokens.
    """
    d = attn.head_dim
    h = hidden[None]
    q = apply_rope(project_heads(attn.q_proj, h[:, query:query + 1], d), cos[None, query:query + 1],
                   sin[None, query:query + 1])  # (1, H, 1, d)
    k = apply_rope(project_heads(attn.k_proj, h[:, keys], d), cos[None, keys], sin[None, keys])  # (1, Hkv, n, d)
    v = project_heads(attn.v_proj, h[:, keys], d)
    v_q = project_heads(attn.v_proj, h[:, query:query + 1], d)
    groups = q.shape[1] // k.shape[1]
    k, v, v_q = (repeat_kv(t, groups) for t in (k, v, v_q))
    relation = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1).mean(1)[0, 0]
    semantic = torch.softmax(v_q @ v.transpose(-1, -2) / math.sqrt(d), dim=-1).mean(1)[0, 0]
    density = v.mean(1)[0].abs().sum(-1)
    return (relation / relation.sum() + semantic / semantic.sum()) * density


def _will_prune(ctx: CallContext, adapter: ModelAdapter) -> bool:
    targets = image_targets(ctx)
    return any(int((ctx.token_layout(adapter, i) >= 0).sum()) > t for i, t in enumerate(targets))


def _labels_hook(module, args, kwargs, slot: ContextSlot, adapter: ModelAdapter) -> None:
    ctx = slot.ctx
    if ctx is None or kwargs.get("labels") is None or ctx.plan is None:
        return
    if _will_prune(ctx, adapter):
        raise ValueError("flowcut's LLaVA-NeXT LLM stage shortens the sequence inside the language model, so "
                         "per-token labels (a loss) cannot be computed; wrap with llm_layer=None to prune in the "
                         "vision tower only")


def _score_hook(module, args, kwargs, slot: ContextSlot, drop: LmDrop, adapter: ModelAdapter) -> None:
    """Pre-hook on the pruning layer's attention (prefill only): text-query scores, tokens to remove per row."""
    ctx = slot.ctx
    if not LmDrop.scoring(ctx):
        return
    hidden = input_hidden_states(args, kwargs)
    cos, sin = kwargs["position_embeddings"]
    rows = hidden.shape[0]
    queries = ctx.lm_call.query_positions(rows, hidden.device).tolist()
    targets = image_targets(ctx)
    scores = ctx.state.setdefault(LLM_KEY, {})
    scores.clear()
    removed: list[list[int]] = [[] for _ in range(rows)]
    ctx.llm_kept = ctx.llm_kept or {}
    for b in range(rows):
        for start, span, image in ctx.lm_call.spans[b]:
            layout = ctx.token_layout(adapter, image).to(hidden.device)
            if layout.numel() != span:
                raise RuntimeError(f"flowcut: image {image} has {span} LLM tokens but its packed layout "
                                   f"{layout.numel()}")
            is_patch = layout >= 0
            positions = start + torch.nonzero(is_patch).flatten()
            if positions.numel() <= targets[image]:
                continue
            score = text_query_scores(module, hidden[b], cos[b % cos.shape[0]], sin[b % sin.shape[0]], queries[b],
                                      positions)
            keep = torch.zeros(positions.numel(), dtype=torch.bool, device=hidden.device)
            keep[torch.topk(score, targets[image], sorted=False).indices] = True
            removed[b] += positions[~keep].tolist()
            scores[(b, image)] = score
            ctx.llm_kept[(ctx.lm_call.sample_of(b), image)] = layout[is_patch][keep].sort().values.cpu()
    after = [sum(span for _, span, _ in ctx.lm_call.spans[b]) - len(removed[b]) for b in range(rows)]
    drops = [torch.tensor(r, dtype=torch.long) for r in removed]
    drop.decide(ctx, drops, after, hidden.device)


def attach(handle: HookHandle, model: nn.Module, adapter: ModelAdapter, slot: ContextSlot, llm_layer: int) -> None:
    """Register the LLM-stage hooks on `handle` (the caller removes them if anything fails)."""
    drop = drop_of(llm_layer)
    handle.forward_pre_hook(model, functools.partial(_labels_hook, slot=slot, adapter=adapter), with_kwargs=True)
    drop.attach(handle, adapter, slot)
    handle.forward_pre_hook(adapter.lm_layers[llm_layer].self_attn,
                            functools.partial(_score_hook, slot=slot, drop=drop, adapter=adapter), with_kwargs=True)

