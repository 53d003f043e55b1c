"""FlowCut inside the vision tower: information-flow scores, cumulative smoothing and progressive pruning.

Per vision block `l` that runs while a row still holds more patches than its target (`flowcut/modeling_clip_flowcut.py`
of the official code, re-derived here from the block's own input, in fp32):

* relation `a_i = mean_h softmax(q_CLS k^T * scale)[i]` (softmax over every token of the row, then the patch columns);
* semantic `s_i = mean_h softmax(v_CLS v^T)[i]` (unscaled value dot product, softmax over every token);
* density `||mean_h v_i||_1`;
* `S = (a / sum a + s / sum s) * density`, and `S_cum <- 0.5 S_cum + 0.5 S` (`S_cum = S` at the first block).

Blocks prune their own output when `rpl = feature_block - l - 1` is even and >= 0 (every second block, the last one
right before the feature block, so the feature block itself runs on the survivors). The number removed is
`P = round((N - T) / sqrt(rpl) * (1 - (H / log N)^2))` with `N` the row's current patches, `T` its target and `H` the
entropy of its normalised `a`; rows that share a count (see `FlowCutConfig.count_scope`) take the maximum; at
`rpl = 0` every row is cut to `T`. Survivors are the `max(N - P, T)` highest `S_cum`, kept in spatial order, together
with the CLS token and any trailing non-patch tokens (`plan.n_suffix`).

The scores come from the attention module's input, captured in a forward pre-hook, and are computed in fp32 after
the module has run: the CLS query is projected in fp32; keys and values are the module's own `k_proj` / `v_proj`
outputs when the tower runs in fp32 (bitwise what a recompute gives, at no cost), else they are recomputed from the
input in fp32. The model itself keeps its attention implementation (SDPA).

Rows of different lengths (different targets, or counts per image) are padded after their patches and the padding
is masked as keys in every later block (an additive mask passed to the block), so every real token sees exactly the
tokens it would see alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from vlm_tools.core.attention import input_hidden_states, split_heads, vit_project, vit_scale
from vlm_tools.core.method import CallContext, ContextSlot

__all__ = [
    "EMA",
    "ENTROPY_EPS",
    "STATE_KEY",
    "TowerState",
    "information_flow",
    "input_hook",
    "mask_hook",
    "projection_hook",
    "prune_blocks",
    "prune_hook",
    "removal_count",
    "score_hook",
]

STATE_KEY = "flowcut"
#: weight of the previous cumulative score (the official code's fixed 0.5 / 0.5 smoothing)
EMA = 0.5
#: added inside the entropy's log; the official LLaVA path has none, so a zero probability (fp16 underflow) gives NaN
ENTROPY_EPS = 1e-7
#: attention implementations that take the additive key-padding mask used for rows of different lengths
MASKABLE = ("eager", "sdpa")


@dataclass
class TowerState:
    """Per-call progress of FlowCut in the tower (lives in `ctx.state[STATE_KEY]`).

    Attributes:
        target: `(rows,)` patches each row is cut to at the last pruning block.
        scopes: groups of rows that share one adaptive count.
        n: `(rows,)` current number of real patch tokens per row.
        index: `(rows, T)` original patch index of each current patch slot (padding slots: `n_patches + j`).
        valid: `(rows, n_patches)` positions that may be kept (LLaVA-NeXT unpadding).
        key_mask: `(rows, L)` real (non-padding) tokens of the current sequence, `None` while all rows are full.
        cum: `(rows, T)` cumulative scores of the current slots (fp32), `None` before the first scored block.
        relation: `(rows, T)` head-mean CLS attention of the last scored block (drives the adaptive count).
        history: per scored block `(block, index, S, S_cum)` snapshots, for inspection and tests.
        events: per pruning block `(block, patches per row after it)`.
        pending: the current block's attention input (and fp32 `keys` / `values` projections) until it is scored.
    """

    target: torch.Tensor
    scopes: list[list[int]]
    n: torch.Tensor
    index: torch.Tensor
    valid: torch.Tensor
    key_mask: torch.Tensor | None = None
    cum: torch.Tensor | None = None
    relation: torch.Tensor | None = None
    history: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=list)
    events: list[tuple[int, list[int]]] = field(default_factory=list)
    pending: dict | None = None

    @property
    def active(self) -> torch.Tensor:
        """`(rows,)` rows that still hold more patches than their target."""
        return self.n > self.target


def prune_blocks(feature_block: int) -> list[tuple[int, int]]:
    """`(block, rpl)` of the pruning blocks: `rpl = feature_block - block - 1` even and >= 0 (official schedule)."""
    return [(b, feature_block - b - 1) for b in range(feature_block) if (feature_block - b - 1) % 2 == 0]


def information_flow(attn: nn.Module, hidden: torch.Tensor, head_dim: int, n_prefix: int, n_slots: int,
                     key_mask: torch.Tensor | None, keys: torch.Tensor | None = None,
                     values: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """FlowCut's per-block score of the patch slots, recomputed from the attention module's input in fp32.

    Args:
        attn: a ViT attention module with `q_proj`, `k_proj`, `v_proj` (CLIP / DINOv2).
        hidden: its input (the block's post-LayerNorm hidden states), `(rows, L, D)`.
        head_dim: per-head width.
        n_prefix: tokens before the patches (the CLS token is position 0).
        n_slots: patch slots after the prefix (real patches, then padding).
        key_mask: `(rows, L)` real tokens, or `None` when there is no padding.
        keys: the module's own fp32 `k_proj(hidden)` output `(rows, L, H * d)` if available (bitwise what a
            recompute gives), else it is recomputed in fp32.
        values: likewise for `v_proj`.

    Returns:
        `(relation, score)`, both `(rows, n_slots)` fp32: the head-mean CLS attention `a` and
        `S = (a / sum a + s / sum s) * ||mean_h v||_1`; padding slots hold 0.
    """
    q = vit_project(attn, hidden[:, :1], "q")  # (rows, H, 1, d)
    k = split_heads(keys, head_dim) if keys is not None else vit_project(attn, hidden, "k")  # (rows, H, L, d)
    v = split_heads(values, head_dim) if values is not None else vit_project(attn, hidden, "v")
    rel_logits = (q @ k.transpose(-1, -2)) * vit_scale(attn)  # (rows, H, 1, L)
    sem_logits = v[:, :, :1] @ v.transpose(-1, -2)  # unscaled, as the official code
    if key_mask is not None:
        pad = ~key_mask[:, None, None, :]
        rel_logits = rel_logits.masked_fill(pad, float("-inf"))
        sem_logits = sem_logits.masked_fill(pad, float("-inf"))
    patches = slice(n_prefix, n_prefix + n_slots)
    relation = torch.softmax(rel_logits, dim=-1).mean(1)[:, 0, patches]
    semantic = torch.softmax(sem_logits, dim=-1).mean(1)[:, 0, patches]
    density = v.mean(1)[:, patches].abs().sum(-1)
    score = (relation / relation.sum(-1, keepdim=True) + semantic / semantic.sum(-1, keepdim=True)) * density
    if key_mask is not None:
        score = score.masked_fill(~key_mask[:, patches], 0.0)
    return relation, score


def removal_count(relation: torch.Tensor, n: torch.Tensor, target: torch.Tensor, rpl: int) -> torch.Tensor:
    """Unrounded adaptive removal count per row (`adaptive_prune_ratio` of the official code, with an epsilon).

    `P = (N - T) / sqrt(rpl) * (1 - (H / log N)^2)`, `H = -sum p log(p + eps)`, `p = a / sum a` over the row's real
    patches (padding slots hold `a = 0` and add nothing).
    """
    prob = relation / relation.sum(-1, keepdim=True)
    entropy = -(prob * torch.log(prob + ENTROPY_EPS)).sum(-1)
    ratio = entropy / torch.log(n.to(relation.dtype))
    return (n - target).to(relation.dtype) / math.sqrt(rpl) * (1.0 - ratio ** 2)


def _state(ctx: CallContext) -> TowerState:
    st = ctx.state.get(STATE_KEY)
    if st is None:
        raise RuntimeError("flowcut: the tower state was not initialised before the vision tower ran")
    return st


def _rebuild(hidden: torch.Tensor, st: TowerState, slots: list[torch.Tensor], n_prefix: int, n_suffix: int,
             n_patches: int) -> torch.Tensor:
    """Shorten `(rows, L, D)` to the prefix, each row's kept slots (padded to the longest) and the suffix."""
    rows, length, dim = hidden.shape
    counts = torch.tensor([s.numel() for s in slots], device=hidden.device)
    width = int(counts.max())
    src = torch.zeros(rows, width, dtype=torch.long, device=hidden.device)
    real = torch.arange(width, device=hidden.device)[None, :] < counts[:, None]
    for r, s in enumerate(slots):
        src[r, : s.numel()] = s
    patch_region = hidden[:, n_prefix:length - n_suffix]
    kept = torch.gather(patch_region, 1, src[..., None].expand(-1, -1, dim)).masked_fill(~real[..., None], 0.0)
    out = torch.cat([hidden[:, :n_prefix], kept, hidden[:, length - n_suffix:]], dim=1)

    pad_index = n_patches + torch.arange(width, device=hidden.device).expand(rows, -1)
    st.index = torch.where(real, torch.gather(st.index.to(hidden.device), 1, src), pad_index)
    st.cum = torch.gather(st.cum, 1, src.to(st.cum.device)).masked_fill(~real.to(st.cum.device), 0.0)
    st.n = counts.to(st.n.device)
    if bool((counts == width).all()):
        st.key_mask = None
    else:
        ones = torch.ones(rows, n_prefix, dtype=torch.bool, device=hidden.device)
        tail = torch.ones(rows, n_suffix, dtype=torch.bool, device=hidden.device)
        st.key_mask = torch.cat([ones, real, tail], dim=1)
    return out


def input_hook(module: nn.Module, args: tuple, kwargs: dict, slot: ContextSlot) -> None:
    """Forward pre-hook on a scored block's attention: remember its input while some row is still active."""
    ctx = slot.ctx
    if ctx is None or ctx.plan is None or STATE_KEY not in ctx.state:
        return
    st = _state(ctx)
    st.pending = {"hidden": input_hidden_states(args, kwargs)} if bool(st.active.any()) else None


def projection_hook(module: nn.Module, args: tuple, output: torch.Tensor, slot: ContextSlot, name: str) -> None:
    """Forward hook on `k_proj` / `v_proj` of a scored block: keep its output when it is fp32 (no recompute)."""
    ctx = slot.ctx
    if ctx is None or STATE_KEY not in ctx.state:
        return
    st = ctx.state[STATE_KEY]
    if st.pending is not None and output.dtype == torch.float32:
        st.pending[name] = output


def score_hook(module: nn.Module, args: tuple, output, slot: ContextSlot, block: int, head_dim: int) -> None:
    """Forward hook on a scored block's attention: this block's score `S`, folded into `S_cum` for active rows."""
    ctx = slot.ctx
    if ctx is None or ctx.plan is None or STATE_KEY not in ctx.state:
        return
    st = _state(ctx)
    pending, st.pending = st.pending, None
    if pending is None:
        return
    relation, score = information_flow(module, pending["hidden"], head_dim, ctx.plan.n_prefix, st.index.shape[1],
                                       st.key_mask, pending.get("keys"), pending.get("values"))
    act = st.active.to(score.device)[:, None]
    if st.cum is None:
        st.cum = score.clone()
    else:
        st.cum = torch.where(act, EMA * st.cum + (1.0 - EMA) * score, st.cum)
    st.relation = relation
    st.history.append((block, st.index.clone(), score, st.cum.clone()))


def prune_hook(module: nn.Module, args: tuple, output, slot: ContextSlot, block: int, rpl: int):
    """Forward hook on a pruning block: shorten its output to each row's survivors (CLS and suffix kept)."""
    ctx = slot.ctx
    if ctx is None or ctx.plan is None or STATE_KEY not in ctx.state:
        return None
    st = _state(ctx)
    active = st.active
    if not bool(active.any()) or st.cum is None:
        return None
    plan = ctx.plan
    hidden = output if isinstance(output, torch.Tensor) else output[0]
    n, target = st.n.to(st.cum.device), st.target.to(st.cum.device)
    act = active.to(st.cum.device)
    if rpl == 0:
        keep = torch.where(act, target, n)
    else:
        raw = removal_count(st.relation, n, target, rpl).masked_fill(~act, float("-inf"))
        removed = torch.zeros_like(n)
        for rows in st.scopes:
            idx = torch.tensor(rows, device=n.device)
            removed[idx] = max(int(torch.round(raw[idx].max())), 0) if bool(act[idx].any()) else 0
        keep = torch.where(act, torch.maximum(n - removed, target), n)
    slots = []
    for r in range(hidden.shape[0]):
        nr, kr = int(n[r]), int(keep[r])
        if kr >= nr:
            slots.append(torch.arange(nr, device=hidden.device))
            continue
        allowed = st.valid[r].to(st.index.device)[st.index[r, :nr].clamp(max=plan.n_patches - 1)]
        scores = st.cum[r, :nr].masked_fill(~allowed.to(st.cum.device), float("-inf"))
        top = torch.topk(scores, kr, sorted=False).indices.sort().values
        slots.append(top.to(hidden.device))
    new = _rebuild(hidden, st, slots, plan.n_prefix, plan.n_suffix, plan.n_patches)
    ctx.token_index = st.index
    st.events.append((block, st.n.tolist()))
    if isinstance(output, torch.Tensor):
        return new
    return (new, *output[1:])


def mask_hook(module: nn.Module, args: tuple, kwargs: dict, slot: ContextSlot, attn_impl: str):
    """Forward pre-hook on a block after the first pruning block: mask padding keys when rows differ in length."""
    ctx = slot.ctx
    if ctx is None or STATE_KEY not in ctx.state:
        return None
    st = ctx.state[STATE_KEY]
    if st.key_mask is None:
        return None
    if attn_impl not in MASKABLE:
        raise RuntimeError(f"flowcut: vision rows of different lengths need a key-padding mask, which the tower's "
                           f"attention implementation {attn_impl!r} does not take here; load the model with "
                           f"attn_implementation='sdpa' (or 'eager'), or use count_scope='batch' with equal budgets")
    hidden = input_hidden_states(args, kwargs)
    add = torch.zeros(st.key_mask.shape, dtype=hidden.dtype, device=hidden.device)
    add = add.masked_fill(~st.key_mask.to(hidden.device), torch.finfo(hidden.dtype).min)[:, None, None, :]
    if len(args) > 1:
        prev = args[1]
        args = (args[0], add if prev is None else prev + add, *args[2:])
    else:
        prev = kwargs.get("attention_mask")
        kwargs = {**kwargs, "attention_mask": add if prev is None else prev + add}
    return args, kwargs
