"""Localisation and faithfulness metrics of attribution maps: pointing game, Obj-IoU, deletion and insertion AUC.

Localisation (pure numpy, no model): a map is first put on the mask's pixels (`map_on_mask`: an `Explanation`'s
map through `Explanation.maps_in_pixels`, a bare grid through `vlm_tools.interpret.frame.grid_to_pixels`, bilinear,
0 where the frame does not reach), then

- `pointing_game`: a hit when the map's maximum pixel lies in the mask. Ties go to the FIRST maximum in row-major
  order (`numpy.argmax`), so a constant map points at the top-left pixel;
- `obj_iou`: the map binarised at its Otsu threshold (pixels strictly above it, the convention of
  `skimage.filters.threshold_otsu`; a constant map binarises to nothing), IoU with the mask.

Faithfulness (through the model): the map's cells are removed (deletion) or inserted (insertion: the start has every
visual position masked) in the map's descending order in `steps` equal chunks, and the explained token's probability
`p(answer[t] | prefix)` is re-measured at each of the `steps + 1` points with
`vlm_tools.interpret.forcing.teacher_force(..., mask_positions=...)` (attention mask zeroed at the masked visual
positions; position ids unchanged). Every point of every explained token of one sample runs in ONE batched pass (the
sample repeated; identical point sets are computed once). The curve is the probability against the fraction of the
frame's visible cells removed / inserted (x in [0, 1]); its area is `sklearn.metrics.auc`. Lower deletion AUC and
higher insertion AUC mean a more faithful map. A visual position is masked as soon as ONE of the cells it covers is
deleted (deletion) or not yet inserted (insertion): on LLaVA-NeXT a base-crop token covers several frame cells.
Pruned cells (no kept token covers them) are left out of the order and of the fractions. Visual positions outside
the frame (LLaVA-NeXT's newline tokens, a kept CLS feature) stay visible until every cell is hidden, so the curves
end (deletion) and start (insertion) at the image-masked condition (`teacher_force(..., mask_images=True)`) and the
other ends are the clean pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from vlm_tools.interpret.explanation import Explanation
from vlm_tools.interpret.forcing import as_wrapped, teacher_force
from vlm_tools.interpret.frame import grid_to_pixels, image_frame

__all__ = [
    "KINDS",
    "FaithfulnessCurves",
    "deletion_auc",
    "faithfulness_curves",
    "insertion_auc",
    "map_on_mask",
    "obj_iou",
    "otsu_threshold",
    "otsu_threshold_numpy",
    "pointing_game",
]

#: The two faithfulness curves.
KINDS = ("deletion", "insertion")


def _mask_array(mask: Any) -> np.ndarray:
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"mask must be a 2-D (height, width) array, got shape {m.shape}")
    m = m.astype(bool)
    if not m.any():
        raise ValueError("mask is empty (no True pixel): nothing to point at")
    return m


def _token_row(explanation: Explanation, token: int | str) -> int:
    if isinstance(token, str):
        return explanation.token_index(token)
    if isinstance(token, bool) or not isinstance(token, (int, np.integer)):
        raise TypeError(f"token must be a row of maps (int) or an explained token string, got {token!r}")
    t = len(explanation.tokens)
    if not -t <= int(token) < t:
        raise IndexError(f"token {token} is out of range: the explanation has {t} explained tokens "
                         f"{explanation.tokens}")
    return int(token) % t


def map_on_mask(map: Explanation | np.ndarray | torch.Tensor, mask: Any, *, token: int | str = 0,
                box: tuple[float, float, float, float] | None = None,
                image_size: tuple[int, int] | None = None) -> np.ndarray:
    """A map on the mask's pixels, `(H, W)` float64.

    Args:
        map: an `Explanation` (its map of explained token `token`, resized with `Explanation.maps_in_pixels` to the
            mask's size; the mask covers the original image) or a 2-D grid `(rows, cols)`, resized with
            `grid_to_pixels` (used as is when it already has the mask's shape and no `box` is given).
        mask: `(H, W)` bool mask over the original image (any resolution of the same image).
        token: for an `Explanation`, the row of `maps` (0: the first explained token) or the token's string.
        box: for a grid, the `(x0, y0, x1, y1)` of the image (pixels of `image_size`) the grid spans; the whole
            image by default.
        image_size: for a grid with a `box`, the image's `(width, height)` the box refers to; the mask's by default.
    """
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"mask must be a 2-D (height, width) array, got shape {m.shape}")
    h, w = m.shape
    if isinstance(map, Explanation):
        row = _token_row(map, token)
        return map.maps_in_pixels(size=(w, h))[row].astype(np.float64)
    grid = map.detach().cpu().numpy() if isinstance(map, torch.Tensor) else np.asarray(map)
    if grid.ndim != 2:
        raise ValueError(f"map must be an Explanation or a 2-D (rows, cols) grid, got shape {grid.shape}")
    if not np.isfinite(grid).all():
        raise ValueError("map must be finite")
    if box is None and grid.shape == (h, w):
        return grid.astype(np.float64)
    size = tuple(image_size) if image_size is not None else (w, h)
    box = tuple(box) if box is not None else (0.0, 0.0, float(size[0]), float(size[1]))
    return grid_to_pixels(torch.from_numpy(grid.astype(np.float32)), box, size, (w, h)).double().numpy()


def otsu_threshold_numpy(values: Any, nbins: int = 256) -> float:
    """Otsu's threshold of `values` from a `nbins`-bin histogram over their range (numpy only).

    The same computation as `skimage.filters.threshold_otsu` on a float image (bin centres of `numpy.histogram`
    over the value range, float32 counts, the first maximum of the between-class variance), so both give the same
    threshold; a constant input returns its value.
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        raise ValueError("otsu_threshold of an empty array")
    if np.all(v == v[0]):
        return float(v[0])
    counts, edges = np.histogram(v, bins=nbins)
    centers = (edges[:-1] + edges[1:]) / 2.0
    counts = counts.astype(np.float32)
    w1 = np.cumsum(counts)
    w2 = np.cumsum(counts[::-1])[::-1]
    m1 = np.cumsum(counts * centers) / w1
    m2 = (np.cumsum((counts * centers)[::-1]) / w2[::-1])[::-1]
    between = w1[:-1] * w2[1:] * (m1[:-1] - m2[1:]) ** 2
    return float(centers[int(np.argmax(between))])


def otsu_threshold(values: Any, nbins: int = 256) -> float:
    """Otsu's threshold: `skimage.filters.threshold_otsu` when scikit-image is installed, else
    `otsu_threshold_numpy` (the same result)."""
    try:
        from skimage.filters import threshold_otsu
    except ImportError:
        return otsu_threshold_numpy(values, nbins)
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        raise ValueError("otsu_threshold of an empty array")
    return float(threshold_otsu(v, nbins=nbins))


def pointing_game(map: Explanation | np.ndarray | torch.Tensor, mask: Any, *, token: int | str = 0,
                  box: tuple[float, float, float, float] | None = None,
                  image_size: tuple[int, int] | None = None) -> bool:
    """Whether the map's maximum, on the mask's pixels (`map_on_mask`), lies in the mask (ties: the first maximum in
    row-major order)."""
    m = _mask_array(mask)
    pix = map_on_mask(map, m, token=token, box=box, image_size=image_size)
    return bool(m.ravel()[int(np.argmax(pix))])


def obj_iou(map: Explanation | np.ndarray | torch.Tensor, mask: Any, *, token: int | str = 0,
            box: tuple[float, float, float, float] | None = None,
            image_size: tuple[int, int] | None = None) -> float:
    """IoU between the map binarised at its Otsu threshold (pixels above it, on the mask's pixels) and the mask."""
    m = _mask_array(mask)
    pix = map_on_mask(map, m, token=token, box=box, image_size=image_size)
    binary = pix > otsu_threshold(pix)
    return float((binary & m).sum() / (binary | m).sum())


@dataclass
class FaithfulnessCurves:
    """Deletion / insertion curves of one sample's explained tokens.

    Attributes:
        fractions: `(steps + 1,)` fraction of the visible cells removed (deletion) or inserted (insertion).
        tokens: the rows of `Explanation.maps` the curves are for.
        deletion, insertion: `(len(tokens), steps + 1)` the explained token's probability at each point (None when
            that curve was not asked for).
        deletion_auc, insertion_auc: `(len(tokens),)` the areas under the curves (`sklearn.metrics.auc`).
        n_cells: the number of visible cells ordered.
    """

    fractions: np.ndarray
    tokens: list[int]
    deletion: np.ndarray | None
    insertion: np.ndarray | None
    deletion_auc: np.ndarray | None
    insertion_auc: np.ndarray | None
    n_cells: int


def _frame_map(values: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A map resampled onto the frame's grid by area averaging (a map on a finer grid, e.g. MSEA's)."""
    if values.shape == shape:
        return values
    t = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))[None, None]
    return F.interpolate(t, size=shape, mode="area")[0, 0].numpy()


def faithfulness_curves(explanation: Explanation, model: Any, processor: Any, *, steps: int = 16,
                        tokens: Sequence[int | str] | None = None, kinds: Sequence[str] = KINDS,
                        image: Any = None) -> FaithfulnessCurves:
    """Deletion and insertion curves of an explanation, re-measured through the model (see the module docstring).

    Args:
        explanation: what to evaluate (its prompt, answer ids, targets and maps; the maps must be on the frame of
            this model and processor, or on a finer grid over the same pixel box, which is area-averaged onto it).
        model: the model that was explained (an HF LLaVA / LLaVA-NeXT model or a `WrappedModel`).
        processor: its processor.
        steps: the number of chunks the ordered cells are removed / inserted in (`steps + 1` points per curve).
        tokens: rows of `maps` (or token strings) to evaluate; all explained tokens by default.
        kinds: "deletion", "insertion" or both.
        image: the image (PIL) when the explanation holds none.
    """
    from PIL import Image
    from sklearn.metrics import auc

    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    kinds = tuple(kinds)
    if not kinds or any(k not in KINDS for k in kinds):
        raise ValueError(f"kinds must be among {KINDS}, got {kinds!r}")
    image = image if image is not None else explanation.image
    if not isinstance(image, Image.Image):
        raise TypeError("the explanation holds no image: pass image= (the PIL image it explains)")
    image = image.convert("RGB")
    if tuple(image.size) != tuple(explanation.image_size):
        raise ValueError(f"image size {image.size} differs from the explanation's image_size "
                         f"{tuple(explanation.image_size)}")
    rows_t = [_token_row(explanation, t) for t in (tokens if tokens is not None else range(len(explanation.tokens)))]
    answer = torch.from_numpy(explanation.answer_ids.copy())
    prompt = explanation.prompt
    with as_wrapped(model) as wrapped:
        clean = teacher_force(wrapped, processor, [image], [prompt], [answer], hidden_states=False)
        frame = image_frame(wrapped.adapter, processor.image_processor, clean.layouts[0], image.size,
                            clean.trace.grid)
        if not np.allclose(frame.box, explanation.box, atol=1.0):
            raise ValueError(f"the explanation's maps span the pixel box {tuple(explanation.box)}, the model's frame "
                             f"{frame.box}: explain and evaluate with the same model and processor")
        covers = frame.cells.numpy()  # (P, cells)
        positions = frame.positions.numpy()
        # all visual positions, with those outside the frame (LLaVA-NeXT newlines, a kept CLS feature)
        every = tuple(int(p) for p in clean.layouts[0].visual_positions().tolist())
        visible = np.flatnonzero(~frame.pruned.numpy().ravel())
        n = int(visible.size)
        if n == 0:
            raise ValueError("every cell of the frame is pruned: nothing to delete or insert")
        counts = [round(k * n / steps) for k in range(steps + 1)]
        fractions = np.asarray(counts, dtype=np.float64) / n
        plan: list[tuple[int, str, int]] = []  # (index into rows_t, kind, step); keys: its masked set
        sets: dict[tuple[int, ...], int] = {}
        keys: list[int] = []
        for i, r in enumerate(rows_t):
            values = _frame_map(explanation.maps[r], frame.shape).ravel()
            order = visible[np.argsort(-values[visible], kind="stable")]
            for kind in kinds:
                for k, c in enumerate(counts):
                    chosen = np.zeros(frame.rows * frame.cols, dtype=bool)
                    chosen[order[:c]] = True
                    hidden = chosen if kind == "deletion" else ~chosen
                    if hidden[visible].all():  # nothing of the image left: the image-masked condition
                        masked = every
                    else:
                        masked = tuple(int(p) for p in positions[covers[:, hidden].any(1)].tolist())
                    keys.append(sets.setdefault(masked, len(sets)))
                    plan.append((i, kind, k))
        unique = list(sets)
        forced = teacher_force(wrapped, processor, [image] * len(unique), [prompt] * len(unique),
                               [answer] * len(unique), hidden_states=False,
                               mask_positions=[torch.tensor(u, dtype=torch.long) for u in unique])
    logp = forced.answer_logprobs()
    curves = {kind: np.zeros((len(rows_t), steps + 1)) for kind in kinds}
    for (i, kind, k), key in zip(plan, keys):
        target = int(explanation.targets[rows_t[i]])
        curves[kind][i, k] = float(torch.exp(logp[key][target]))
    areas = {kind: np.array([auc(fractions, c) for c in curves[kind]]) for kind in kinds}
    return FaithfulnessCurves(fractions=fractions, tokens=rows_t, deletion=curves.get("deletion"),
                              insertion=curves.get("insertion"), deletion_auc=areas.get("deletion"),
                              insertion_auc=areas.get("insertion"), n_cells=n)


def deletion_auc(explanation: Explanation, model: Any, processor: Any, *, token: int | str = 0, steps: int = 16,
                 image: Any = None) -> float:
    """Area under the deletion curve of one explained token (lower: the map's top cells matter more)."""
    res = faithfulness_curves(explanation, model, processor, steps=steps, tokens=[token], kinds=("deletion",),
                              image=image)
    return float(res.deletion_auc[0])


def insertion_auc(explanation: Explanation, model: Any, processor: Any, *, token: int | str = 0, steps: int = 16,
                  image: Any = None) -> float:
    """Area under the insertion curve of one explained token (higher: the map's top cells suffice sooner)."""
    res = faithfulness_curves(explanation, model, processor, steps=steps, tokens=[token], kinds=("insertion",),
                              image=image)
    return float(res.insertion_auc[0])
