"""FlowCut's LLaVA-NeXT text-query stage inside the LLM (official `modeling_llama_flowcut.py`), on HF's own cache.

After the tower stage (each crop cut to `budget // 2` patches), decoder layer `llm_layer` (official: 1) scores each
image's patch tokens with the last prompt token, from that layer's attention input in fp32:

* relation `mean_h softmax(q_last k_i^T / sqrt(d))` and semantic `mean_h softmax(v_last v_i^T / sqrt(d))`, softmax
  over the image's patch tokens, queries and keys after RoPE, grouped KV heads repeated;
* `S = (relation / sum + semantic / sum) * ||mean_h v_i||_1`; the `budget` highest patch tokens stay (order kept).

The output of layer `llm_layer` is then shortened, so layers `> llm_layer` run on (and cache) the kept tokens only
while layers `<= llm_layer` keep the full prefix in their cache, exactly as in the official code. Every later layer
gets, through a pre-hook, the attention mask of the shortened sequence and RoPE positions renumbered without the
removed tokens (official: contiguous positions after the prune; decode positions shifted by the number removed in
those layers), for the prefill and for every decode step. Differences: newline tokens are never removed (the
official NeXT code has none for multi-crop images), each image of a sample is scored on its own, any padding side
works (rows are re-padded on the batch's padding side; official: left padding raises), and tokens after the prompt
are kept. Per-token `labels` cannot be used while this stage prunes (the logits cover the shortened sequence).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from vlm_tools.core.adapters import ModelAdapter
from vlm_tools.core.hooks import HookHandle, input_hidden_states
from vlm_tools.pruning.base import CallContext, ContextSlot

__all__ = ["LLM_KEY", "LlmState", "attach", "check", "prepare", "text_query_scores"]

LLM_KEY = "flowcut_llm"
SUPPORTED_LLM_ATTENTION = ("eager", "sdpa")


@dataclass
class LlmState:
    """Per-call state of the LLM stage (lives in `ctx.state[LLM_KEY]`).

    Attributes:
        layouts: per image, the original patch index (`crop * n_patches + patch`) of each of its LLM tokens, -1 for
            newline tokens.
        targets: per image, the patch tokens to keep.
        src: `(B, L')` position in the unpruned prefill of each token of the shortened sequence (-1: added padding),
            `None` when nothing was removed.
        removed: `(B,)` tokens removed per row.
        orig_len: length of the unpruned prefill.
        scores: per `(sample, image)`, the text-query scores of the image's patch tokens (inspection, tests).
        call_mask, call_pos, call_len, call_past: the 2-D attention mask, position ids, query length and cached length
            of the current LLM call (a call with an empty cache is a prefill and is pruned afresh).
        layer_kwargs: the replacement `attention_mask` / `position_embeddings` / `position_ids` of the current call
            for layers after the pruning layer (computed once per call).
    """

    layouts: list[torch.Tensor]
    targets: list[int]
    src: torch.Tensor | None = None
    removed: torch.Tensor | None = None
    orig_len: int = 0
    scores: dict = field(default_factory=dict)
    call_mask: torch.Tensor | None = None
    call_pos: torch.Tensor | None = None
    call_len: int = 0
    call_past: int = 0
    layer_kwargs: dict | None = None

    @property
    def prefill(self) -> bool:
        """Whether the current LLM call starts from an empty cache (the prompt; every call without a cache)."""
        return self.call_past == 0

    @property
    def will_prune(self) -> bool:
        return any(int((lay >= 0).sum()) > t for lay, t in zip(self.layouts, self.targets))


def check(adapter: ModelAdapter, llm_layer: int) -> None:
    """Raise a clear error if the LLM stage cannot run on this model."""
    n = len(adapter.lm_layers)
    if llm_layer >= n:
        raise ValueError(f"flowcut llm_layer={llm_layer} but the language model has {n} decoder layers "
                         f"(valid: 0..{n - 1}, or None to prune in the vision tower only)")
    impl = getattr(adapter.language_model.config, "_attn_implementation", None) or "eager"
    if impl not in SUPPORTED_LLM_ATTENTION:
        raise ValueError(f"flowcut's LLaVA-NeXT LLM stage supports {SUPPORTED_LLM_ATTENTION} attention in the "
                         f"language model, got {impl!r}; load it with attn_implementation='sdpa' or pass "
                         f"llm_layer=None (tower-only pruning)")
    attn = adapter.lm_layers[llm_layer].self_attn
    missing = [m for m in ("q_proj", "k_proj", "v_proj") if not hasattr(attn, m)]
    if missing or not hasattr(adapter.language_model, "rotary_emb"):
        raise ValueError(f"flowcut's LLM stage needs q/k/v projections and a model-level rotary embedding "
                         f"(LLaMA-style decoder); {type(attn).__name__} lacks {missing or ['rotary_emb']}")


def prepare(ctx: CallContext, adapter: ModelAdapter, kept: list[torch.Tensor]) -> None:
    """Set up the per-call LLM-stage state from the tower-stage selection (called from `select`)."""
    plan = ctx.plan
    layouts = [adapter.token_layout(plan, kept, i) for i in range(len(plan.image_rows))]
    targets = [int(plan.budget[rows].sum()) for rows in plan.image_rows]
    ctx.state[LLM_KEY] = LlmState(layouts=layouts, targets=targets)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """LLaMA RoPE on `(heads, tokens, d)` with per-token `(tokens, d)` cos / sin."""
    return x * cos[None] + _rotate_half(x) * sin[None]


def _heads(linear: nn.Linear, x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """`linear(x)` in fp32 for `(tokens, D)` input, as `(heads, tokens, head_dim)`."""
    bias = None if linear.bias is None else linear.bias.float()
    y = nn.functional.linear(x.float(), linear.weight.float(), bias)
    return y.view(x.shape[0], -1, head_dim).transpose(0, 1)


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
    q = _rope(_heads(attn.q_proj, hidden[query:query + 1], d), cos[query:query + 1].float(),
              sin[query:query + 1].float())  # (H, 1, d)
    k = _rope(_heads(attn.k_proj, hidden[keys], d), cos[keys].float(), sin[keys].float())  # (Hkv, n, d)
    v = _heads(attn.v_proj, hidden[keys], d)
    v_q = _heads(attn.v_proj, hidden[query:query + 1], d)  # (Hkv, 1, d)
    groups = q.shape[0] // k.shape[0]
    k, v, v_q = (t.repeat_interleave(groups, dim=0) for t in (k, v, v_q))
    relation = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1).mean(0)[0]
    semantic = torch.softmax(v_q @ v.transpose(-1, -2) / math.sqrt(d), dim=-1).mean(0)[0]
    density = v.mean(0).abs().sum(-1)
    return (relation / relation.sum() + semantic / semantic.sum()) * density


def _last_real(call_mask: torch.Tensor | None, length: int, rows: int) -> list[int]:
    """Position of each row's last attended token (the last prompt token) in a prefill of `length` tokens."""
    if call_mask is None:
        return [length - 1] * rows
    last = call_mask.bool().flip(1).int().argmax(1)
    return (length - 1 - last).tolist()


def _labels_hook(module, args, kwargs, slot: ContextSlot) -> None:
    ctx = slot.ctx
    if ctx is None or kwargs.get("labels") is None:
        return
    st = ctx.state.get(LLM_KEY)
    if st is not None and st.will_prune:
        raise ValueError("flowcut's LLaVA-NeXT LLM stage shortens the sequence inside the language model, so "
                         "per-token labels (a loss) cannot be computed; wrap with llm_layer=None to prune in the "
                         "vision tower only")


def _lm_hook(module, args, kwargs, slot: ContextSlot) -> None:
    """Pre-hook on the language model: remember this call's mask, positions and length; reset per-call caches."""
    ctx = slot.ctx
    if ctx is None or LLM_KEY not in ctx.state:
        return
    st: LlmState = ctx.state[LLM_KEY]
    embeds = kwargs.get("inputs_embeds")
    ids = kwargs.get("input_ids", args[0] if args else None)
    ref = embeds if embeds is not None else ids
    mask = kwargs.get("attention_mask")
    if mask is not None and mask.dim() != 2:
        raise ValueError("flowcut's LLM stage needs a 2-D attention mask (a dynamic cache); static / compiled "
                         "caches are not supported")
    if ref.shape[0] != len(ctx.lm_spans):
        raise ValueError(f"flowcut's LLM stage saw {ref.shape[0]} rows for {len(ctx.lm_spans)} prompts; beam search"
                         " and num_return_sequences > 1 are not supported")
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    st.call_len = ref.shape[1]
    st.call_past = int(cache.get_seq_length()) if cache is not None and hasattr(cache, "get_seq_length") else 0
    st.call_mask = mask
    st.call_pos = kwargs.get("position_ids")
    st.layer_kwargs = None
    if st.prefill:  # a new prompt pass (the first call, or every call of a cache-less generate)
        st.src, st.removed, st.orig_len, st.scores = None, None, 0, {}


def _score_hook(module, args, kwargs, slot: ContextSlot, layer: int) -> None:
    """Pre-hook on the pruning layer's attention (prefill only): text-query scores, tokens to remove per row."""
    ctx = slot.ctx
    if ctx is None or LLM_KEY not in ctx.state:
        return
    st: LlmState = ctx.state[LLM_KEY]
    if not st.prefill:
        return
    hidden = input_hidden_states(args, kwargs)
    cos, sin = kwargs["position_embeddings"]
    rows, length = hidden.shape[:2]
    queries = _last_real(st.call_mask, length, rows)
    removed: list[list[int]] = [[] for _ in range(rows)]
    ctx.llm_kept = ctx.llm_kept or {}
    for b in range(rows):
        for start, span, image in ctx.lm_spans[b]:
            layout = st.layouts[image].to(hidden.device)
            if layout.numel() != span:
                raise RuntimeError(f"flowcut: image {image} has {span} LLM tokens but its packed layout "
                                   f"{layout.numel()}")
            is_patch = layout >= 0
            positions = start + torch.nonzero(is_patch).flatten()
            target = st.targets[image]
            if positions.numel() <= target:
                continue
            score = text_query_scores(module, hidden[b], cos[b % cos.shape[0]], sin[b % sin.shape[0]], queries[b],
                                      positions)
            keep = torch.zeros(positions.numel(), dtype=torch.bool, device=hidden.device)
            keep[torch.topk(score, target, sorted=False).indices] = True
            removed[b] += positions[~keep].tolist()
            st.scores[(b, image)] = score
            ctx.llm_kept[(b, image)] = layout[is_patch][keep].sort().values.cpu()
    if any(removed):
        st.orig_len = length
        keep_mask = torch.ones(rows, length, dtype=torch.bool, device=hidden.device)
        for b, pos in enumerate(removed):
            keep_mask[b, pos] = False
        lens = keep_mask.sum(1)
        width = int(lens.max())
        left = st.call_mask is None or bool((st.call_mask[:, 0] == 0).any()) or not bool(
            (st.call_mask[:, -1] == 0).any())
        src = torch.full((rows, width), -1, dtype=torch.long, device=hidden.device)
        for b in range(rows):
            pos = torch.nonzero(keep_mask[b]).flatten()
            if left:
                src[b, width - pos.numel():] = pos
            else:
                src[b, : pos.numel()] = pos
        st.src = src
        st.removed = length - lens
    after = []
    for b in range(rows):
        n = sum(span for _, span, _ in ctx.lm_spans[b]) - len(removed[b])
        after.append(n)
    ctx.state["tokens_after"] = after
    ctx.layer_tokens[:] = [(w, c) for w, c in ctx.layer_tokens if w != f"llm.{layer}"] + [(f"llm.{layer}", after)]


def _shorten_hook(module, args, output, slot: ContextSlot):
    """Forward hook on the pruning layer (prefill only): drop the removed tokens from its output."""
    ctx = slot.ctx
    if ctx is None or LLM_KEY not in ctx.state:
        return None
    st: LlmState = ctx.state[LLM_KEY]
    hidden = output if isinstance(output, torch.Tensor) else output[0]
    if st.src is None or not st.prefill:
        return None
    real = (st.src >= 0)[..., None]
    new = torch.gather(hidden, 1, st.src.clamp(min=0)[..., None].expand(-1, -1, hidden.shape[-1]))
    new = new.masked_fill(~real, 0.0)
    if isinstance(output, torch.Tensor):
        return new
    return (new, *output[1:])


def _positions(st: LlmState, device) -> torch.Tensor:
    """`(B, q)` position ids the model uses for this call (its own or the default numbering)."""
    if st.call_pos is not None:
        return st.call_pos.to(device).expand(st.src.shape[0], -1)
    return (torch.arange(st.call_len, device=device) + st.call_past).expand(st.src.shape[0], -1)


def _masked_value(mask: torch.Tensor):
    return False if mask.dtype == torch.bool else torch.finfo(mask.dtype).min


def _layer_kwargs(st: LlmState, hidden: torch.Tensor, mask: torch.Tensor | None, rotary: nn.Module) -> dict:
    """Attention mask, RoPE and position ids of the shortened sequence for the current call."""
    src = st.src.to(hidden.device)
    real = src >= 0
    rows, width = src.shape
    safe = src.clamp(min=0)
    pos = _positions(st, hidden.device)
    removed_before = torch.zeros_like(src)
    if st.prefill:  # renumber the kept tokens
        kept = torch.zeros(rows, st.orig_len, dtype=torch.long, device=hidden.device)
        kept.scatter_reduce_(1, safe, real.long(), reduce="amax")  # added padding points at 0 with value 0
        gone = 1 - kept
        removed_before = torch.cumsum(gone, 1).gather(1, safe) - gone.gather(1, safe)
        new_pos = (pos.gather(1, safe) - removed_before).masked_fill(~real, 0)
        if mask is None and bool(real.all()):
            new_mask = None
        else:
            base = mask if mask is not None else torch.ones(rows, 1, st.orig_len, st.orig_len, dtype=torch.bool,
                                                            device=hidden.device).tril()
            base = base.expand(rows, -1, -1, -1)
            picked = base.gather(2, safe[:, None, :, None].expand(-1, base.shape[1], -1, base.shape[3]))
            picked = picked.gather(3, safe[:, None, None, :].expand(-1, base.shape[1], width, -1))
            fill = _masked_value(picked)
            new_mask = picked.masked_fill(~real[:, None, None, :], fill)
            eye = torch.eye(width, dtype=torch.bool, device=hidden.device)[None, None]
            pad_rows = (~real)[:, None, :, None] & eye
            allow = True if picked.dtype == torch.bool else 0.0
            new_mask = new_mask.masked_fill(~real[:, None, :, None], fill).masked_fill(pad_rows, allow)
    else:  # a decode step: the cached prefix is shorter by `removed` tokens in these layers
        new_pos = pos - st.removed.to(hidden.device)[:, None]
        q = hidden.shape[1]
        if mask is None and bool(real.all()):
            new_mask = None
        else:
            kv = st.call_past + q
            base = mask if mask is not None else torch.ones(rows, 1, q, kv, dtype=torch.bool, device=hidden.device)
            base = base.expand(rows, -1, -1, -1)
            prefix = base[..., : st.orig_len].gather(3, safe[:, None, None, :].expand(-1, base.shape[1], q, -1))
            prefix = prefix.masked_fill(~real[:, None, None, :], _masked_value(prefix))
            new_mask = torch.cat([prefix, base[..., st.orig_len:]], dim=-1)
    cos, sin = rotary(hidden, position_ids=new_pos)
    return {"attention_mask": new_mask, "position_embeddings": (cos, sin), "position_ids": new_pos}


def _later_layer_hook(module, args, kwargs, slot: ContextSlot, rotary: nn.Module):
    """Pre-hook on every decoder layer after the pruning layer: the shortened sequence's mask and positions."""
    ctx = slot.ctx
    if ctx is None or LLM_KEY not in ctx.state:
        return None
    st: LlmState = ctx.state[LLM_KEY]
    if st.src is None:
        return None
    if st.layer_kwargs is None:
        hidden = input_hidden_states(args, kwargs)
        st.layer_kwargs = _layer_kwargs(st, hidden, kwargs.get("attention_mask"), rotary)
    return args, {**kwargs, **st.layer_kwargs}


def attach(handle: HookHandle, model: nn.Module, adapter: ModelAdapter, slot: ContextSlot, llm_layer: int) -> None:
    """Register the LLM-stage hooks on `handle` (the caller removes them if anything fails)."""
    lm = adapter.language_model
    handle.forward_pre_hook(model, functools.partial(_labels_hook, slot=slot), with_kwargs=True)
    handle.forward_pre_hook(lm, functools.partial(_lm_hook, slot=slot), with_kwargs=True)
    handle.forward_pre_hook(adapter.lm_layers[llm_layer].self_attn,
                            functools.partial(_score_hook, slot=slot, layer=llm_layer), with_kwargs=True)
    handle.forward_hook(adapter.lm_layers[llm_layer], functools.partial(_shorten_hook, slot=slot), prepend=True)
    for layer in adapter.lm_layers[llm_layer + 1:]:
        handle.forward_pre_hook(layer, functools.partial(_later_layer_hook, slot=slot, rotary=lm.rotary_emb),
                                with_kwargs=True)
