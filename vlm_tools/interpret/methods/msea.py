"""`msea`: multi-scale explanation aggregation (MSEA, arXiv 2509.22415): the same answer explained at several scales.

The answer is generated once (`ExplainContext` holds it) and teacher-forced at every scale, so every scale explains
the same token ids; each scale's map is the logit-lens TAM map (`vlm_tools.interpret.logit_lens.token_maps`, with
the chosen context weighting: TAM's or one of ARC's), min-max normalised, bilinearly resampled onto the finest
scale's frame and averaged (optional weights). How a scale s is run depends on the vision tower:

- **Real resolution** (LLaVA-1.5 with a DINOv2 tower, which interpolates its position embeddings, e.g. the
  default model): a copy of the processor with a deep-copied image processor whose `size` (height/width, or
  shortest_edge and crop_size) is scaled by s, rounded to a multiple of the patch size; one batched forced pass of
  all samples.
  The default model's 8x8 grid becomes 12x12 at 1.5 and 16x16 at 2.
- **Tiled crops** (CLIP towers, which LLaVA does not interpolate; and every LLaVA-NeXT model, whose crops must be
  the tower's native size): the part of the image the scale-1 frame spans is covered by `ceil(s) x ceil(s)`
  overlapping tiles of `1/s` its width and height (so scales must be >= 1 there); every tile is one sample of ONE batched forced pass (prompt and
  answer repeated), the tiles' maps (each on its own frame; LLaVA-NeXT tiles go through the model's own anyres
  processing) are resampled onto an s-times finer frame over the scale-1 frame's box and averaged where tiles
  overlap. The resulting frame is stitched: it spans no sequence positions of one pass (`positions` empty).

Scale 1 is the context's clean pass (shared with the other methods), so `msea` with `scales=(1.0,)` equals `tam`
(same weighting) exactly. The explanation's frame is the finest scale's (`Attribution.frame`). On a pruned model
every scale is pruned by the wrapped method on its own grid (tiles: per tile); `pruned` marks the finest frame's
cells that no kept token covers at the finest scale (tiles: in no covering tile). Those cells are 0 in the final
map, even where a coarser scale saw them.
Text relevances and `prob` are the (weighted) means over scales (tiles: over tiles); `prob@<s>` is each scale's.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

from vlm_tools._registry import register_explainer
from vlm_tools.interpret.base import Attribution, ExplainConfig, ExplainContext, Explainer
from vlm_tools.interpret.forcing import ForcedPass, teacher_force
from vlm_tools.interpret.frame import ImageFrame, image_frame
from vlm_tools.interpret.logit_lens import WEIGHTINGS, minmax, special_ids, token_maps

__all__ = [
    "DEFAULT_WEIGHTING",
    "Msea",
    "MseaConfig",
    "ScalePass",
    "interpolates",
    "resample",
    "scale_passes",
    "scaled_processor",
    "tile_rects",
]

#: MSEA's default context weighting, chosen by `benchmarks/explain_eval.py` on the default model (24 shapes_vqa
#: answers; relevance vs irrelevance): pointing game 0.583 vs 0.583, Obj-IoU 0.221 vs 0.207, deletion AUC 0.452 vs
#: 0.470, insertion AUC 0.886 vs 0.848 (`benchmarks/RESULTS.md`, explain_eval).
DEFAULT_WEIGHTING = "relevance"


@dataclass(frozen=True)
class MseaConfig(ExplainConfig):
    """Attributes:
        scales: input scales (> 0) relative to the processor's resolution; 1.0 reuses the clean pass.
        weights: optional non-negative weight per scale (same length as `scales`); equal weights by default.
        weighting: each scale's context weighting: `"tam"` (TAM's ECI), `"irrelevance"` or `"relevance"` (ARC).
        filter: apply TAM's rank Gaussian filter at every scale.
        eci: subtract the context interference at every scale.
    """

    scales: tuple[float, ...] = (1.0, 1.5, 2.0)
    weights: tuple[float, ...] | None = None
    weighting: Literal["tam", "irrelevance", "relevance"] = DEFAULT_WEIGHTING
    filter: bool = True
    eci: bool = True

    def __post_init__(self) -> None:
        scales = tuple(self.scales)
        if not scales:
            raise ValueError("scales must hold at least one scale")
        bad = [s for s in scales if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s)
               or s <= 0]
        if bad:
            raise ValueError(f"scales must be finite numbers > 0, got {', '.join(map(repr, bad))} in {scales}")
        object.__setattr__(self, "scales", tuple(float(s) for s in scales))
        if self.weights is not None:
            w = tuple(self.weights)
            if len(w) != len(scales):
                raise ValueError(f"weights {w} must give one weight per scale {scales}")
            if any((not isinstance(x, (int, float))) or isinstance(x, bool) or not math.isfinite(x) or x < 0
                   for x in w) or sum(w) <= 0:
                raise ValueError(f"weights must be finite, >= 0 and not all 0, got {w}")
            object.__setattr__(self, "weights", tuple(float(x) for x in w))
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS)}, got {self.weighting!r}")
        for name in ("filter", "eci"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")


@dataclass
class ScalePass:
    """The forced pass of one scale and its pieces (one per sample, or one per tile).

    Attributes:
        scale: the input scale.
        forced: the batched teacher-forced pass.
        sample: per row of `forced`, the sample of the context it explains.
        frames: per row, the row's frame.
        boxes: per row, the frame's box in the ORIGINAL image's pixels (tiles: shifted by the tile's origin).
        tiled: whether the rows are tiles (then the scale's frame is stitched).
    """

    scale: float
    forced: ForcedPass
    sample: list[int]
    frames: list[ImageFrame]
    boxes: list[tuple[float, float, float, float]]
    tiled: bool


def interpolates(adapter: Any) -> bool:
    """Whether the model runs larger inputs at their real resolution: LLaVA-1.5 with an HF DINOv2 tower (HF Dinov2
    interpolates its position embeddings; HF LLaVA's CLIP does not, and LLaVA-NeXT's crops are fixed-size)."""
    return getattr(adapter, "family", "") == "llava" and adapter.tower.family == "hf_dinov2"


def _scaled_side(value: int, scale: float, patch: int) -> int:
    return max(patch, round(value * scale / patch) * patch)


def scaled_processor(processor: Any, scale: float, patch: int) -> Any:
    """A copy of `processor` whose image processor (a deep copy; the tokenizer is shared, a deep copy of it costs
    more than a forward pass of the default model) resizes (and centre-crops) `scale` times larger, each side
    rounded to a multiple of `patch`. The caller's processor is never changed."""
    proc = copy.copy(processor)
    proc.image_processor = ip = copy.deepcopy(processor.image_processor)
    size = ip.size
    get = size.get if hasattr(size, "get") else (lambda k, d=None: getattr(size, k, d))
    if get("height") is not None and get("width") is not None:
        ip.size = {"height": _scaled_side(get("height"), scale, patch),
                   "width": _scaled_side(get("width"), scale, patch)}
    elif get("shortest_edge") is not None:
        ip.size = {"shortest_edge": _scaled_side(get("shortest_edge"), scale, patch)}
    else:
        raise ValueError(f"cannot scale image processor size {size!r} (expected height/width or shortest_edge)")
    crop = getattr(ip, "crop_size", None)
    if getattr(ip, "do_center_crop", False) and crop is not None:
        cget = crop.get if hasattr(crop, "get") else (lambda k, d=None: getattr(crop, k, d))
        ip.crop_size = {"height": _scaled_side(cget("height"), scale, patch),
                        "width": _scaled_side(cget("width"), scale, patch)}
    return proc


def tile_rects(box: tuple[float, float, float, float], image_size: tuple[int, int],
               scale: float) -> list[tuple[int, int, int, int]]:
    """Integer crop rectangles of the `ceil(scale)^2` overlapping tiles of `1/scale` the size of `box` (clipped to
    the image) that cover it, row-major."""
    w, h = image_size
    x0, y0 = max(0.0, box[0]), max(0.0, box[1])
    x1, y1 = min(float(w), box[2]), min(float(h), box[3])
    n = max(1, math.ceil(scale - 1e-9))
    tw, th = (x1 - x0) / scale, (y1 - y0) / scale
    xs = [x0 + (i * (x1 - x0 - tw) / (n - 1) if n > 1 else 0.0) for i in range(n)]
    ys = [y0 + (i * (y1 - y0 - th) / (n - 1) if n > 1 else 0.0) for i in range(n)]
    rects = []
    for ty in ys:
        for tx in xs:
            a, b = round(tx), round(ty)
            rects.append((a, b, max(a + 1, round(tx + tw)), max(b + 1, round(ty + th))))
    return rects


def resample(maps: torch.Tensor, src_box: tuple, dst_box: tuple, shape: tuple[int, int],
             mode: str = "bilinear") -> tuple[torch.Tensor, torch.Tensor]:
    """Maps `(T, r, c)` spanning `src_box` sampled at the cell centres of a `shape` frame spanning `dst_box`.

    Returns `(values (T, R, C), inside (R, C) bool)`; the same shape and box return the maps unchanged.
    """
    rows, cols = shape
    if tuple(maps.shape[-2:]) == (rows, cols) and tuple(map(float, src_box)) == tuple(map(float, dst_box)):
        return maps.clone(), torch.ones(rows, cols, dtype=torch.bool)
    x0, y0, x1, y1 = map(float, dst_box)
    sx0, sy0, sx1, sy1 = map(float, src_box)
    xs = x0 + (torch.arange(cols, dtype=torch.float64) + 0.5) * (x1 - x0) / cols
    ys = y0 + (torch.arange(rows, dtype=torch.float64) + 0.5) * (y1 - y0) / rows
    u = (xs - sx0) / (sx1 - sx0) * 2 - 1
    v = (ys - sy0) / (sy1 - sy0) * 2 - 1
    gv, gu = torch.meshgrid(v, u, indexing="ij")
    inside = (gu.abs() <= 1) & (gv.abs() <= 1)
    coords = torch.stack([gu, gv], -1).float()[None].expand(maps.shape[0], rows, cols, 2)
    out = F.grid_sample(maps.float()[:, None], coords, mode=mode, padding_mode="border", align_corners=False)[:, 0]
    return out * inside, inside


@torch.no_grad()
def scale_passes(ctx: ExplainContext, scales: tuple[float, ...]) -> list[ScalePass]:
    """One `ScalePass` per scale (scale 1 is the context's clean pass), each one batched forced pass of the same
    answers."""
    real = interpolates(ctx.adapter)
    clean_frames = ctx.frames() if (not real or 1.0 in scales) else None
    out = []
    for scale in scales:
        if scale <= 0:
            raise ValueError(f"scales must be > 0, got {scale}")
        if scale == 1.0:
            out.append(ScalePass(1.0, ctx.clean, list(range(len(ctx.samples))), clean_frames,
                                 [f.box for f in clean_frames], tiled=False))
        elif real:
            proc = scaled_processor(ctx.processor, scale, ctx.adapter.patch_size)
            forced = ctx.force(processor=proc, hidden_states=False)
            frames = ctx.frames(forced, processor=proc)
            out.append(ScalePass(scale, forced, list(range(len(ctx.samples))), frames, [f.box for f in frames],
                                 tiled=False))
        else:
            if scale < 1.0:
                raise ValueError(f"scale {scale} < 1 needs a tower that interpolates its position embeddings "
                                 f"(LLaVA-1.5 with DINOv2); {ctx.adapter.family} with a {ctx.adapter.tower_type} "
                                 "tower emulates scales >= 1 only, by tiled crops")
            tiles, owners, origins = [], [], []
            for s, (sample, frame) in enumerate(zip(ctx.samples, clean_frames)):
                for rect in tile_rects(frame.box, sample.image.size, scale):
                    tiles.append(sample.image.crop(rect))
                    owners.append(s)
                    origins.append(rect[:2])
            forced = teacher_force(ctx.model, ctx.processor, tiles, [ctx.samples[s].prompt for s in owners],
                                   [ctx.samples[s].answer_ids for s in owners], hidden_states=False)
            frames = [image_frame(ctx.adapter, ctx.processor.image_processor, lay, tile.size, forced.trace.grid)
                      for lay, tile in zip(forced.layouts, tiles)]
            boxes = [(f.box[0] + ox, f.box[1] + oy, f.box[2] + ox, f.box[3] + oy)
                     for f, (ox, oy) in zip(frames, origins)]
            out.append(ScalePass(scale, forced, owners, frames, boxes, tiled=True))
    return out


def _stitched_frame(rows: int, cols: int, pruned: torch.Tensor, base: ImageFrame) -> ImageFrame:
    n = rows * cols
    return ImageFrame(rows=rows, cols=cols, positions=torch.zeros(0, dtype=torch.long), weight=torch.zeros(n, 0),
                      pruned=pruned, cells=torch.zeros(0, n, dtype=torch.bool), box=base.box,
                      image_size=base.image_size)


@register_explainer("msea", config=MseaConfig,
                    description="Multi-scale TAM/ARC maps: the same answer teacher-forced at several input scales "
                                "(real resolution on DINOv2, stitched tiles on CLIP / LLaVA-NeXT), min-max, "
                                "resized to the finest grid, averaged")
class Msea(Explainer):
    def attribute(self, ctx: ExplainContext) -> list[Attribution]:
        cfg = self.config
        passes = scale_passes(ctx, cfg.scales)
        weights = cfg.weights if cfg.weights is not None else (1.0,) * len(cfg.scales)
        skip = special_ids(ctx.processor)
        finest = max(range(len(passes)), key=lambda i: passes[i].scale)
        clean_frames = ctx.frames() if passes[finest].tiled else None
        results = []
        for s, sample in enumerate(ctx.samples):
            # per scale: the sample's pieces' token maps
            pieces = []
            for sp in passes:
                rows = [r for r, owner in enumerate(sp.sample) if owner == s]
                tms = [token_maps(sp.forced, r, sp.frames[r], sample.targets, weighting=cfg.weighting,
                                  use_eci=cfg.eci, use_filter=cfg.filter, skip=skip) for r in rows]
                pieces.append((sp, rows, tms))
            sp_f, rows_f, _ = pieces[finest]
            if sp_f.tiled:
                base = clean_frames[s]
                shape = (max(1, round(sp_f.scale * base.rows)), max(1, round(sp_f.scale * base.cols)))
                box = base.box
            else:
                base = sp_f.frames[rows_f[0]]
                shape, box = base.shape, base.box
            total = torch.zeros(sample.targets.numel(), *shape)
            text = None
            probs: dict[str, list[float]] = {}
            prob = torch.zeros(sample.targets.numel())
            finest_pruned = None
            for i, ((sp, rows, tms), w) in enumerate(zip(pieces, weights)):
                acc = torch.zeros_like(total)
                count = torch.zeros(shape)
                for r, tm in zip(rows, tms):
                    frame = sp.frames[r]
                    vals, inside = resample(tm.maps, sp.boxes[r], box, shape)
                    kept, _ = resample((~frame.pruned).float()[None], sp.boxes[r], box, shape, mode="nearest")
                    use = inside & (kept[0] > 0.5)
                    acc += vals * use
                    count += use.float()
                scale_map = acc / count.clamp(min=1)
                if sp.tiled:
                    scale_map = minmax(scale_map, count == 0)
                if i == finest:
                    finest_pruned = (count == 0) if sp.tiled else base.pruned
                total += w * scale_map
                t_mean = torch.stack([tm.text for tm in tms]).mean(0)
                text = w * t_mean if text is None else text + w * t_mean
                p_mean = torch.stack([tm.prob for tm in tms]).mean(0)
                prob += w * p_mean
                probs[f"prob@{sp.scale:g}"] = p_mean.tolist()
            wsum = float(sum(weights))
            maps = total / wsum if wsum != 1.0 else total
            maps = maps * (~finest_pruned).to(maps.dtype)
            frame = _stitched_frame(*shape, finest_pruned, base) if sp_f.tiled else base
            results.append(Attribution(maps=maps, text=text / wsum if wsum != 1.0 else text, frame=frame,
                                       scores={"prob": (prob / wsum if wsum != 1.0 else prob).tolist(), **probs}))
        return results
