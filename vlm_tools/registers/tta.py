"""Shift/flip test-time augmentation: the PH-Reg teacher target and a training-free denoiser.

Each image is seen in ``n_views`` views. View 0 is the image itself; the others are shifted by whole patches
(offsets within ``+-round(shift_frac * grid)`` chosen by farthest-point sampling from a seeded candidate set) and
horizontally flipped with probability 1/2. Pixels shifted in from outside the image are white in the model's
normalised units. Because shifts are patch-aligned, every view cell maps back to exactly one original cell (or to
the white fill): the view features are scattered back to their original cells and averaged over the valid
contributions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from vlm_tools.core.adapters import get_tower

from .student import vit_of

__all__ = [
    "TTAResult",
    "ViewPlan",
    "make_views",
    "merge_views",
    "sample_plan",
    "shift_flip",
    "source_index",
    "tta_denoise",
    "tta_features",
]


@dataclass(frozen=True)
class ViewPlan:
    """The augmentation of one image.

    Attributes:
        offsets: ``(V, 2)`` int64 ``(dy, dx)`` shifts in patches; content moves down/right for positive values.
        flips: ``(V,)`` bool, horizontal flip applied after the shift.
    """

    offsets: torch.Tensor
    flips: torch.Tensor

    def __post_init__(self) -> None:
        if self.offsets.ndim != 2 or self.offsets.shape[1] != 2:
            raise ValueError(f"offsets must have shape (V, 2), got {tuple(self.offsets.shape)}")
        if self.flips.shape != (self.offsets.shape[0],):
            raise ValueError(f"flips must have shape ({self.offsets.shape[0]},), got {tuple(self.flips.shape)}")

    @property
    def num_views(self) -> int:
        """Number of views."""
        return int(self.offsets.shape[0])


@dataclass
class TTAResult:
    """Output of :func:`tta_denoise`.

    Attributes:
        features: ``(B, grid_h * grid_w, D)`` fp32 averaged patch features (row-major grid order).
        counts: ``(B, grid_h * grid_w)`` number of views that saw each cell (>= 1: view 0 sees all).
        grid: ``(grid_h, grid_w)``.
        plans: The per-image view plans used.
    """

    features: torch.Tensor
    counts: torch.Tensor
    grid: tuple[int, int]
    plans: list[ViewPlan]


def sample_plan(grid_h: int, grid_w: int, n_views: int = 10, shift_frac: float = 0.15, seed: int = 0,
                candidates_per_view: int = 10) -> ViewPlan:
    """Draw a view plan: farthest-point-sampled patch shifts and random horizontal flips.

    ``candidates_per_view * n_views`` integer offsets are drawn uniformly in ``[-sy, sy] x [-sx, sx]`` with
    ``sy = round(shift_frac * grid_h)``, ``sx = round(shift_frac * grid_w)``; farthest-point sampling starts from
    ``(0, 0)``, which is view 0. View 0 is never flipped; the others flip with probability 1/2.

    Args:
        grid_h: Patch rows.
        grid_w: Patch columns.
        n_views: Number of views including the identity view.
        shift_frac: Maximum shift as a fraction of the grid side.
        seed: Seed of the plan (the same seed gives the same plan).
        candidates_per_view: Size of the candidate pool per view.

    Returns:
        The plan.

    Raises:
        ValueError: For non-positive sizes or a negative shift fraction.
    """
    if n_views < 1 or grid_h < 1 or grid_w < 1 or candidates_per_view < 1:
        raise ValueError(f"n_views, grid sides and candidates_per_view must be >= 1 (got {n_views}, "
                         f"{grid_h}x{grid_w}, {candidates_per_view})")
    if not 0.0 <= shift_frac <= 1.0:
        raise ValueError(f"shift_frac must be in [0, 1], got {shift_frac}")
    gen = torch.Generator().manual_seed(int(seed))
    sy, sx = round(shift_frac * grid_h), round(shift_frac * grid_w)
    n_cand = candidates_per_view * n_views
    cand = torch.stack([torch.randint(-sy, sy + 1, (n_cand,), generator=gen),
                        torch.randint(-sx, sx + 1, (n_cand,), generator=gen)], dim=1)
    chosen = [torch.zeros(2, dtype=torch.long)]
    min_d = (cand.float() ** 2).sum(1)
    for _ in range(n_views - 1):
        j = int(torch.argmax(min_d))
        chosen.append(cand[j].clone())
        min_d = torch.minimum(min_d, ((cand - cand[j]).float() ** 2).sum(1))
    flips = torch.rand(n_views, generator=gen) < 0.5
    flips[0] = False
    return ViewPlan(offsets=torch.stack(chosen), flips=flips)


def shift_flip(x: torch.Tensor, dy: int, dx: int, flip: bool, fill: torch.Tensor | float) -> torch.Tensor:
    """Shift the last two dims of ``x`` by ``(dy, dx)`` elements (filling with ``fill``), then flip horizontally.

    Args:
        x: ``(..., H, W)`` tensor.
        dy: Rows to shift down (negative: up).
        dx: Columns to shift right (negative: left).
        flip: Flip the last dim after shifting.
        fill: Scalar, or a tensor broadcastable to ``x[..., :1, :1]`` (e.g. ``(C, 1, 1)`` per channel).

    Returns:
        A new tensor of ``x``'s shape.
    """
    h, w = x.shape[-2:]
    out = torch.empty_like(x)
    out[...] = fill if not torch.is_tensor(fill) else fill.to(x.dtype)
    if abs(dy) < h and abs(dx) < w:
        out[..., max(dy, 0): h + min(dy, 0), max(dx, 0): w + min(dx, 0)] = \
            x[..., max(-dy, 0): h + min(-dy, 0), max(-dx, 0): w + min(-dx, 0)]
    return out.flip(-1) if flip else out


def source_index(plan: ViewPlan, grid_h: int, grid_w: int) -> torch.Tensor:
    """For every view cell, the flat index of the original cell it shows (``-1`` for white fill).

    The same shift/flip as the images is applied to a ``(2, grid_h, grid_w)`` grid of cell coordinates.

    Returns:
        ``(V, grid_h * grid_w)`` int64.
    """
    rows = torch.arange(grid_h).view(-1, 1).expand(grid_h, grid_w)
    cols = torch.arange(grid_w).view(1, -1).expand(grid_h, grid_w)
    flat = (rows * grid_w + cols).unsqueeze(0)
    out = [shift_flip(flat, int(dy), int(dx), bool(f), -1).reshape(-1)
           for (dy, dx), f in zip(plan.offsets.tolist(), plan.flips.tolist())]
    return torch.stack(out)


def _check_plans(plans: Sequence[ViewPlan], batch: int) -> None:
    if len(plans) != batch:
        raise ValueError(f"need one ViewPlan per image: got {len(plans)} plans for a batch of {batch}")
    if len({p.num_views for p in plans}) != 1:
        raise ValueError("all plans in a batch must have the same number of views")


def make_views(pixel_values: torch.Tensor, plans: Sequence[ViewPlan], patch_size: int,
               fill: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Build the augmented views of a batch.

    Args:
        pixel_values: ``(B, C, H, W)`` normalised images.
        plans: One plan per image.
        patch_size: Patch side in pixels (shifts are multiples of it).
        fill: Per-channel fill value in normalised units (white: `TowerSpec.white`).

    Returns:
        ``(B * V, C, H, W)`` views, image-major (views of image 0 first).
    """
    b, c = pixel_values.shape[:2]
    _check_plans(plans, b)
    fill_t = torch.as_tensor(fill, dtype=pixel_values.dtype, device=pixel_values.device).view(c, 1, 1)
    views = []
    for i, plan in enumerate(plans):
        for (dy, dx), f in zip(plan.offsets.tolist(), plan.flips.tolist()):
            views.append(shift_flip(pixel_values[i], dy * patch_size, dx * patch_size, bool(f), fill_t))
    return torch.stack(views)


def merge_views(features: torch.Tensor, plans: Sequence[ViewPlan], grid_h: int,
                grid_w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scatter view features back to their original cells and average the valid contributions.

    Args:
        features: ``(B * V, grid_h * grid_w, D)`` patch features of the views from :func:`make_views`.
        plans: The plans used to make the views.
        grid_h: Patch rows.
        grid_w: Patch columns.

    Returns:
        ``(B, N, D)`` fp32 averages and ``(B, N)`` contribution counts.
    """
    n = grid_h * grid_w
    b = len(plans)
    _check_plans(plans, b)
    v = plans[0].num_views
    if features.shape[:2] != (b * v, n):
        raise ValueError(f"features must have shape ({b * v}, {n}, D), got {tuple(features.shape)}")
    d = features.shape[-1]
    device = features.device
    src = torch.stack([source_index(p, grid_h, grid_w) for p in plans]).to(device)  # (B, V, N)
    target = src + (torch.arange(b, device=device) * n).view(b, 1, 1)
    valid = (src >= 0).reshape(-1)
    flat_target = target.reshape(-1)[valid]
    flat_feat = features.reshape(b * v * n, d)[valid].float()
    sums = torch.zeros(b * n, d, dtype=torch.float32, device=device).index_add_(0, flat_target, flat_feat)
    counts = torch.zeros(b * n, dtype=torch.float32, device=device).index_add_(
        0, flat_target, torch.ones_like(flat_target, dtype=torch.float32))
    mean = sums / counts.clamp(min=1.0).unsqueeze(-1)
    return mean.view(b, n, d), counts.view(b, n)


def tta_features(feature_fn: Callable[[torch.Tensor], torch.Tensor], pixel_values: torch.Tensor,
                 plans: Sequence[ViewPlan], patch_size: int, fill: Sequence[float] | torch.Tensor,
                 chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Average ``feature_fn`` over the views given by ``plans``.

    Args:
        feature_fn: Maps ``(b, C, H, W)`` images to ``(b, N, D)`` patch features in row-major grid order.
        pixel_values: ``(B, C, H, W)`` normalised images.
        plans: One plan per image.
        patch_size: Patch side in pixels.
        fill: Per-channel fill in normalised units.
        chunk_size: Run at most this many views per call (``None``: all at once).

    Returns:
        ``(B, N, D)`` fp32 averages and ``(B, N)`` counts.
    """
    h, w = pixel_values.shape[-2:]
    if h % patch_size or w % patch_size:
        raise ValueError(f"input {h}x{w} is not a multiple of the patch size {patch_size}")
    views = make_views(pixel_values, plans, patch_size, fill)
    if chunk_size is None or chunk_size >= views.shape[0]:
        feats = feature_fn(views)
    else:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        feats = torch.cat([feature_fn(views[i: i + chunk_size]) for i in range(0, views.shape[0], chunk_size)])
    return merge_views(feats, plans, h // patch_size, w // patch_size)


@torch.no_grad()
def tta_denoise(model: nn.Module, pixel_values: torch.Tensor, n_views: int = 10, shift_frac: float = 0.15,
                seed: int = 0, block: int | None = None, chunk_size: int | None = None,
                plans: Sequence[ViewPlan] | None = None) -> TTAResult:
    """Training-free denoised patch features: the shift/flip average of a frozen ViT (about ``n_views`` x cost).

    Args:
        model: A supported ViT (`vlm_tools.core.adapters.get_tower`) or a :class:`.student.RegisterStudent`.
        pixel_values: ``(B, 3, H, W)`` images normalised with the model's mean/std; sides multiples of the patch.
        n_views: Views per image (view 0 is the image itself).
        shift_frac: Maximum shift as a fraction of the grid side.
        seed: Image ``i`` uses the plan of seed ``seed + i``.
        block: Read features at this block's output (``None``: the final normalised output).
        chunk_size: Views per forward call (``None``: all at once).
        plans: Explicit plans, overriding ``n_views``/``shift_frac``/``seed``.

    Returns:
        A :class:`TTAResult`.
    """
    tower = get_tower(vit_of(model))
    spec = tower.spec
    gh, gw = tower.grid(pixel_values.shape[-2], pixel_values.shape[-1])
    if plans is None:
        plans = [sample_plan(gh, gw, n_views, shift_frac, seed + i) for i in range(pixel_values.shape[0])]
    feats, counts = tta_features(lambda x: tower.patch_tokens(x, block), pixel_values, plans,
                                 spec.patch_size, spec.white(), chunk_size)
    return TTAResult(features=feats, counts=counts, grid=(gh, gw), plans=list(plans))
