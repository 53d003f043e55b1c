"""Drop visual tokens inside the language model: the one primitive every LLM-stage method uses.

An `LmDrop(after_layer=j, ...)` attached to a wrapped model makes decoder layers `> j` run on (and cache) only the
positions a method keeps; layers `<= j` keep the full prompt in their KV cache. A method scores inside layer j (a
pre-hook on its attention, reading `ctx.lm_call`) and calls `drop.decide(ctx, drops, visual_after)`. Then:

* prefill: a forward hook on layer j (registered first, so transformers' own output capture sees the result)
  shortens its output to the kept positions; samples of a batch may keep different numbers of positions, the
  shorter rows get padding slots on the batch's padding side that no real token sees (a padding slot attends only to
  itself, so its values stay finite);
* pre-hooks on layers `> j` replace the attention mask (rows and columns of the kept positions, padding slots
  hidden), the rotary `position_embeddings` and `position_ids`: `positions="original"` keeps each kept token's own
  rotary position (FastV); `positions="renumber"` numbers the kept tokens contiguously (FlowCut's LLM stage); the
  replacement is computed once per language-model call;
* decoding steps (HF `DynamicCache`): the decoder's mask covers the full-length key axis (sized from layer 0's
  cache); layers `> j` get its columns gathered as `[kept prompt positions, generated positions]`, which is exactly
  their shorter cache's layout; with `positions="renumber"` the new token's position is shifted down by the number of
  tokens removed from its row;
* `scatter_back=True` (FastV): a forward hook on the last decoder layer puts the kept positions back at their
  original places, the removed ones carrying their hidden state from layer j unchanged, so the logits keep the
  caller's sequence length (loss and loglikelihood per position work). Without it the logits cover the shortened
  sequence.

A pass with an empty cache (the prefill, every step of `generate(use_cache=False)`) decides afresh; continuing a
cache produced outside the call is refused. The decision is published as `ctx.lm_keep` (`LmKeep`, the kept layout
that analysis tools read), the visual tokens per sample as `ctx.tokens_after` and the trace record `llm.<j>`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

from vlm_tools.core.attention import input_hidden_states
from vlm_tools.core.hooks import HookHandle
from vlm_tools.core.method import CallContext, ContextSlot, LmCall, LmKeep

__all__ = ["LmDrop", "POSITION_MODES", "SUPPORTED_ATTENTION"]

POSITION_MODES = ("original", "renumber")
SUPPORTED_ATTENTION = ("sdpa", "eager")


# -- tensor helpers ----------------------------------------------------------------------------------------------

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


def _pad_rows_self_only(mask: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
    """Let padding-slot query rows see only themselves (finite outputs; no real token ever sees them)."""
    s = mask.shape[-1]
    eye = torch.eye(s, dtype=torch.bool, device=mask.device)
    rows = pad[:, None, :, None]
    if mask.dtype == torch.bool:
        return torch.where(rows, eye, mask)
    low = torch.full((), torch.finfo(mask.dtype).min, dtype=mask.dtype, device=mask.device)
    own = torch.zeros((), dtype=mask.dtype, device=mask.device)
    return torch.where(rows, torch.where(eye, own, low), mask)


def _new_mask(shape: tuple[int, int, int], causal_offset: int, visible_cols: torch.Tensor, eager: bool,
              dtype: torch.dtype) -> torch.Tensor:
    """A 4-D mask `(B, 1, q, kv)`: causal (query i sits at key `causal_offset + i`) and `visible_cols`."""
    _, q, kv = shape
    dev = visible_cols.device
    causal = torch.arange(kv, device=dev)[None, :] <= (causal_offset + torch.arange(q, device=dev))[:, None]
    m = causal[None, None] & visible_cols[:, None, None, :]
    if not eager:
        return m
    return torch.zeros(m.shape, dtype=dtype, device=dev).masked_fill(~m, torch.finfo(dtype).min)


def _prefill_mask(mask: torch.Tensor | None, keep: LmKeep, eager: bool, dtype) -> torch.Tensor | None:
    padded = not bool(keep.valid.all())
    if mask is None:
        if not padded:
            return None  # causal over the kept tokens in their original order: what SDPA's is_causal does
        s = keep.index.shape[1]
        m = _new_mask((keep.index.shape[0], s, s), 0, keep.valid, eager, dtype)
    else:
        m = _gather_seq(_gather_seq(mask, keep.index, 2), keep.index, 3)
        if not padded:
            return m
        m = _hide(m, ~keep.valid)
    return _pad_rows_self_only(m, ~keep.valid)


def _decode_mask(mask: torch.Tensor | None, keep: LmKeep, q_len: int, call: LmCall, eager: bool,
                 dtype) -> torch.Tensor | None:
    b, dev = keep.index.shape[0], keep.index.device
    padded = not bool(keep.valid.all())
    if mask is None:
        if not padded:
            return None
        if call.mask2d is None:
            raise RuntimeError("decoding a padded batch after an LLM-stage drop needs the 2-D attention_mask")
        extra = call.mask2d.shape[-1] - keep.length
        vis = torch.cat([keep.valid, torch.ones(b, extra, dtype=torch.bool, device=dev)], dim=1)
        return _new_mask((b, q_len, vis.shape[1]), vis.shape[1] - q_len, vis, eager, dtype)
    new = torch.arange(keep.length, mask.shape[-1], device=dev).expand(b, -1)
    m = _gather_seq(mask, torch.cat([keep.index, new], dim=1), 3)
    if padded:
        m = _hide(m, ~torch.cat([keep.valid, torch.ones_like(new, dtype=torch.bool)], dim=1))
    return m


# -- hooks (module-level functions bound with functools.partial) -------------------------------------------------

def _call_hook(module, args, kwargs, slot: ContextSlot) -> None:
    """Pre-hook on the language model: record the call; a prefill resets the decision."""
    ctx = slot.ctx
    if ctx is None:
        return
    from transformers import DynamicCache

    cache = kwargs.get("past_key_values", kwargs.get("cache"))
    if cache is not None and not isinstance(cache, DynamicCache):
        raise TypeError(f"an LLM-stage drop needs the default DynamicCache during generation, got "
                        f"{type(cache).__name__} (the layers after the drop cache fewer tokens than the others)")
    embeds = kwargs.get("inputs_embeds")
    ref = embeds if embeds is not None else kwargs.get("input_ids", args[0] if args else None)
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() != 2:
        raise ValueError("an LLM-stage drop needs the 2-D attention mask of a dynamic cache; static / compiled "
                         "caches are not supported")
    spans = ctx.lm_spans or []
    rows = int(ref.shape[0])
    if not spans or rows % len(spans):
        raise ValueError(f"the language model saw {rows} rows for {len(spans)} prompts")
    per = rows // len(spans)  # generate repeats each sample num_beams / num_return_sequences times
    past = int(cache.get_seq_length()) if cache is not None else 0
    if past == 0:
        ctx.lm_keep = None
    elif ctx.lm_call is None:
        raise RuntimeError("cannot continue a KV cache produced outside this call: the layers after an LLM-stage "
                           "drop hold fewer tokens; run the whole generation through the wrapped model")
    forced = ctx.forced_tokens.repeat_interleave(per) if ctx.forced_tokens is not None and past == 0 else None
    ctx.lm_call = LmCall(mask2d=mask if isinstance(mask, torch.Tensor) else None,
                         position_ids=kwargs.get("position_ids"), length=int(ref.shape[1]), past=past,
                         spans=[spans[r // per] for r in range(rows)], per_sample=per, forced=forced,
                         first=ctx.lm_call is None)


def _shorten_hook(module, args, output, slot: ContextSlot, scatter_back: bool):
    """Forward hook on layer j (prefill): keep only the decided positions of its output."""
    ctx = slot.ctx
    if ctx is None or ctx.lm_keep is None or ctx.lm_call is None or not ctx.lm_call.prefill:
        return None
    keep = ctx.lm_keep
    hidden = output if isinstance(output, torch.Tensor) else output[0]
    if hidden.shape[1] != keep.length:
        raise RuntimeError(f"layer {keep.after_layer} returned {hidden.shape[1]} positions, expected {keep.length}")
    if scatter_back:
        keep.held = hidden
    short = _gather_seq(hidden, keep.index, 1).masked_fill(~keep.valid[..., None], 0.0)
    return short if isinstance(output, torch.Tensor) else (short, *output[1:])


def _layer_kwargs(keep: LmKeep, call: LmCall, hidden: torch.Tensor, kwargs: dict, positions: str,
                  rotary: nn.Module | None, eager: bool) -> dict:
    """The attention mask, rotary embeddings and position ids of the shortened sequence for this call."""
    mask = kwargs.get("attention_mask")
    rows, dev = keep.index.shape[0], hidden.device
    out: dict = {}
    if call.prefill:
        out["attention_mask"] = _prefill_mask(mask, keep, eager, hidden.dtype)
        pid = kwargs.get("position_ids")
        if positions == "original":
            cos, sin = kwargs["position_embeddings"]
            out["position_embeddings"] = (_gather_seq(cos, keep.index, 1), _gather_seq(sin, keep.index, 1))
            if isinstance(pid, torch.Tensor) and pid.dim() == 2 and pid.shape[-1] == keep.length:
                out["position_ids"] = _gather_seq(pid, keep.index, 1)
            return out
        kept = torch.zeros(rows, keep.length, dtype=torch.long, device=dev)
        kept.scatter_reduce_(1, keep.index, keep.valid.long(), reduce="amax")
        gone = 1 - kept
        before = torch.cumsum(gone, 1).gather(1, keep.index)  # removed positions before each kept one
        new_pos = (call.positions(rows, dev).gather(1, keep.index) - before).masked_fill(~keep.valid, 0)
    else:
        out["attention_mask"] = _decode_mask(mask, keep, hidden.shape[1], call, eager, hidden.dtype)
        if positions == "original":
            return out
        new_pos = call.positions(rows, dev) - keep.removed.to(dev)[:, None]
    out["position_embeddings"] = rotary(hidden, position_ids=new_pos)
    out["position_ids"] = new_pos
    return out


def _layer_hook(module, args, kwargs, slot: ContextSlot, positions: str, rotary: nn.Module | None, eager: bool):
    """Pre-hook on every decoder layer after j: the shortened sequence's mask and positions."""
    ctx = slot.ctx
    if ctx is None or ctx.lm_keep is None or ctx.lm_call is None:
        return None
    keep, call = ctx.lm_keep, ctx.lm_call
    hidden = input_hidden_states(args, kwargs)
    if call.prefill and hidden.shape[1] != keep.index.shape[1]:
        raise RuntimeError(f"a decoder layer after the drop got {hidden.shape[1]} positions, expected "
                           f"{keep.index.shape[1]}")
    if call.layer_kwargs is None:
        call.layer_kwargs = _layer_kwargs(keep, call, hidden, kwargs, positions, rotary, eager)
    return args, {**kwargs, **call.layer_kwargs}


def _scatter_hook(module, args, output, slot: ContextSlot):
    """Forward hook on the last decoder layer (prefill): put the kept positions back at their original places."""
    ctx = slot.ctx
    if ctx is None or ctx.lm_keep is None or ctx.lm_keep.held is None or not ctx.lm_call.prefill:
        return None
    keep = ctx.lm_keep
    short = output[0] if isinstance(output, tuple) else output
    full = keep.held.clone()
    for s in range(full.shape[0]):
        v = keep.valid[s]
        full[s, keep.index[s, v]] = short[s, v].to(full.dtype)
    keep.held = None
    return (full, *output[1:]) if isinstance(output, tuple) else full


@dataclass(frozen=True)
class LmDrop:
    """Drop positions after decoder layer `after_layer` (see the module docstring).

    Attributes:
        after_layer: j; layers `> j` run on the kept positions.
        positions: "original" (kept tokens keep their rotary positions) or "renumber" (contiguous after the drop).
        scatter_back: restore the full sequence after the last layer (logits keep the caller's length).
    """

    after_layer: int
    positions: str = "original"
    scatter_back: bool = False

    def __post_init__(self) -> None:
        if self.positions not in POSITION_MODES:
            raise ValueError(f"positions must be one of {POSITION_MODES}, got {self.positions!r}")

    def check(self, adapter, who: str) -> None:
        """Raise a clear error (naming `who`, the method) if the drop cannot run on this model."""
        n = len(adapter.lm_layers)
        if not 0 <= self.after_layer < n or (self.scatter_back and self.after_layer >= n - 1):
            last = n - 2 if self.scatter_back else n - 1
            raise ValueError(f"{who}: the drop after decoder layer {self.after_layer} needs a layer index in "
                             f"0..{last} (the language model has {n} decoder layers)")
        impl = getattr(adapter.language_model.config, "_attn_implementation", None) or "eager"
        if impl not in SUPPORTED_ATTENTION:
            raise ValueError(f"{who} supports attn_implementation {SUPPORTED_ATTENTION} in the language model, got "
                             f"{impl!r}; call model.set_attn_implementation('sdpa') first")
        if self.positions == "renumber" and not hasattr(adapter.language_model, "rotary_emb"):
            raise ValueError(f"{who} renumbers rotary positions and needs a model-level rotary embedding "
                             f"(LLaMA-style decoder); {type(adapter.language_model).__name__} has none")

    def attach(self, handle: HookHandle, adapter, slot: ContextSlot) -> None:
        """Register the drop's hooks on `handle` (the caller removes them if anything fails)."""
        lm, layers = adapter.language_model, adapter.lm_layers
        impl = getattr(lm.config, "_attn_implementation", None) or "eager"
        rotary = getattr(lm, "rotary_emb", None)
        handle.forward_pre_hook(lm, functools.partial(_call_hook, slot=slot), with_kwargs=True)
        handle.forward_hook(layers[self.after_layer],
                            functools.partial(_shorten_hook, slot=slot, scatter_back=self.scatter_back), prepend=True)
        for layer in layers[self.after_layer + 1:]:
            handle.forward_pre_hook(layer, functools.partial(_layer_hook, slot=slot, positions=self.positions,
                                                             rotary=rotary, eager=impl == "eager"), with_kwargs=True)
        if self.scatter_back:
            handle.forward_hook(layers[len(layers) - 1], functools.partial(_scatter_hook, slot=slot), prepend=True)

    @staticmethod
    def scoring(ctx: CallContext | None) -> bool:
        """Whether a scoring hook should decide now: inside a wrapped prefill that has not decided yet."""
        return ctx is not None and ctx.lm_call is not None and ctx.lm_call.prefill and not ctx.lm_call.decided

    def decide(self, ctx: CallContext, drops: list[torch.Tensor] | None, visual_after: list[int] | None,
               device) -> None:
        """Publish the decision of this prefill.

        Args:
            ctx: the call context.
            drops: per row of the call, the prompt positions to remove (None: nothing is removed).
            visual_after: per row, the visual tokens the layers after the drop see (recorded in the trace per
                sample).
            device: where the hidden states live.
        """
        call = ctx.lm_call
        call.decided = True
        if visual_after is not None:
            per_sample = list(visual_after)[::call.per_sample]
            ctx.tokens_after = per_sample
            ctx.record_tokens(f"llm.{self.after_layer}", per_sample)
        if drops is None or all(d.numel() == 0 for d in drops):
            ctx.lm_keep = None
            return
        ctx.lm_keep = self._keep(call, drops, device)
        if call.first:
            ctx.prompt_keep = ctx.lm_keep

    def _keep(self, call: LmCall, drops: list[torch.Tensor], device) -> LmKeep:
        length = call.length
        keeps = []
        for d in drops:
            m = torch.ones(length, dtype=torch.bool)
            m[d.cpu()] = False
            keeps.append(torch.nonzero(m).flatten())
        width = max(k.numel() for k in keeps)
        index = torch.zeros(len(keeps), width, dtype=torch.long)
        valid = torch.zeros(len(keeps), width, dtype=torch.bool)
        right = call.mask2d is not None and bool((call.mask2d[:, -1] == 0).any()) and not bool(
            (call.mask2d[:, 0] == 0).any())
        for s, k in enumerate(keeps):
            sl = slice(0, k.numel()) if right else slice(width - k.numel(), width)
            index[s, sl] = k
            valid[s, sl] = True
        return LmKeep(after_layer=self.after_layer, index=index.to(device), valid=valid.to(device), length=length,
                      full_output=self.scatter_back)
