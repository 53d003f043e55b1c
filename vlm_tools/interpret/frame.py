"""The image frame of a map: which sequence positions hold which cells of an image, and which pixels a cell covers.

Every per-token image map in `vlm_tools.interpret` (attributions, grounding, similarity points) lives on one frame per
image: LLaVA-1.5's patch grid of the call (the default model at a larger input scale has a larger grid), or
LLaVA-NeXT's stitched anyres tiles after HF's unpadding, where each cell also receives the base crop's token that
covers the same image area. `ImageFrame.to_grid` turns values per sequence position into a map on that frame (the
mean over the kept tokens covering a cell); cells no kept token covers are `pruned` (the model never saw them: vision
pruning, or a token dropped inside the LLM) and hold 0. `ImageFrame.box` is the rectangle of the original image, in
pixels, that the frame spans (the processor's resize / centre crop / pad-to-square decide it), so a map goes back to
image pixels with `to_pixels` and a cell to its pixel centre with `cell_centers`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from vlm_tools.core.wrapped import SequenceLayout

__all__ = ["ImageFrame", "grid_to_pixels", "image_frame", "processor_box"]


@dataclass
class ImageFrame:
    """Where one image's visual tokens sit on its map frame.

    Attributes:
        rows, cols: the frame's shape.
        positions: `(P,)` sequence positions of the image's patch tokens the last layer processed (kept ones;
            newline and CLS tokens excluded).
        weight: `(rows * cols, P)` fp32: each cell's row averages the kept tokens covering it (all zero if none).
        pruned: `(rows, cols)` bool, cells no kept token covers.
        cells: `(P, rows * cols)` bool, the cells each position covers (what occluding that token hides).
        box: `(x0, y0, x1, y1)` of the original image (pixels, may reach outside it) that the frame spans.
        image_size: the original image's `(width, height)`.
    """

    rows: int
    cols: int
    positions: torch.Tensor
    weight: torch.Tensor
    pruned: torch.Tensor
    cells: torch.Tensor
    box: tuple[float, float, float, float]
    image_size: tuple[int, int]

    @property
    def shape(self) -> tuple[int, int]:
        return self.rows, self.cols

    def to_grid(self, values: torch.Tensor) -> torch.Tensor:
        """Values per sequence position `(..., L)` -> map `(..., rows, cols)` (fp32; pruned cells 0)."""
        v = values[..., self.positions.to(values.device)].float()
        out = v @ self.weight.to(v.device).T
        return out.reshape(*values.shape[:-1], self.rows, self.cols)

    def cell_centers(self) -> torch.Tensor:
        """`(rows * cols, 2)` x/y pixel coordinates (original image) of each cell's centre, row-major."""
        x0, y0, x1, y1 = self.box
        ys = y0 + (torch.arange(self.rows, dtype=torch.float64) + 0.5) * (y1 - y0) / self.rows
        xs = x0 + (torch.arange(self.cols, dtype=torch.float64) + 0.5) * (x1 - x0) / self.cols
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        return torch.stack([gx.flatten(), gy.flatten()], dim=1)

    def cell_of(self, x: float, y: float) -> tuple[int, int] | None:
        """The `(row, col)` of the cell covering pixel `(x, y)` of the original image (None outside the frame)."""
        x0, y0, x1, y1 = self.box
        c = int((x - x0) * self.cols // (x1 - x0))
        r = int((y - y0) * self.rows // (y1 - y0))
        return (r, c) if 0 <= r < self.rows and 0 <= c < self.cols else None

    def to_pixels(self, grid: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """Maps `(..., rows, cols)` -> `(..., H, W)` over the original image (see `grid_to_pixels`)."""
        return grid_to_pixels(grid, self.box, self.image_size, size)


def grid_to_pixels(grid: torch.Tensor, box: tuple[float, float, float, float], image_size: tuple[int, int],
                   size: tuple[int, int] | None = None) -> torch.Tensor:
    """Maps `(..., rows, cols)` spanning `box` -> `(..., H, W)` over the original image (bilinear; 0 outside the box).

    Args:
        grid: maps on a frame.
        box: the frame's `(x0, y0, x1, y1)` in original-image pixels.
        image_size: the original image's `(width, height)`.
        size: output `(width, height)`; the original image's size by default (the box is scaled with it).
    """
    grid = torch.as_tensor(grid)
    rows, cols = grid.shape[-2:]
    w_img, h_img = image_size
    w, h = size if size is not None else (w_img, h_img)
    lead = grid.shape[:-2]
    g = grid.reshape(-1, 1, rows, cols).float()
    x0, y0, x1, y1 = box
    # pixel centres of the output in original-image coordinates -> normalised frame coordinates
    xs = (torch.arange(w, dtype=torch.float64) + 0.5) * w_img / w
    ys = (torch.arange(h, dtype=torch.float64) + 0.5) * h_img / h
    u = (xs - x0) / (x1 - x0) * 2 - 1
    v = (ys - y0) / (y1 - y0) * 2 - 1
    gv, gu = torch.meshgrid(v, u, indexing="ij")
    coords = torch.stack([gu, gv], dim=-1).float()[None].expand(g.shape[0], h, w, 2).to(g.device)
    inside = ((gu.abs() <= 1) & (gv.abs() <= 1)).to(g.device)
    out = F.grid_sample(g, coords, mode="bilinear", padding_mode="border", align_corners=False)[:, 0]
    return (out * inside).reshape(*lead, h, w)


def _size_hw(size: Any) -> tuple[str, Any]:
    if size is None:
        return "none", None
    get = size.get if hasattr(size, "get") else (lambda k, d=None: getattr(size, k, d))
    if get("height") is not None and get("width") is not None:
        return "hw", (int(get("height")), int(get("width")))
    if get("shortest_edge") is not None:
        return "short", int(get("shortest_edge"))
    raise ValueError(f"unsupported image processor size {size!r} (expected height/width or shortest_edge)")


def processor_box(image_processor: Any, image_size: tuple[int, int]) -> tuple[float, float, float, float]:
    """The rectangle `(x0, y0, x1, y1)` of an original image (pixels) that a LLaVA-1.5-style processor's output covers.

    Follows the processor's own steps: optional pad to a square (`do_pad`, image centred), resize (`height`/`width`,
    or `shortest_edge` keeping the aspect), optional centre crop (`crop_size`).
    """
    w, h = float(image_size[0]), float(image_size[1])
    ox, oy, cw, ch = 0.0, 0.0, w, h  # content rectangle in original pixels before resizing
    if getattr(image_processor, "do_pad", False) and not hasattr(image_processor, "image_grid_pinpoints"):
        m = max(w, h)
        ox, oy, cw, ch = -(m - w) / 2, -(m - h) / 2, m, m
    kind, size = _size_hw(getattr(image_processor, "size", None) if getattr(image_processor, "do_resize", True)
                          else None)
    if kind == "hw":
        rh, rw = size
    elif kind == "short":
        s = size
        if cw <= ch:
            rw, rh = s, int(s * ch / cw)
        else:
            rh, rw = s, int(s * cw / ch)
    else:
        rw, rh = cw, ch
    sx, sy = cw / rw, ch / rh
    x0, y0, x1, y1 = ox, oy, ox + cw, oy + ch
    if getattr(image_processor, "do_center_crop", False):
        _, crop = _size_hw(getattr(image_processor, "crop_size", None))
        crop_h, crop_w = crop if isinstance(crop, tuple) else (crop, crop)
        top, left = (rh - crop_h) // 2, (rw - crop_w) // 2
        x0, y0 = ox + left * sx, oy + top * sy
        x1, y1 = x0 + crop_w * sx, y0 + crop_h * sy
    return float(x0), float(y0), float(x1), float(y1)


def image_frame(adapter: Any, image_processor: Any, layout: SequenceLayout, image_size: tuple[int, int],
                grid: tuple[int, int], image: int = 0) -> ImageFrame:
    """The frame of image `image` of one sample.

    Args:
        adapter: the model's `ModelAdapter` (`vlm_tools.core.adapters.get_adapter`).
        image_processor: the processor's image processor (decides the pixel box on LLaVA-1.5).
        layout: the sample's `SequenceLayout` (from a wrapped call's trace or a `ForcedPass`).
        image_size: the original image's `(width, height)`.
        grid: the call's per-crop patch grid (`Trace.grid`).
        image: which image of the sample.
    """
    w, h = int(image_size[0]), int(image_size[1])
    covers = adapter.frame_cells((h, w), tuple(grid))
    rows, cols = covers[0].shape
    positions = layout.visual_positions(image)
    positions = positions[layout.patch[positions] >= 0]  # LLaVA-NeXT newlines, the "full" strategy's CLS
    patches = layout.patch[positions].long()
    n_cells = rows * cols
    cells = torch.zeros(positions.numel(), n_cells, dtype=torch.bool)
    if positions.numel():
        lookup = {int(p): i for i, p in enumerate(patches.tolist())}
        for cover in covers:
            for cell, patch in enumerate(cover.flatten().tolist()):
                i = lookup.get(patch)
                if i is not None:
                    cells[i, cell] = True
    counts = cells.sum(0)
    weight = (cells.T.float() / counts.clamp(min=1)[:, None].float())
    if getattr(adapter, "family", "") == "llava_next":
        box = (0.0, 0.0, float(w), float(h))
    else:
        box = processor_box(image_processor, (w, h))
    return ImageFrame(rows=rows, cols=cols, positions=positions, weight=weight, pruned=(counts == 0).view(rows, cols),
                      cells=cells, box=box, image_size=(w, h))
