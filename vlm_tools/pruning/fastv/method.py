"""`fastv`: after decoder layer K-1, drop the image tokens the last token attends to least (FastV, arXiv 2403.06764).

Ranking (the official one): inside layer K-1, the head-mean softmax attention row of the last (real) token over all
keys, recomputed in fp32 from the attention module's inputs (`q` of the last token against the post-RoPE keys, GQA
heads repeated; padding keys excluded), restricted to each image's tokens. Each image keeps `keep` of its patch
tokens (or drops the fraction `ratio`), as every method in this package; on LLaVA-NeXT the `image_newline` tokens
are always kept and the budget counts patch tokens only (as the core's rule for vision-side methods).

How the pruning acts (layers K .. L-1 really run on the shorter sequence, so prefill FLOPs drop):
- a pre-hook on layer K gathers the kept positions of the hidden states, the rotary `(cos, sin)`, `position_ids`
  and the attention mask's rows and columns. Kept tokens keep their original rotary positions (as the official
  code, which passes the kept indices as position ids). Samples of a batch may keep different numbers of tokens;
  the shorter ones get leading dummy slots that no query can see (left-padding style);
- pre-hooks on layers K+1 .. L-1 apply the same gathers to the mask and rotary inputs (the decoder loop passes
  the full-length ones to every layer);
- a forward hook on the last decoder layer scatters the outputs back to the full length. Dropped positions carry
  their hidden state from the input of layer K unchanged, so the logits keep the caller's sequence length (loss,
  loglikelihood, batch-vs-single comparisons work per position; logits at dropped positions are not meaningful).

KV cache during `generate` (HF `DynamicCache`): layers 0 .. K-1 cache all prompt tokens; layers K .. L-1 cache only
the kept ones (and the dummy slots), because their prefill ran on the short sequence. The cache is never edited.
At each decoding step the decoder receives a mask over the full-length key axis (sized from layer 0 of the cache);
the pre-hooks of layers K .. L-1 gather its columns as `[kept prompt positions, all generated positions]`, which is
exactly the layout of those layers' cache, and hide the dummy slots. The new token's rotary position is its
original one. This equals running the hand-pruned model (tests/test_fastv.py checks token-for-token equality with
a reference that runs the layers by hand). A pass whose cache is empty (prefill, or every step of
`generate(use_cache=False)`) decides afresh from its own last token, as FastV without a cache does; continuing a
cache produced by another call is refused. Only `DynamicCache` is supported (static caches index by position).
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from vlm_tools._registry import register_method
from vlm_tools.core.adapters import ModelAdapter
from vlm_tools.core.hooks import HookHandle
from vlm_tools.pruning.base import CallContext, ContextSlot, Pruner, all_rows
from vlm_tools.pruning.fastv.config import FastVConfig
from vlm_tools.pruning.fastv.rows import (
    attention_rows,
    check_lm_attention,
    layer_inputs,
    rotated_keys,
    rotated_queries,
    visible_keys,
)

__all__ = ["FastV", "STATE_KEY", "LM_INDEX_KEY", "image_token_layout", "last_real_rows"]

#: `ctx.state` key of FastV's per-call state.
STATE_KEY = "fastv"
#: `ctx.state` key under which an LLM-shortening method publishes, for observers such as the text-dominance
#: collector, `{"from_layer": K, "index": (B, S) original positions, "valid": (B, S), "length": L}`.
LM_INDEX_KEY = "lm_index"
SUPPORTED_ATTN = ("sdpa", "eager")


@dataclass
class _Decision:
    """What one full pass keeps: per sample the sorted original positions, dummies first."""

    index: torch.Tensor  # (B, S) original positions (dummy slots repeat the sample's first kept position)
    valid: torch.Tensor  # (B, S) False on dummy slots
    length: int  # L, the full prompt length of the pass
    layer: int  # K
    full: torch.Tensor | None = None  # hidden states entering layer K (scattered back after the last layer)

    @property
    def has_dummies(self) -> bool:
        return not bool(self.valid.all())


def image_token_layout(adapter: ModelAdapter, ctx: CallContext, image: int) -> torch.Tensor:
    """Original patch index of each LLM placeholder token of one image; -1 for tokens that are never pruned.

    LLaVA: the patch grid in order (a leading -1 for the CLS feature when the select strategy is "full").
    LLaVA-NeXT: `crop * patches_per_crop + patch` in HF's packed order, -1 at `image_newline` tokens.
    """
    key = ("fastv_layout", image)
    if key in ctx.state:
        return ctx.state[key]
    kept = ctx.kept if ctx.kept is not None else all_rows(ctx)  # an llm-kind method sees every patch
    ctx.state[key] = adapter.token_layout(ctx.plan, kept, image)
    return ctx.state[key]


def last_real_rows(mask2d: torch.Tensor | None, batch: int, length: int, device) -> torch.Tensor:
    """`(B,)` index of each sample's last non-padding position (the last position without a 2-D mask)."""
    if mask2d is None or mask2d.shape[-1] != length:
        return torch.full((batch,), length - 1, dtype=torch.long, device=device)
    pos = torch.arange(1, length + 1, device=mask2d.device)
    return ((mask2d.bool().long() * pos).max(dim=1).values - 1).clamp_min(0).to(device)


def _budget(n_valid: int, keep: int | None, ratio: float | None) -> int:
    if keep is not None:
        return min(keep, n_valid)
    return max(1, round(n_valid * (1.0 - ratio)))


# -- hooks (module-level functions, bound with functools.partial) ------------------------------------------------

def _lm_pre_hook(module, args, kwargs, slot: ContextSlot) -> None:
    """Classify each language-model call: a full pass (empty cache) decides; a cached step reuses the decision."""
    ctx = slot.ctx
    if ctx is None:
        return
    from transformers import DynamicCache

    st = ctx.state.setdefault(STATE_KEY, {})
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is not None and not isinstance(cache, DynamicCache):
        raise TypeError(f"fastv needs the default DynamicCache during generation, got {type(cache).__name__} "
                        "(its pruned layers cache fewer tokens than the others)")
    full = cache is None or cache.get_seq_length() == 0
    am = kwargs.get("attention_mask")
    st["mask2d"] = am if isinstance(am, torch.Tensor) and am.dim() == 2 else None
    st["full_pass"] = full
    if full:
        st["decision"] = None
        ctx.state.pop(LM_INDEX_KEY, None)
    elif "decision" not in st:
        raise RuntimeError("fastv cannot continue a KV cache produced outside this call: its pruned layers hold "
                           "fewer tokens; run the whole generation through the wrapped model")


def _score_hook(module, args, kwargs, slot: ContextSlot, config: FastVConfig, adapter_ref) -> None:
    """Inside layer K-1's attention (full passes): rank each image's tokens by the last token's attention."""
    ctx = slot.ctx
    if ctx is None or STATE_KEY not in ctx.state:
        return
    st = ctx.state[STATE_KEY]
    if not st["full_pass"] or st["decision"] is not None:
        return
    adapter = adapter_ref()
    hidden, pos_emb, mask = layer_inputs(args, kwargs)
    b, length, _ = hidden.shape
    spans = ctx.lm_spans or [[] for _ in range(b)]
    if not any(spans):
        st["decision"] = "identity"
        return
    rows = last_real_rows(st.get("mask2d"), b, length, hidden.device)
    q = rotated_queries(module, hidden, pos_emb, rows)
    keys = rotated_keys(module, hidden, pos_emb)
    vis = visible_keys(mask, rows, length, length)
    probs = attention_rows(q, keys, module.scaling, vis, module.num_key_value_groups).mean(1).cpu()  # (B, L)

    drops, kept, after = [], {}, []
    for s in range(b):
        drop_s, n_after = [], 0
        for start, n, img in spans[s]:
            layout = image_token_layout(adapter, ctx, img)
            if layout.numel() != n:
                raise RuntimeError(f"sample {s}: image {img} has {n} placeholder tokens in the LLM input but its "
                                   f"layout has {layout.numel()}")
            patch_pos = torch.nonzero(layout >= 0).flatten()
            k = _budget(patch_pos.numel(), config.keep, config.ratio)
            scores = probs[s, start:start + n][patch_pos]
            order = torch.sort(scores, descending=True, stable=True).indices
            keep_local, drop_local = patch_pos[order[:k]], patch_pos[order[k:]]
            kept[(s, img)] = layout[keep_local].sort().values
            drop_s.append(drop_local + start)
            n_after += n - drop_local.numel()
        drops.append(torch.cat(drop_s) if drop_s else torch.zeros(0, dtype=torch.long))
        after.append(n_after)
    ctx.llm_kept = kept
    ctx.state["tokens_after"] = after
    where = f"llm.layers.{config.layer}"
    ctx.layer_tokens[:] = [r for r in ctx.layer_tokens if r[0] != where] + [(where, list(after))]
    if all(d.numel() == 0 for d in drops):
        st["decision"] = "identity"
        return
    keep_lists = []
    for s in range(b):
        m = torch.ones(length, dtype=torch.bool)
        m[drops[s]] = False
        keep_lists.append(torch.nonzero(m).flatten())
    width = max(k.numel() for k in keep_lists)
    index = torch.zeros(b, width, dtype=torch.long)
    valid = torch.zeros(b, width, dtype=torch.bool)
    for s, k in enumerate(keep_lists):
        pad = width - k.numel()
        index[s, pad:] = k
        index[s, :pad] = k[0]
        valid[s, pad:] = True
    dev = hidden.device
    dec = _Decision(index=index.to(dev), valid=valid.to(dev), length=length, layer=config.layer)
    st["decision"] = dec
    ctx.state[LM_INDEX_KEY] = {"from_layer": config.layer, "index": dec.index, "valid": dec.valid,
                               "length": length}


def _gather_seq(t: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """Gather positions `index` (B, S) along `dim` of `t` (batch dim 0 broadcast if 1)."""
    b = index.shape[0]
    if t.shape[0] != b:
        t = t.expand(b, *t.shape[1:])
    shape = [b] + [1] * (t.dim() - 1)
    shape[dim] = index.shape[1]
    idx = index.view(shape).expand(*[s if i != dim else index.shape[1] for i, s in enumerate(t.shape)])
    return t.gather(dim, idx)


def _hide(mask: torch.Tensor, hidden_cols: torch.Tensor) -> torch.Tensor:
    """Hide key columns (B, kv) of a 4-D bool or additive mask."""
    cols = hidden_cols[:, None, None, :]
    if mask.dtype == torch.bool:
        return mask & ~cols
    return mask.masked_fill(cols, torch.finfo(mask.dtype).min)


def _dummy_rows_self_only(mask: torch.Tensor, dummy: torch.Tensor) -> torch.Tensor:
    """Let dummy query rows see only themselves (finite outputs; no real token ever sees them)."""
    s = mask.shape[-1]
    eye = torch.eye(s, dtype=torch.bool, device=mask.device)
    rows = dummy[:, None, :, None]
    if mask.dtype == torch.bool:
        return torch.where(rows, eye, mask)
    low = torch.finfo(mask.dtype).min
    own = torch.zeros((), dtype=mask.dtype, device=mask.device)
    return torch.where(rows, torch.where(eye, own, torch.full((), low, dtype=mask.dtype, device=mask.device)), mask)


def _new_mask(shape: tuple[int, int, int], causal_offset: int, visible_cols: torch.Tensor, eager: bool,
              dtype: torch.dtype) -> torch.Tensor:
    """A 4-D mask `(B, 1, q, kv)`: causal (query i sits at key `causal_offset + i`) and `visible_cols`."""
    _, q, kv = shape
    dev = visible_cols.device
    causal = torch.arange(kv, device=dev)[None, :] <= (causal_offset + torch.arange(q, device=dev))[:, None]
    m = causal[None, None] & visible_cols[:, None, None, :]
    if not eager:
        return m
    out = torch.zeros(m.shape, dtype=dtype, device=dev)
    return out.masked_fill(~m, torch.finfo(dtype).min)


def _prefill_mask(mask, dec: _Decision, eager: bool, dtype) -> torch.Tensor | None:
    if mask is None:
        if not dec.has_dummies:
            return None  # causal over the kept tokens in their original order: what SDPA's is_causal does
        s = dec.index.shape[1]
        m = _new_mask((dec.index.shape[0], s, s), 0, dec.valid, eager, dtype)
    else:
        if mask.dim() != 4:
            raise ValueError(f"fastv expects a 4-D attention mask (sdpa/eager), got shape {tuple(mask.shape)}")
        m = _gather_seq(_gather_seq(mask, dec.index, 2), dec.index, 3)
        if not dec.has_dummies:
            return m
        m = _hide(m, ~dec.valid)
    return _dummy_rows_self_only(m, ~dec.valid)


def _decode_mask(mask, dec: _Decision, q_len: int, full_kv: int | None, eager: bool, dtype) -> torch.Tensor | None:
    b = dec.index.shape[0]
    dev = dec.index.device
    if mask is None:
        if not dec.has_dummies:
            return None
        if full_kv is None:
            raise RuntimeError("fastv: decoding a padded batch needs the 2-D attention_mask")
        extra = full_kv - dec.length
        vis = torch.cat([dec.valid, torch.ones(b, extra, dtype=torch.bool, device=dev)], dim=1)
        return _new_mask((b, q_len, vis.shape[1]), vis.shape[1] - q_len, vis, eager, dtype)
    if mask.dim() != 4:
        raise ValueError(f"fastv expects a 4-D attention mask (sdpa/eager), got shape {tuple(mask.shape)}")
    kv = mask.shape[-1]
    new = torch.arange(dec.length, kv, device=dev).expand(b, -1)
    cols = torch.cat([dec.index, new], dim=1)
    m = _gather_seq(mask, cols, 3)
    if dec.has_dummies:
        vis = torch.cat([dec.valid, torch.ones_like(new, dtype=torch.bool)], dim=1)
        m = _hide(m, ~vis)
    return m


def _layer_pre_hook(module, args, kwargs, slot: ContextSlot, first: bool):
    """On decoder layers K .. L-1: run them on the kept tokens (full passes) / against the short cache (steps)."""
    ctx = slot.ctx
    if ctx is None or STATE_KEY not in ctx.state:
        return None
    st = ctx.state[STATE_KEY]
    dec = st.get("decision")
    if not isinstance(dec, _Decision):
        return None
    hidden = args[0] if args else kwargs["hidden_states"]
    mask = kwargs.get("attention_mask")
    eager = module.self_attn.config._attn_implementation == "eager"
    kwargs = dict(kwargs)
    if st["full_pass"]:
        if first:
            if hidden.shape[1] != dec.length:
                raise RuntimeError(f"fastv: layer {dec.layer} got {hidden.shape[1]} tokens, expected {dec.length}")
            dec.full = hidden
            hidden = _gather_seq(hidden, dec.index, 1)
        elif hidden.shape[1] != dec.index.shape[1]:
            raise RuntimeError(f"fastv: a pruned layer got {hidden.shape[1]} tokens, expected {dec.index.shape[1]}")
        cos, sin = kwargs["position_embeddings"]
        kwargs["position_embeddings"] = (_gather_seq(cos, dec.index, 1), _gather_seq(sin, dec.index, 1))
        pid = kwargs.get("position_ids")
        if isinstance(pid, torch.Tensor) and pid.dim() == 2 and pid.shape[-1] == dec.length:
            kwargs["position_ids"] = _gather_seq(pid, dec.index, 1)
        kwargs["attention_mask"] = _prefill_mask(mask, dec, eager, hidden.dtype)
    else:
        m2 = st.get("mask2d")
        full_kv = None if m2 is None else m2.shape[-1]
        kwargs["attention_mask"] = _decode_mask(mask, dec, hidden.shape[1], full_kv, eager, hidden.dtype)
    if args:
        return (hidden, *args[1:]), kwargs
    kwargs["hidden_states"] = hidden
    return args, kwargs


def _scatter_hook(module, args, output, slot: ContextSlot):
    """After the last decoder layer of a full pass: put the kept tokens back at their original positions."""
    ctx = slot.ctx
    if ctx is None or STATE_KEY not in ctx.state:
        return None
    st = ctx.state[STATE_KEY]
    dec = st.get("decision")
    if not st["full_pass"] or not isinstance(dec, _Decision) or dec.full is None:
        return None
    short = output[0] if isinstance(output, tuple) else output
    full = dec.full.clone()
    for s in range(full.shape[0]):
        v = dec.valid[s]
        full[s, dec.index[s, v]] = short[s, v].to(full.dtype)
    dec.full = None
    return (full, *output[1:]) if isinstance(output, tuple) else full


@register_method("fastv", kind="llm", config=FastVConfig,
                 description="FastV: drop the image tokens the last token attends to least after LLM layer K")
class FastV(Pruner):
    """FastV inside the language model; the KV cache of the pruned layers holds the kept tokens only."""

    def check(self, adapter: ModelAdapter) -> None:
        n = len(adapter.lm_layers)
        if self.config.layer >= n:
            raise ValueError(f"fastv layer={self.config.layer} must be below the number of decoder layers ({n}): "
                             "layer K is the first one that runs without the dropped tokens")
        impl = adapter.language_model.config._attn_implementation
        if impl not in SUPPORTED_ATTN:
            raise ValueError(f"fastv supports attn_implementation {SUPPORTED_ATTN} in the language model, got "
                             f"{impl!r}; call model.set_attn_implementation('sdpa') first")
        check_lm_attention(adapter.lm_layers[self.config.layer - 1].self_attn)

    def attach(self, model: nn.Module, adapter: ModelAdapter, slot: ContextSlot) -> HookHandle:
        handle = HookHandle(self.name)
        k = self.config.layer
        layers = adapter.lm_layers
        try:
            handle.forward_pre_hook(adapter.language_model, functools.partial(_lm_pre_hook, slot=slot),
                                    with_kwargs=True)
            handle.forward_pre_hook(layers[k - 1].self_attn,
                                    functools.partial(_score_hook, slot=slot, config=self.config,
                                                      adapter_ref=weakref.ref(adapter)),
                                    with_kwargs=True)
            for i in range(k, len(layers)):
                handle.forward_pre_hook(layers[i], functools.partial(_layer_pre_hook, slot=slot, first=i == k),
                                        with_kwargs=True)
            handle.forward_hook(layers[len(layers) - 1], functools.partial(_scatter_hook, slot=slot))
        except BaseException:
            handle.remove()
            raise
        return handle

    @classmethod
    def example_config(cls, model: nn.Module, workdir: str | None = None) -> dict:
        """A small valid config for `model`: keep an eighth of the patches, prune after layer 1 (tiny models)."""
        cfg = super().example_config(model, workdir)
        cfg["layer"] = 1
        return cfg
