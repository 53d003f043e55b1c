"""`fastv`: after decoder layer K-1, drop the image tokens the last token attends to least (FastV, arXiv 2403.06764).

Ranking (the official one): inside layer K-1, the head-mean softmax attention row of the last (real) token over all
keys, recomputed in fp32 from the attention module's inputs (`q` of the last token against the post-RoPE keys, GQA
heads repeated; padding keys excluded), restricted to each image's tokens. Each image keeps `keep` of its patch
tokens (or drops the fraction `ratio`), as every method in this package; on LLaVA-NeXT the `image_newline` tokens
are always kept and the budget counts patch tokens only (as the core's rule for vision-side methods).

How the pruning acts: through the core's LLM token-drop primitive (`vlm_tools.core.lm_drop.LmDrop` with
`after_layer=K-1`, `positions="original"`, `scatter_back=True`). Layers K .. L-1 really run on the shorter sequence
(prefill FLOPs drop) and cache only the kept tokens; kept tokens keep their original rotary positions (as the
official code, which passes the kept indices as position ids); samples of a batch may keep different numbers of
tokens (padding slots no query can see); the last layer's output is scattered back to the full length, so the
logits keep the caller's sequence length (loss, loglikelihood, batch-vs-single comparisons work per position; logits
at dropped positions are not meaningful). At each decoding step the full-length mask's columns are gathered as
`[kept prompt positions, generated positions]`, exactly the pruned layers' cache. This equals running the
hand-pruned model (tests/test_fastv.py checks token-for-token equality with a reference that runs the layers by
hand). A pass whose cache is empty (prefill, or every step of `generate(use_cache=False)`) decides afresh from its
own last token, as FastV without a cache does. Only `DynamicCache` is supported (static caches index by position).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from vlm_tools._registry import register_method
from vlm_tools.core.adapters import ModelAdapter
from vlm_tools.core.attention import (
    attention_rows,
    check_lm_attention,
    layer_inputs,
    rotated_keys,
    rotated_queries,
    visible_keys,
)
from vlm_tools.core.hooks import HookHandle, attach_guarded
from vlm_tools.core.lm_drop import LmDrop
from vlm_tools.core.method import ContextSlot
from vlm_tools.pruning.base import Pruner
from vlm_tools.pruning.fastv.config import FastVConfig

__all__ = ["FastV"]


def _budget(n_valid: int, keep: int | None, ratio: float | None) -> int:
    if keep is not None:
        return min(keep, n_valid)
    return max(1, round(n_valid * (1.0 - ratio)))


def _score_hook(module, args, kwargs, slot: ContextSlot, config: FastVConfig, drop: LmDrop,
                adapter: ModelAdapter) -> None:
    """Inside layer K-1's attention (prefill): rank each image's tokens by the last token's attention."""
    ctx = slot.ctx
    if not LmDrop.scoring(ctx):
        return
    hidden, pos_emb, mask = layer_inputs(args, kwargs)
    b, length, _ = hidden.shape
    spans = ctx.lm_call.spans
    if not any(spans):
        drop.decide(ctx, None, None, hidden.device)
        return
    rows = ctx.lm_call.query_positions(b, hidden.device)
    q = rotated_queries(module, hidden, pos_emb, rows)
    keys = rotated_keys(module, hidden, pos_emb)
    vis = visible_keys(mask, rows, length, length)
    probs = attention_rows(q, keys, module.scaling, vis, module.num_key_value_groups).mean(1).cpu()  # (B, L)

    drops, kept, after = [], {}, []
    for s in range(b):
        drop_s, n_after = [], 0
        for start, n, img in spans[s]:
            layout = ctx.token_layout(adapter, img)
            if layout.numel() != n:
                raise RuntimeError(f"sample {s}: image {img} has {n} placeholder tokens in the LLM input but its "
                                   f"layout has {layout.numel()}")
            patch_pos = torch.nonzero(layout >= 0).flatten()
            k = _budget(patch_pos.numel(), config.keep, config.ratio)
            scores = probs[s, start:start + n][patch_pos]
            order = torch.sort(scores, descending=True, stable=True).indices
            keep_local, drop_local = patch_pos[order[:k]], patch_pos[order[k:]]
            kept[(ctx.lm_call.sample_of(s), img)] = layout[keep_local].sort().values
            drop_s.append(drop_local + start)
            n_after += n - drop_local.numel()
        drops.append(torch.cat(drop_s) if drop_s else torch.zeros(0, dtype=torch.long))
        after.append(n_after)
    ctx.llm_kept = kept
    drop.decide(ctx, drops, after, hidden.device)


@register_method("fastv", kind="llm", config=FastVConfig,
                 description="FastV: drop the image tokens the last token attends to least after LLM layer K")
class FastV(Pruner):
    """FastV inside the language model; the KV cache of the pruned layers holds the kept tokens only."""

    @property
    def drop(self) -> LmDrop:
        return LmDrop(after_layer=self.config.layer - 1, positions="original", scatter_back=True)

    def check(self, adapter: ModelAdapter) -> None:
        n = len(adapter.lm_layers)
        if self.config.layer >= n:
            raise ValueError(f"fastv layer={self.config.layer} must be below the number of decoder layers ({n}): "
                             "layer K is the first one that runs without the dropped tokens")
        self.drop.check(adapter, "fastv")
        check_lm_attention(adapter.lm_layers[self.config.layer - 1].self_attn)

    def attach(self, model: nn.Module, adapter: ModelAdapter, slot: ContextSlot) -> HookHandle:
        drop = self.drop

        def register(handle: HookHandle) -> None:
            drop.attach(handle, adapter, slot)
            handle.forward_pre_hook(adapter.lm_layers[self.config.layer - 1].self_attn,
                                    functools.partial(_score_hook, slot=slot, config=self.config, drop=drop,
                                                      adapter=adapter),
                                    with_kwargs=True)

        return attach_guarded(self.name, register)

    @classmethod
    def example_config(cls, model: nn.Module, workdir: str | None = None) -> dict:
        """A small valid config for `model`: keep an eighth of the patches, prune after layer 1 (tiny models)."""
        cfg = super().example_config(model, workdir)
        cfg["layer"] = 1
        return cfg
