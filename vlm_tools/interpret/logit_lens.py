"""Logit-lens token maps: the one implementation behind `tam`, `arc` and every scale of `msea`.

The logit lens of a position is `lm_head` of its last-layer (final-norm) hidden state, which is exactly the
teacher-forced pass's logits at that position. Positions are causal, so ONE forced pass of `prompt + answer` serves
every answer token: the logits of image position i do not depend on which answer token is explained.

Semantics follow TAM (`xmed-lab/TAM`, `tam.py`), re-implemented here:

- The explained token is answer token t at sequence position q; its class is `c = ids[q]`; its probability is
  `softmax(logits[q - 1])[c]` (the position before predicts it).
- Raw visual map: `relu(logits[i, c])` over the image positions i, put on the frame with `ImageFrame.to_grid`.
- Context tokens (TAM's `txt_all` before the target): prompt text tokens and the earlier answer tokens. Each one has
  a *score position*, where its textual score `relu(logits[e, c])` is read, and its own visual map, the raw map of
  its own token id. As in TAM, a prompt token is scored at its own position and an answer token at the position
  that emitted it (`e = p - 1`); the self position `q - 1` therefore never scores a context token.
  Deviation: TAM takes the prompt tokens between model-specific markers (the question only); here every non-special
  prompt text token before the last one is context (the last prompt token is the emitter of the first answer
  token, TAM's "last prompt" score). TAM's first prompt token uses the argmax class of its position; here every
  context token uses its own id.
- ECI: `E = sum_j w_j A_j` over the context tokens whose id differs from the target's (TAM compares token strings;
  one id is one token string), `w` normalised to sum 1 (`+1e-8` as TAM), `s = <A_t, E> / <E, E>` (TAM's
  `minimize_scalar` of the same 1-D least squares; 0 when E is all zero), final `relu(A_t - s E)`. It runs on the
  frame (cells), not on the raw positions; on LLaVA-1.5 without pruning the two are the same.
- ARC reweights the same context: RBO between each context token's top-k (at its score position) and the target's
  top-k (at `q - 1`).
- Rank Gaussian filter (TAM's `rank_guassian_filter`), then min-max per token over the kept cells. Deviation: TAM
  min-maxes the visual and textual scores jointly before the filter; the filter is scale-equivariant, so this equals
  TAM's order whenever the joint minimum is 0 (the usual case: ReLU'd maps and text scores hold zeros).
  Pruned cells are 0 before and after the filter.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from vlm_tools.core.wrapped import SequenceLayout
from vlm_tools.interpret.forcing import ForcedPass
from vlm_tools.interpret.frame import ImageFrame

__all__ = ["WEIGHTINGS", "TokenMaps", "lens_logits", "context_tokens", "raw_maps", "least_squares_scale", "eci",
           "rbo", "rank_gaussian_filter", "minmax", "context_weights", "token_maps", "special_ids"]

#: How the ECI interference weights the context: TAM's textual scores, or ARC's two RBO variants.
WEIGHTINGS = ("tam", "irrelevance", "relevance")
Weighting = Literal["tam", "irrelevance", "relevance"]
_EPS = 1e-8


@dataclass
class TokenMaps:
    """One sample's maps for its explained tokens.

    Attributes:
        maps: `(T, rows, cols)` fp32 on the frame, min-max normalised per token over the kept cells (pruned 0).
        text: `(T, n_text)` fp32 per text position (`ExplainContext.text_positions` order): the context weight of
            each context token before normalisation (TAM: `relu(logit[c])` at its score position; ARC: its
            variant's weight), 0 for non-context positions and at and after the explained token.
        prob: `(T,)` probability of each explained token at the position that predicts it.
        scale: `(T,)` the ECI least-squares scale `s` (0 when ECI is off or there is no interference).
    """

    maps: torch.Tensor
    text: torch.Tensor
    prob: torch.Tensor
    scale: torch.Tensor


def special_ids(processor) -> set[int]:
    """Token ids never used as context (BOS/EOS/pad/image placeholder...: the tokenizer's special ids)."""
    tok = getattr(processor, "tokenizer", processor)
    return {int(i) for i in getattr(tok, "all_special_ids", [])}


def lens_logits(forced: ForcedPass, sample: int, positions: torch.Tensor) -> torch.Tensor:
    """`(P, V)` fp32 logit-lens logits of `positions` of one sample: `lm_head(final-norm hidden)` = the pass's
    logits there."""
    return forced.logits[sample, torch.as_tensor(positions, dtype=torch.long, device=forced.logits.device)].float()


def context_tokens(layout: SequenceLayout, answer_positions: torch.Tensor, target_position: int,
                   skip: Collection[int] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """The context of the answer token at `target_position`: `(token positions, score positions)`.

    Prompt text tokens before the last prompt token (ids in `skip` left out) are scored at their own position;
    answer tokens before the target at the position that emitted them (one before). Both are `(J,)` LongTensors.
    """
    answer_positions = torch.as_tensor(answer_positions, dtype=torch.long)
    first = int(answer_positions[0])
    text = torch.nonzero(layout.kind == SequenceLayout.TEXT).flatten()
    prompt = text[text < first - 1]
    if skip:
        keep = torch.tensor([int(layout.ids[p]) not in skip for p in prompt.tolist()], dtype=torch.bool)
        prompt = prompt[keep] if prompt.numel() else prompt
    answer = answer_positions[answer_positions < int(target_position)]
    return torch.cat([prompt, answer]), torch.cat([prompt, answer - 1])


def raw_maps(forced: ForcedPass, sample: int, frame: ImageFrame, classes: torch.Tensor) -> torch.Tensor:
    """`(N, rows, cols)` raw visual maps `relu(logit_i[class])` over the image positions i, on the frame."""
    classes = torch.as_tensor(classes, dtype=torch.long, device=forced.logits.device)
    values = forced.logits[sample][:, classes].float().clamp(min=0).T  # (N, L)
    return frame.to_grid(values)


def least_squares_scale(target: torch.Tensor, interference: torch.Tensor) -> torch.Tensor:
    """The scalar s minimising `||target - s * interference||^2` (0 when the interference is all zero)."""
    a, e = target.double().flatten(), interference.double().flatten()
    den = (e * e).sum()
    return torch.where(den > 0, (a * e).sum() / den.clamp(min=torch.finfo(torch.float64).tiny), den * 0).float()


def eci(target: torch.Tensor, context: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Estimated causal inference: `relu(A_t - s E)`, `E = sum_j w_j A_j` with `w` normalised to sum 1.

    Args:
        target: `(rows, cols)` the target's raw map `A_t`.
        context: `(J, rows, cols)` the context tokens' raw maps `A_j`.
        weights: `(J,)` non-negative weights (normalised here).

    Returns:
        `(map, s)`.
    """
    if context.shape[0] == 0:
        return target.clone(), torch.zeros((), dtype=torch.float32)
    w = weights.double() / (weights.double().sum() + _EPS)
    inter = (context.double() * w[:, None, None]).sum(0)
    s = least_squares_scale(target, inter)
    return (target.double() - s.double() * inter).clamp(min=0).to(target.dtype), s


def rbo(a: torch.Tensor, b: torch.Tensor, p: float = 0.9) -> torch.Tensor:
    """Rank-biased overlap at depth k (Webber et al. 2010): `(1 - p) sum_{d=1..k} p^(d-1) |A_1:d & B_1:d| / d`.

    Args:
        a: `(k,)` or `(N, k)` ranked item ids (distinct within a list).
        b: `(k,)` the ranked list every row of `a` is compared with.
        p: persistence in (0, 1).

    Returns:
        `()` or `(N,)` fp32 in `[0, 1 - p^k]`.
    """
    if not 0.0 < float(p) < 1.0:
        raise ValueError(f"RBO persistence p must lie in (0, 1), got {p}")
    single = a.dim() == 1
    a2 = a[None] if single else a
    k = b.shape[-1]
    if a2.shape[-1] != k:
        raise ValueError(f"RBO lists must have the same depth, got {a2.shape[-1]} and {k}")
    match = a2[:, :, None] == b.to(a2.device)[None, None, :]  # (N, k, k)
    rank_b = torch.where(match.any(-1), match.float().argmax(-1), torch.full_like(a2, k))
    # item i of A counts from depth max(i, rank in B) + 1 on
    first = torch.maximum(torch.arange(k, device=a2.device)[None], rank_b)
    hist = torch.zeros(a2.shape[0], k + 1, dtype=torch.float64, device=a2.device)
    hist.scatter_add_(1, first, torch.ones_like(first, dtype=torch.float64))
    overlap = hist[:, :k].cumsum(1)  # |A_1:d & B_1:d| for d = 1..k
    d = torch.arange(1, k + 1, dtype=torch.float64, device=a2.device)
    out = ((1 - p) * (p ** (d - 1)) * overlap / d).sum(1).float()
    return out[0] if single else out


def rank_gaussian_filter(grid: torch.Tensor, size: int = 3) -> torch.Tensor:
    """TAM's rank Gaussian filter on `(..., rows, cols)` maps.

    Each cell becomes a weighted sum of its sorted `size x size` window (reflect padding, as TAM; replicate where
    a side is too short to reflect), weighted by a Gaussian over the rank centred on the median with
    `sigma = std / mean` of the window (population std). A window of mean <= 0 gives 0 (TAM); a constant window
    (sigma 0, where TAM's formula is 0/0) gives its median, the limit of the kernel as sigma -> 0. No NaN.
    """
    if size < 1 or size % 2 == 0:
        raise ValueError(f"filter size must be a positive odd int, got {size}")
    g = grid.float()
    rows, cols = g.shape[-2:]
    x = g.reshape(-1, 1, rows, cols)
    pad = size // 2
    if pad:
        mode = "reflect" if min(rows, cols) > pad else "replicate"
        x = F.pad(x, (pad, pad, pad, pad), mode=mode)
    win = F.unfold(x, size).transpose(1, 2).double()  # (N, rows*cols, size*size)
    srt = win.sort(-1).values
    mean = srt.mean(-1, keepdim=True)
    std = srt.std(-1, unbiased=False, keepdim=True)
    n = size * size
    ax = (torch.arange(n, dtype=torch.float64, device=g.device) - n // 2) ** 2
    positive = mean > 0
    sigma = torch.where(positive, std / torch.where(positive, mean, torch.ones_like(mean)), torch.zeros_like(mean))
    spread = sigma > 0
    safe = torch.where(spread, sigma, torch.ones_like(sigma))
    kernel = torch.exp(-ax / (2 * safe ** 2))
    onehot = (ax == 0).to(kernel.dtype).expand_as(kernel)
    kernel = torch.where(spread, kernel, onehot)
    kernel = kernel / kernel.sum(-1, keepdim=True)
    value = torch.where(positive[..., 0], (srt * kernel).sum(-1), torch.zeros_like(mean[..., 0]))
    return value.to(g.dtype).reshape(g.shape)


def minmax(maps: torch.Tensor, pruned: torch.Tensor | None = None) -> torch.Tensor:
    """Min-max each `(rows, cols)` map of `(..., rows, cols)` to [0, 1] over its kept cells (pruned cells 0; a
    constant map becomes 0)."""
    m = maps.float()
    keep = torch.ones(m.shape[-2:], dtype=torch.bool, device=m.device) if pruned is None else ~pruned.to(m.device)
    flat = m.reshape(*m.shape[:-2], -1)
    kflat = keep.flatten()
    if not bool(kflat.any()):
        return torch.zeros_like(m)
    vals = flat[..., kflat]
    lo = vals.min(-1, keepdim=True).values
    hi = vals.max(-1, keepdim=True).values
    span = hi - lo
    out = torch.where(span > 0, (flat - lo) / torch.where(span > 0, span, torch.ones_like(span)),
                      torch.zeros_like(flat))
    out = out * kflat.to(out.dtype)
    return out.reshape(m.shape)


def context_weights(logits_ctx: torch.Tensor, logits_target: torch.Tensor, cls: int, weighting: Weighting,
                    top_k: int = 50, p: float = 0.9) -> torch.Tensor:
    """Unnormalised interference weights of the context tokens for target class `cls`.

    Args:
        logits_ctx: `(J, V)` logits at the context tokens' score positions.
        logits_target: `(V,)` logits at the position predicting the target.
        cls: the target token id.
        weighting: `"tam"`: `relu(logit_j[c])`; `"irrelevance"` (ARC a): `(1 - RBO_jt) relu(logit_j[c])`;
            `"relevance"` (ARC b): `RBO_jt`, with RBO between the top-`top_k` lists (persistence `p`).
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}")
    base = logits_ctx[:, cls].float().clamp(min=0)
    if weighting == "tam" or logits_ctx.shape[0] == 0:
        return base
    k = min(int(top_k), logits_target.shape[-1])
    r = rbo(logits_ctx.topk(k, dim=-1).indices, logits_target.topk(k).indices, p)
    return (1 - r) * base if weighting == "irrelevance" else r


@torch.no_grad()
def token_maps(forced: ForcedPass, sample: int, frame: ImageFrame, targets: torch.Tensor, *,
               weighting: Weighting = "tam", use_eci: bool = True, use_filter: bool = True,
               skip: Collection[int] = (), top_k: int = 50, p: float = 0.9) -> TokenMaps:
    """TAM-style maps of one sample's explained answer tokens (see the module docstring).

    Args:
        forced: a teacher-forced pass (its logits cover every position).
        sample: the sample's row in `forced`.
        frame: the sample's frame in `forced`.
        targets: indices into the sample's answer of the explained tokens.
        weighting: the ECI context weighting (`WEIGHTINGS`).
        use_eci: subtract the context interference.
        use_filter: apply the rank Gaussian filter.
        skip: token ids never used as context (`special_ids(processor)`).
        top_k, p: ARC's RBO depth and persistence.
    """
    layout = forced.layouts[sample]
    ids = forced.answer_ids[sample]
    apos = forced.answer_positions[sample]
    targets = torch.as_tensor(targets, dtype=torch.long)
    text_pos = torch.nonzero(layout.kind == SequenceLayout.TEXT).flatten()
    text_index = {int(q): i for i, q in enumerate(text_pos.tolist())}
    logits = forced.logits[sample]
    n_t = targets.numel()
    maps = torch.zeros(n_t, frame.rows, frame.cols)
    text = torch.zeros(n_t, text_pos.numel())
    prob = torch.zeros(n_t)
    scale = torch.zeros(n_t)
    for row, t in enumerate(targets.tolist()):
        q = int(apos[t])
        c = int(ids[t])
        pred = logits[q - 1].float()
        prob[row] = torch.softmax(pred, -1)[c]
        tok_pos, score_pos = context_tokens(layout, apos, q, skip)
        ctx_logits = logits[score_pos.to(logits.device)].float()
        w = context_weights(ctx_logits, pred, c, weighting, top_k, p).cpu()
        for j, tp in enumerate(tok_pos.tolist()):
            text[row, text_index[tp]] = w[j]
        a_t = raw_maps(forced, sample, frame, torch.tensor([c]))[0].cpu()
        if use_eci:
            ctx_ids = layout.ids[tok_pos].long()
            sel = ctx_ids != c
            ctx_maps = raw_maps(forced, sample, frame, ctx_ids[sel]).cpu()
            a_t, s = eci(a_t, ctx_maps, w[sel])
            scale[row] = s
        if use_filter:
            a_t = rank_gaussian_filter(a_t)
        maps[row] = minmax(a_t, frame.pruned)
    return TokenMaps(maps=maps, text=text, prob=prob, scale=scale)
