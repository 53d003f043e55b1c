"""Hooks that accumulate, per decoder layer, the attention generated tokens pay to text vs image tokens.

For every decoder layer l, the attention rows of the queries that produce generated tokens (the last prompt
position in the prefill, then each decoding step's input token) are recomputed in fp32 from the attention module's
inputs (a forward pre-hook with the core's attention kit; the model keeps SDPA), summed over heads and over those
queries, and split by key type:

- text tokens T: the prompt's non-image tokens (system/template tokens and BOS included, padding excluded);
- non-text tokens O: the image placeholder tokens the LLM sees (after any pruning; LLaVA-NeXT newlines included);
- tokens generated earlier belong to neither set; their attention is left out and `A_T + A_O = 1` is restored by
  normalising `A_T, A_O` over T and O.

Inside a wrapped call whose method drops tokens in the LLM (FastV, FlowCut's LLaVA-NeXT stage), the layers after the
drop see only the kept positions: the collector maps its key types through the call's published kept layout
(`WrappedModel.context.lm_keep`), so every layer counts exactly the tokens it attended to.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from vlm_tools.analysis.metrics import compute_stats, stage_layers
from vlm_tools.analysis.report import DominanceReport
from vlm_tools.core.attention import (
    attention_rows,
    check_lm_attention,
    layer_inputs,
    rotated_keys,
    rotated_queries,
    visible_keys,
)
from vlm_tools.core.hooks import HookHandle

__all__ = ["DominanceCollector", "PAD", "TEXT", "IMAGE", "GENERATED"]

#: Key types.
PAD, TEXT, IMAGE, GENERATED = 0, 1, 2, 3


class _State:
    """Per-generation accumulators (created by `DominanceCollector.attach`, dropped by `remove`)."""

    def __init__(self, n_layers: int, image_token_id: int, wrapper: Any) -> None:
        self.n_layers = n_layers
        self.image_token_id = image_token_id
        self.wrapper = wrapper
        self.types: torch.Tensor | None = None  # (B, full length) key types in original positions
        self.prompt_len: int | None = None
        self.full_pass = True
        self.keys: dict[int, torch.Tensor] = {}
        self.a_text: dict[int, torch.Tensor] = {}
        self.a_image: dict[int, torch.Tensor] = {}
        self.n_text: dict[int, torch.Tensor] = {}
        self.n_image: dict[int, torch.Tensor] = {}
        self.queries = 0


def _vlm_pre_hook(module, args, kwargs, state: _State) -> None:
    ids = kwargs.get("input_ids", args[0] if args else None)
    if ids is None:
        raise RuntimeError("the dominance metrics need input_ids (to tell image from text tokens)")
    am = kwargs.get("attention_mask")
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    state.full_pass = cache is None or cache.get_seq_length() == 0
    if state.full_pass:
        real = am.bool() if isinstance(am, torch.Tensor) and am.dim() == 2 else torch.ones_like(ids, dtype=torch.bool)
        types = torch.where(ids == state.image_token_id, IMAGE, TEXT)
        types = torch.where(real, types, PAD)
        if state.prompt_len is None:
            state.prompt_len = ids.shape[1]
        types[:, state.prompt_len:] = torch.where(real[:, state.prompt_len:], GENERATED, PAD)
        state.types = types
        state.keys.clear()
    else:
        if state.types is None:
            raise RuntimeError("the dominance metrics must see the whole generation (prefill first)")
        new = torch.full(ids.shape, GENERATED, dtype=state.types.dtype, device=state.types.device)
        state.types = torch.cat([state.types, new], dim=1)


def _key_types(state: _State, layer: int, n_keys: int) -> torch.Tensor:
    """`(B, n_keys)` types of this layer's keys (mapped through an LLM-stage drop's kept layout if any)."""
    types = state.types
    ctx = state.wrapper.context if state.wrapper is not None else None
    keep = ctx.lm_keep if ctx is not None else None
    if keep is not None and layer >= keep.from_layer:
        return keep.keys_of(types, n_keys, PAD)
    if types.shape[1] != n_keys:
        raise RuntimeError(f"layer {layer} attends to {n_keys} keys but the prompt has {types.shape[1]} positions: "
                           "a method shortened the sequence inside the LLM; pass the WrappedModel as `wrapper` so "
                           "its kept layout is read")
    return types[:, :n_keys]


def _attn_pre_hook(module, args, kwargs, state: _State, layer: int) -> None:
    hidden, pos_emb, mask = layer_inputs(args, kwargs)
    b, q_len, _ = hidden.shape
    new_keys = rotated_keys(module, hidden, pos_emb)
    if state.full_pass or layer not in state.keys:
        keys = new_keys
    else:
        keys = torch.cat([state.keys[layer], new_keys], dim=2)
    state.keys[layer] = keys
    n_keys = keys.shape[2]
    rows = torch.full((b,), q_len - 1, dtype=torch.long, device=hidden.device)
    q = rotated_queries(module, hidden, pos_emb, rows)
    vis = visible_keys(mask, rows, n_keys, q_len)
    probs = attention_rows(q, keys, module.scaling, vis, module.num_key_value_groups).sum(1)  # (B, n_keys)
    types = _key_types(state, layer, n_keys).to(probs.device)
    is_t, is_o = (types == TEXT) & vis, (types == IMAGE) & vis
    state.a_text[layer] = state.a_text.get(layer, 0) + (probs * is_t).sum(1).double().cpu()
    state.a_image[layer] = state.a_image.get(layer, 0) + (probs * is_o).sum(1).double().cpu()
    state.n_text[layer] = is_t.sum(1).cpu()
    state.n_image[layer] = is_o.sum(1).cpu()
    if layer == 0:
        state.queries += 1


class DominanceCollector:
    """Hooks that accumulate, per decoder layer, the attention generated tokens pay to text vs image tokens.

    Use `with DominanceCollector(model) as col: model.generate(...)`, then `col.report()`. Works on a plain HF
    LLaVA / LLaVA-NeXT model or inside a `WrappedModel` call (pass the wrapper as `wrapper`; its per-call context
    says which positions the layers after an LLM-stage drop hold).

    Args:
        model: the base HF model (not the wrapper).
        wrapper: the `WrappedModel` whose calls are measured, or None.
    """

    def __init__(self, model: nn.Module, wrapper: Any = None) -> None:
        from vlm_tools.core.adapters import get_adapter

        self.adapter = get_adapter(model)
        for layer in self.adapter.lm_layers:
            check_lm_attention(layer.self_attn)
        self.wrapper = wrapper
        self.state: _State | None = None
        self._handle: HookHandle | None = None

    def attach(self) -> DominanceCollector:
        """Register the hooks (fresh accumulators); `remove()` or the context manager exit removes them."""
        if self._handle is not None and not self._handle.removed:
            raise RuntimeError("this DominanceCollector is already attached")
        ad = self.adapter
        self.state = _State(len(ad.lm_layers), ad.image_token_id, self.wrapper)
        handle = HookHandle("dominance")
        try:
            handle.forward_pre_hook(ad.model.model, functools.partial(_vlm_pre_hook, state=self.state),
                                    with_kwargs=True)
            for i, layer in enumerate(ad.lm_layers):
                handle.forward_pre_hook(layer.self_attn, functools.partial(_attn_pre_hook, state=self.state, layer=i),
                                        with_kwargs=True)
        except BaseException:
            handle.remove()
            raise
        self._handle = handle
        return self

    def remove(self) -> None:
        """Remove the hooks (idempotent); the accumulated statistics stay available to `report()`."""
        if self._handle is not None:
            self._handle.remove()
        if self.state is not None:
            self.state.keys.clear()
            self.state.wrapper = None

    def __enter__(self) -> DominanceCollector:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def report(self, sample: int = 0, boundaries: tuple[int, int] | None = None, generated_text: str = "",
               method: str | None = None, method_config: dict | None = None) -> DominanceReport:
        """Per-layer and per-stage MDI / AEI of one sample of the collected generation."""
        st = self.state
        if st is None or not st.a_text:
            raise RuntimeError("nothing collected: run generate() while the collector is attached")
        n = st.n_layers
        stages = stage_layers(n, boundaries)
        bounds = (len(stages["early"]), len(stages["early"]) + len(stages["middle"]))
        at = [float(st.a_text[l][sample]) for l in range(n)]
        ao = [float(st.a_image[l][sample]) for l in range(n)]
        nt = [float(st.n_text[l][sample]) for l in range(n)]
        no = [float(st.n_image[l][sample]) for l in range(n)]
        layers = [compute_stats(f"layer {l}", [l], at[l], ao[l], nt[l], no[l]) for l in range(n)]
        per_stage = {}
        for name, ls in stages.items():
            mean_t = sum(nt[l] for l in ls) / len(ls) if ls else 0.0
            mean_o = sum(no[l] for l in ls) / len(ls) if ls else 0.0
            per_stage[name] = compute_stats(name, ls, sum(at[l] for l in ls), sum(ao[l] for l in ls), mean_t, mean_o)
        return DominanceReport(layers=layers, stages=per_stage, boundaries=bounds, n_generated=st.queries,
                               generated_text=generated_text, method=method, method_config=dict(method_config or {}))
