"""Artifact-token metrics for ViTs and register students, and a side-by-side report on an image folder.

* Norm outliers: L2 norms of the patch tokens at a block output (the pre-final-norm residual stream; thresholds do
  not transfer to post-LN features), flagged by a fixed threshold or a robust per-image rule: ``mad``
  (``(n - median) / (1.4826 * MAD) > k``) or ``ratio`` (``n > k * median``). Also max and median norm.
* Attention sink: the CLS query's attention over the patch keys, head-mean, at one block, recomputed in fp32 from the
  block's q/k projections in a forward pre-hook (the model keeps its SDPA/flash attention). The score is the maximum
  over patches. Register keys take part in the softmax, so registers that absorb attention lower it.
* TTA residual: ``1 - cos(f_i, f~_i)`` between a model's patch features and their shift/flip average (:mod:`.tta`).
"""

from __future__ import annotations

import functools
import io
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vlm_tools.core.adapters import get_tower
from vlm_tools.core.attention import input_hidden_states, query_attention
from vlm_tools.core.hooks import HookHandle
from vlm_tools.core.io import write_bytes_atomic, write_json_atomic

from . import tta
from .student import vit_of

__all__ = [
    "OUTLIER_RULES",
    "ArtifactMeasures",
    "artifact_report",
    "measure_artifacts",
    "colourbar_image",
    "norm_map_image",
    "outlier_mask",
    "summarize",
]

OUTLIER_RULES = ("mad", "ratio", "fixed")


def outlier_mask(norms: torch.Tensor, rule: str = "mad", k: float = 5.0,
                 threshold: float | None = None) -> torch.Tensor:
    """Flag outlier tokens per image.

    Args:
        norms: ``(B, N)`` (or ``(B, H, W)``) token norms.
        rule: ``"mad"``: robust z-score ``(n - median) / (1.4826 * MAD) > k``; ``"ratio"``: ``n > k * median``;
            ``"fixed"``: ``n > threshold``.
        k: Rule parameter (ignored for ``fixed``).
        threshold: Norm threshold for ``fixed`` (e.g. 150 for DINOv2, 30 for CLIP-B/16 at their usual layers).

    Returns:
        Boolean mask of ``norms``' shape.
    """
    if rule not in OUTLIER_RULES:
        raise ValueError(f"unknown outlier rule {rule!r}; choose from {list(OUTLIER_RULES)}")
    if rule == "fixed":
        if threshold is None:
            raise ValueError("rule 'fixed' needs a threshold")
        return norms > threshold
    flat = norms.reshape(norms.shape[0], -1).float()
    med = flat.median(dim=1, keepdim=True).values
    if rule == "ratio":
        mask = flat > k * med
    else:
        mad = (flat - med).abs().median(dim=1, keepdim=True).values
        mask = (flat - med) / (1.4826 * mad).clamp_min(1e-12) > k
    return mask.view(norms.shape)


def _cls_row(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`(B, T)` head-mean attention of token 0 over all keys, recomputed in fp32 (autocast off)."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        return query_attention(attn, x, 0).mean(1)[:, 0]


def _cls_row_hook(store: dict, module: nn.Module, args: tuple, kwargs: dict) -> None:
    store["cls_row"] = _cls_row(module, input_hidden_states(args, kwargs)).detach()


def _block_output_hook(store: dict, module: nn.Module, args: tuple, output: Any) -> None:
    store["tokens"] = (output[0] if isinstance(output, tuple) else output).detach()


@dataclass
class ArtifactMeasures:
    """Per-image artifact measurements of one model on one batch.

    Attributes:
        norms: ``(B, gh, gw)`` patch-token norms at ``block``.
        outliers: ``(B, gh, gw)`` outlier mask.
        cls_attention: ``(B, gh, gw)`` head-mean CLS-to-patch attention at ``sink_block``.
        tta_residual: ``(B, gh, gw)`` ``1 - cos`` to the TTA average (``None`` when not computed).
        block: Block of the norms (normalised to a non-negative index).
        sink_block: Block of the attention row (normalised).
    """

    norms: torch.Tensor
    outliers: torch.Tensor
    cls_attention: torch.Tensor
    tta_residual: torch.Tensor | None
    block: int
    sink_block: int

    def per_image(self) -> list[dict]:
        """Per-image scalar summaries."""
        out = []
        for i in range(self.norms.shape[0]):
            n = self.norms[i].flatten()
            med = float(n.median())
            d = {"outlier_rate": float(self.outliers[i].float().mean()), "max_norm": float(n.max()),
                 "median_norm": med, "max_over_median": float(n.max()) / med if med > 0 else math.inf,
                 "sink_score": float(self.cls_attention[i].max())}
            if self.tta_residual is not None:
                d["tta_residual"] = float(self.tta_residual[i].mean())
            out.append(d)
        return out


@torch.no_grad()
def measure_artifacts(model: nn.Module, pixel_values: torch.Tensor, block: int = -1, sink_block: int = -1,
                      rule: str = "mad", k: float = 5.0, threshold: float | None = None, tta_views: int = 10,
                      shift_frac: float = 0.15, seed: int = 0) -> ArtifactMeasures:
    """Measure norm outliers, the CLS attention sink and the TTA residual of a model on a batch.

    Args:
        model: A supported ViT or a :class:`.student.RegisterStudent` (its registers are not scored).
        pixel_values: ``(B, 3, H, W)`` images normalised for the model.
        block: Block whose output norms are measured (pre-final-norm).
        sink_block: Block whose CLS attention row is recomputed.
        rule: Outlier rule (see :func:`outlier_mask`).
        k: Rule parameter.
        threshold: Threshold of the ``fixed`` rule.
        tta_views: Views of the TTA residual (0 or 1 skips it).
        shift_frac: TTA shift range.
        seed: TTA plan seed.

    Returns:
        The measurements.
    """
    vit = vit_of(model)
    tower = get_tower(vit)
    spec = tower.spec
    gh, gw = tower.grid(pixel_values.shape[-2], pixel_values.shape[-1])
    b_idx = tower.resolve_block(block)
    s_idx = tower.resolve_block(sink_block)
    store: dict = {}
    with HookHandle("registers.measure") as handle:
        handle.forward_hook(tower.blocks[b_idx], functools.partial(_block_output_hook, store))
        handle.forward_pre_hook(tower.attention(s_idx), functools.partial(_cls_row_hook, store), with_kwargs=True)
        final = tower.patch_tokens(pixel_values, None)
    start, n = spec.num_prefix_tokens, gh * gw
    b = pixel_values.shape[0]
    norms = store["tokens"][:, start: start + n].float().norm(dim=-1).view(b, gh, gw)
    cls_att = store["cls_row"][:, start: start + n].view(b, gh, gw)
    resid = None
    if tta_views > 1:
        avg = tta.tta_denoise(vit, pixel_values, tta_views, shift_frac, seed).features
        resid = (1.0 - F.cosine_similarity(final.float(), avg, dim=-1, eps=1e-8)).view(b, gh, gw)
    return ArtifactMeasures(norms=norms.cpu(), outliers=outlier_mask(norms, rule, k, threshold).cpu(),
                            cls_attention=cls_att.cpu(), tta_residual=None if resid is None else resid.cpu(),
                            block=b_idx, sink_block=s_idx)


def summarize(measures: Sequence[ArtifactMeasures]) -> dict:
    """Aggregate measurements over batches: pooled outlier rate, max/median norms, mean sink score and residual."""
    norms = torch.cat([m.norms.flatten(1) for m in measures])
    outl = torch.cat([m.outliers.flatten(1) for m in measures])
    sink = torch.cat([m.cls_attention.flatten(1).max(1).values for m in measures])
    med = norms.median(dim=1).values
    out = {
        "num_images": int(norms.shape[0]),
        "num_tokens": int(norms.numel()),
        "outlier_rate": float(outl.float().mean()),
        "max_norm": float(norms.max()),
        "median_norm": float(norms.median()),
        "max_over_median": float((norms.max(dim=1).values / med.clamp_min(1e-12)).mean()),
        "sink_score": float(sink.mean()),
    }
    if all(m.tta_residual is not None for m in measures):
        out["tta_residual"] = float(torch.cat([m.tta_residual.flatten() for m in measures]).mean())
    return out


_VIRIDIS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float32)


def norm_map_image(values: np.ndarray, vmax: float, scale: int, outliers: np.ndarray | None = None,
                   vmin: float = 0.0):
    """Render a ``(gh, gw)`` map as an RGB ``PIL.Image`` (viridis-like, vmin..vmax), outliers outlined in red."""
    from PIL import Image

    v = np.clip((values - vmin) / max(vmax - vmin, 1e-12), 0.0, 1.0) * (len(_VIRIDIS) - 1)
    lo = np.floor(v).astype(int).clip(0, len(_VIRIDIS) - 2)
    frac = (v - lo)[..., None]
    rgb = (_VIRIDIS[lo] * (1 - frac) + _VIRIDIS[lo + 1] * frac).astype(np.uint8)
    big = np.kron(rgb, np.ones((scale, scale, 1), dtype=np.uint8))
    if outliers is not None and scale >= 3:
        t = max(1, scale // 10)
        for r, c in zip(*np.nonzero(outliers)):
            y, x = r * scale, c * scale
            for band in (np.s_[y: y + t, x: x + scale], np.s_[y + scale - t: y + scale, x: x + scale],
                         np.s_[y: y + scale, x: x + t], np.s_[y: y + scale, x + scale - t: x + scale]):
                big[band] = (255, 0, 0)
    return Image.fromarray(big)


def _labelled_row(tiles: Sequence[tuple[str, Any]], pad: int = 4):
    from PIL import Image, ImageDraw

    label_h = 14
    w = sum(t.width for _, t in tiles) + pad * (len(tiles) + 1)
    h = max(t.height for _, t in tiles) + label_h + 2 * pad
    canvas = Image.new("RGB", (w, h), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    x = pad
    for label, tile in tiles:
        draw.text((x, pad // 2), label, fill=(0, 0, 0))
        canvas.paste(tile, (x, pad + label_h))
        x += tile.width + pad
    return canvas


def colourbar_image(vmin: float, vmax: float, height: int, width: int = 14, label_width: int = 56):
    """A vertical colour scale for `norm_map_image` (vmin at the bottom, vmax at the top) with value labels."""
    from PIL import Image, ImageDraw

    ramp = np.linspace(vmax, vmin, height, dtype=np.float32)[:, None].repeat(width, 1)
    strip = norm_map_image(ramp, vmax, 1, None, vmin)
    canvas = Image.new("RGB", (width + label_width, height), (255, 255, 255))
    canvas.paste(strip, (0, 0))
    draw = ImageDraw.Draw(canvas)
    draw.rectangle([0, 0, width - 1, height - 1], outline=(0, 0, 0))
    for frac in (0.0, 0.5, 1.0):
        y = int(round(frac * (height - 1)))
        value = vmax - frac * (vmax - vmin)
        draw.line([(width, y), (width + 3, y)], fill=(0, 0, 0))
        draw.text((width + 5, min(max(0, y - 5), height - 11)), f"{value:.3g}", fill=(0, 0, 0))
    return canvas


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _denormalise(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    m = torch.tensor(mean).view(3, 1, 1)
    s = torch.tensor(std).view(3, 1, 1)
    return (((x.cpu().float() * s + m).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy())


@torch.no_grad()
def artifact_report(models: Mapping[str, nn.Module], images: str | os.PathLike | Sequence[str | os.PathLike],
                    out_dir: str | os.PathLike, image_size: int | None = None, block: int = -1, sink_block: int = -1,
                    rule: str = "mad", k: float = 5.0, threshold: float | None = None, tta_views: int = 10,
                    shift_frac: float = 0.15, seed: int = 0, max_images: int | None = 16, batch_size: int = 4,
                    maps: bool = True) -> dict:
    """Measure several models (e.g. teacher and student) side by side on the same images.

    Writes ``report.json`` (settings, per-model aggregates, per-image values) and, with ``maps``, one PNG per image:
    the input crop, each model's norm map on a shared colour scale (min to max over the models, labelled with each
    map's maximum) and the colour bar of that scale ("L2 norm"), outliers outlined in red.

    Args:
        models: Display name to model (supported ViTs or register students sharing patch size and normalisation).
        images: An image folder (any tree of jpg/png) or a list of image files.
        out_dir: Output folder.
        image_size: Centre-crop side (default: the first model's native size).
        block: Norm block. sink_block: Attention block. rule, k, threshold: Outlier rule (:func:`outlier_mask`).
        tta_views: Views of the TTA residual (0 skips it). shift_frac: TTA shift range. seed: TTA seed.
        max_images: Use at most this many images (sorted order); ``None`` for all.
        batch_size: Images per forward.
        maps: Write the PNG norm maps.

    Returns:
        The report dict (as written to ``report.json``).
    """
    from . import data

    if not models:
        raise ValueError("give at least one model")
    specs = {name: get_tower(vit_of(m)).spec for name, m in models.items()}
    first = next(iter(specs.values()))
    for name, s in specs.items():
        if (s.patch_size, s.mean, s.std) != (first.patch_size, first.mean, first.std):
            raise ValueError(f"model {name!r} differs from the first in patch size or normalisation")
    if isinstance(images, (str, os.PathLike)):
        files = data.list_images(images)
    else:
        files = [Path(p) for p in images]
        if not files:
            raise ValueError("no images given")
    if max_images is not None:
        files = files[:max_images]
    size = image_size or first.image_size
    get_tower(vit_of(next(iter(models.values())))).grid(size, size)
    source = data.ImageSource(paths=files, description="report")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    per_model: dict[str, list[ArtifactMeasures]] = {name: [] for name in models}
    per_image: list[dict] = []
    figures: list[str] = []
    for start in range(0, len(files), batch_size):
        idx = list(range(start, min(start + batch_size, len(files))))
        batch = torch.stack([data.preprocess(source.load(i), size, first.mean, first.std) for i in idx])
        results = {}
        for name, model in models.items():
            dev = next(model.parameters()).device
            m = measure_artifacts(model, batch.to(dev), block, sink_block, rule, k, threshold, tta_views,
                                  shift_frac, seed)
            per_model[name].append(m)
            results[name] = m
        for j, i in enumerate(idx):
            rec: dict[str, Any] = {"file": str(files[i])}
            for name, m in results.items():
                rec[name] = m.per_image()[j]
            per_image.append(rec)
            if maps:
                from PIL import Image

                gh, gw = results[next(iter(results))].norms.shape[1:]
                scale = max(4, 224 // max(gh, gw))
                vmax = max(float(m.norms[j].max()) for m in results.values())
                vmin = min(float(m.norms[j].min()) for m in results.values())
                inp = Image.fromarray(_denormalise(batch[j], first.mean, first.std)).resize((gw * scale, gh * scale))
                tiles = [("input", inp)] + [
                    (f"{name} max {float(m.norms[j].max()):.1f}",
                     norm_map_image(m.norms[j].numpy(), vmax, scale, m.outliers[j].numpy(), vmin))
                    for name, m in results.items()]
                tiles.append(("L2 norm", colourbar_image(vmin, vmax, gh * scale)))
                fig = out / f"norms_{i:03d}_{files[i].stem}.png"
                write_bytes_atomic(fig, _png(_labelled_row(tiles)))
                figures.append(fig.name)
    report = {
        "settings": {"image_size": size, "block": block, "sink_block": sink_block, "rule": rule, "k": k,
                     "threshold": threshold, "tta_views": tta_views, "shift_frac": shift_frac, "seed": seed,
                     "num_images": len(files)},
        "models": {name: summarize(ms) for name, ms in per_model.items()},
        "specs": {name: s.to_json() for name, s in specs.items()},
        "images": per_image,
        "figures": figures,
    }
    write_json_atomic(out / "report.json", report, indent=2)
    return report
