"""READ's similarity-as-points (SasP): point prompts for SAM from a query token's last-layer hidden state.

"Reasoning to Attend" (Qian, Yin, Dou; CVPR 2025, `rui-qian/READ`) turns the dot products between the `[SEG]`
token's last-layer hidden state and the image positions' into a map, and the map into up to 30 labelled points for
SAM. Here it is training-free on any model the adapters support: the query is the `<SEG>` / `[SEG]` token when the
tokenizer has one, else a word of the prompt or answer (the mean of its sub-tokens' hidden states).

Pipeline (`similarity_points`): the answer is generated once (or given), one teacher-forced pass returns the hidden
states, `S = h_image . q` (plain dot product, no projection, no normalisation beyond the final norm the model applies
before `lm_head`) is placed on the image frame (`vlm_tools.interpret.frame`; LLaVA-NeXT's per-crop grids mapped back
into the image, pruned cells excluded), then the pure `similarity_map_to_points` does READ's steps: bilinear
downsample, min-max, pad with -1 to the original image's aspect, positives `s >= t_pos` (descending), negatives
`0 <= s <= t_neg` (ascending), neutral points (label -1) for the rest, the first `num_points` of the three lists, at
the cell centres in original-image pixels. `refine_points` is READ's optional discrete-to-continuous (DtoC) step.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from vlm_tools.core.wrapped import SequenceLayout
from vlm_tools.interpret.forcing import (
    ForcedPass,
    as_wrapped,
    generate_answers,
    load_images,
    single_image_prompt,
    teacher_force,
)
from vlm_tools.interpret.frame import grid_to_pixels, image_frame

__all__ = ["SEG_TOKENS", "Points", "points_from_pass", "query_vector", "refine_points", "sequence_words",
           "similarity_map_to_points", "similarity_points"]

SEG_TOKENS = ("[SEG]", "<SEG>")  # LISA / READ / SESAME spell it "[SEG]"; some forks "<SEG>"


@dataclass
class Points:
    """Labelled point prompts in original-image pixels, and the map they were read from.

    Attributes:
        points: `(N, 2)` float64 x / y pixel coordinates (READ's cell centres, truncated to the pixel that holds
            them, or the refined continuous coordinates when `refined`), N <= `num_points`.
        labels: `(N,)` long: 1 positive (`s >= t_pos`), 0 negative (`0 <= s <= t_neg`), -1 neutral (SAM's
            "not a point").
        map: `(rows, cols)` fp32 min-max map on the (downsampled) frame, padded with -1 to the image's aspect; -1
            also at pruned cells and cells outside the image (never a point).
        image_size: the original image's `(width, height)`.
        cells: `(N, 2)` long `(row, col)` of each point's cell in the downsampled frame (without the padding).
        pad: `(top, left, bottom, right)` padding cells around the frame in `map`.
        box: the frame's `(x0, y0, x1, y1)` in original-image pixels.
        similarity: `(R, C)` fp32 raw dot-product map on the full-resolution frame (pruned cells 0), when known.
        query: what the map was queried with (`"[SEG]"` or the matched word).
        query_positions: sequence positions whose hidden states made the query vector.
        answer: the answer text the pass was forced with, when known.
        refined: whether `points` went through `refine_points`.
        image: the original image (for `save_overlay`), when known.
    """

    points: torch.Tensor
    labels: torch.Tensor
    map: torch.Tensor
    image_size: tuple[int, int]
    cells: torch.Tensor
    pad: tuple[int, int, int, int]
    box: tuple[float, float, float, float]
    similarity: torch.Tensor | None = None
    query: str | None = None
    query_positions: list[int] = field(default_factory=list)
    answer: str | None = None
    refined: bool = False
    image: Any = field(default=None, repr=False)

    def __len__(self) -> int:
        return int(self.labels.numel())

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values (the image is left out)."""
        return {"points": self.points.tolist(), "labels": self.labels.tolist(), "map": self.map.tolist(),
                "image_size": list(self.image_size), "cells": self.cells.tolist(), "pad": list(self.pad),
                "box": list(self.box), "similarity": None if self.similarity is None else self.similarity.tolist(),
                "query": self.query, "query_positions": list(self.query_positions), "answer": self.answer,
                "refined": self.refined}

    def to_sam(self) -> dict[str, Any]:
        """Prompts for the original `segment_anything.SamPredictor.predict`: `point_coords` `(N, 2)` float32 x / y
        in original-image pixels and `point_labels` `(N,)` int64 (1 / 0; neutral points dropped)."""
        keep = self.labels >= 0
        return {"point_coords": self.points[keep].to(torch.float32).numpy(),
                "point_labels": self.labels[keep].to(torch.int64).numpy()}

    def to_hf_sam(self, *, keep_neutral: bool = False, longest_edge: int | None = None) -> dict[str, torch.Tensor]:
        """Prompts for HF `SamModel` / `SamProcessor`: `input_points` `(1, 1, N, 2)` float32 and `input_labels`
        `(1, 1, N)` int64 (one image, one mask).

        Args:
            keep_neutral: keep the neutral points as label -1, which HF's prompt encoder embeds as "not a point"
                (the original SAM's meaning, READ's fixed-length prompt); by default they are dropped like in
                `to_sam`. (HF's padding label -10 is for batching prompt sets of different lengths, which
                `SamProcessor` adds itself; one prompt set needs none.)
            longest_edge: None: coordinates in original-image pixels, for `SamProcessor(images=...,
                input_points=..., input_labels=...)`, which rescales them; an int (1024 for the released SAMs):
                already rescaled to the model's input frame (the image resized to that longest edge), for calling
                `SamModel` directly with your own preprocessing.

        Raises:
            ValueError: no point is left (a flat map, or only neutral points without `keep_neutral`).
        """
        keep = self.labels >= (-1 if keep_neutral else 0)
        pts, lab = self.points[keep].to(torch.float64), self.labels[keep].to(torch.int64)
        if not lab.numel():
            raise ValueError("no point prompts to export (the map was flat or only neutral points were selected; "
                             "pass keep_neutral=True to keep those)")
        if longest_edge is not None:
            if isinstance(longest_edge, bool) or not isinstance(longest_edge, int) or longest_edge < 1:
                raise ValueError(f"longest_edge must be a positive int, got {longest_edge!r}")
            w, h = self.image_size
            scale = longest_edge / max(w, h)  # SAM's ResizeLongestSide.get_preprocess_shape
            new_w, new_h = int(w * scale + 0.5), int(h * scale + 0.5)
            pts = pts * torch.tensor([new_w / w, new_h / h], dtype=torch.float64)
        return {"input_points": pts.to(torch.float32)[None, None], "input_labels": lab[None, None]}

    def save_overlay(self, path: str | Path, dpi: int = 120) -> Path:
        """A PNG of the image (if known) under the map, with the points: positives green, negatives red, neutral
        grey."""
        from vlm_tools.core.io import plain_text, pyplot, write_figure

        plt = pyplot()
        w, h = self.image_size
        fig, ax = plt.subplots(figsize=(5, 5 * h / max(w, 1)))
        if self.image is not None:
            ax.imshow(self.image, extent=(0, w, h, 0))
        x0, y0, x1, y1 = self.box
        rows = self.map.shape[0] - self.pad[0] - self.pad[2]
        cols = self.map.shape[1] - self.pad[1] - self.pad[3]
        cw, ch = (x1 - x0) / cols, (y1 - y0) / rows
        extent = (x0 - self.pad[1] * cw, x1 + self.pad[3] * cw, y1 + self.pad[2] * ch, y0 - self.pad[0] * ch)
        shown = torch.where(self.map >= 0, self.map, torch.tensor(float("nan"))).numpy()
        ax.imshow(shown, extent=extent, cmap="jet", alpha=0.5 if self.image is not None else 1.0, vmin=0, vmax=1,
                  interpolation="nearest")
        styles = {1: ("lime", "+", "positive"), 0: ("red", "x", "negative"), -1: ("0.6", ".", "neutral")}
        for lab, (colour, marker, name) in styles.items():
            sel = self.labels == lab
            if bool(sel.any()):
                p = self.points[sel]
                ax.scatter(p[:, 0].numpy(), p[:, 1].numpy(), c=colour, marker=marker, s=60, linewidths=2,
                           label=f"{name} ({int(sel.sum())})")
        ax.set_xlim(0, w)
        ax.set_ylim(h, 0)
        ax.set_axis_off()
        if len(self):
            ax.legend(loc="lower right", fontsize=7, framealpha=0.7)
        if self.query:
            ax.set_title(plain_text(f"query: {self.query}"), fontsize=9)
        fig.tight_layout()
        return write_figure(fig, path, dpi=dpi)


def _check_params(down_sample: Any, t_pos: Any, t_neg: Any, num_points: Any) -> None:
    if isinstance(down_sample, bool) or not isinstance(down_sample, int) or down_sample < 1:
        raise ValueError(f"down_sample must be a positive int, got {down_sample!r}")
    if isinstance(num_points, bool) or not isinstance(num_points, int) or num_points < 1:
        raise ValueError(f"num_points must be a positive int, got {num_points!r}")
    for name, t in (("t_pos", t_pos), ("t_neg", t_neg)):
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t <= 1:
            raise ValueError(f"{name} must be a number in [0, 1], got {t!r}")
    if not t_neg < t_pos:
        raise ValueError(f"t_neg must be below t_pos, got t_neg={t_neg!r}, t_pos={t_pos!r}")


def _downsample(grid: torch.Tensor, valid: torch.Tensor, factor: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear downsample by `factor` (READ: `side // down_sample`), normalised over the valid cells so that pruned
    cells do not pull their neighbours towards 0 (equal to the plain bilinear downsample when every cell is valid)."""
    rows, cols = grid.shape
    if factor == 1:
        return grid, valid
    size = (rows // factor, cols // factor)
    m = valid.to(torch.float64)[None, None]
    num = F.interpolate((grid.to(torch.float64) * valid)[None, None], size, mode="bilinear", align_corners=False)
    den = F.interpolate(m, size, mode="bilinear", align_corners=False)
    ok = den[0, 0] > 1e-9
    return torch.where(ok, num[0, 0] / den[0, 0].clamp(min=1e-9), 0.0), ok


def _min_max(grid: torch.Tensor, valid: torch.Tensor) -> torch.Tensor | None:
    """Min-max over the valid cells (None when the map is flat there: no cell stands out)."""
    if not bool(valid.any()):
        return None
    vals = grid[valid]
    lo, hi = vals.min(), vals.max()
    if not bool(hi > lo):
        return None
    return ((grid - lo) / (hi - lo)).clamp(0, 1)


def similarity_map_to_points(similarity: torch.Tensor, box: tuple[float, float, float, float],
                             image_size: tuple[int, int], *, valid: torch.Tensor | None = None, down_sample: int = 1,
                             t_pos: float = 0.8, t_neg: float = 0.2, num_points: int = 30) -> Points:
    """READ's map -> points step, as a pure function of a map on a frame.

    Args:
        similarity: `(rows, cols)` raw map on a frame spanning `box` of the original image.
        box: the frame's `(x0, y0, x1, y1)` in original-image pixels (`ImageFrame.box`).
        image_size: the original image's `(width, height)`.
        valid: `(rows, cols)` bool, the cells that hold a value (False at pruned cells); all by default.
        down_sample: bilinear downsampling factor (READ: 2 for its 7B model's 24x24 grid, 1 for 13B).
        t_pos: positive threshold on the min-max map (`s >= t_pos`).
        t_neg: negative threshold (`0 <= s <= t_neg`).
        num_points: at most this many points: positives (descending), then negatives (ascending), then neutral
            cells (row-major), the first `num_points` of them (the number of positives is adaptive, not a top-k).

    The min-max map is padded with -1 to the original image's aspect (the cells a centre crop cut away; READ's
    short-side crop padding), so padded cells, pruned cells and cells whose centre lies outside the image (a frame
    padded to a square) are never points. A flat map (max == min over the valid cells) gives no points and a map of
    0 (READ divides by zero there). Coordinates are the cells' centres in original-image pixels, clamped to the image
    and truncated to the integer pixel that holds them, as READ does.
    """
    _check_params(down_sample, t_pos, t_neg, num_points)
    sim = torch.as_tensor(similarity).detach().cpu().to(torch.float64)
    if sim.dim() != 2 or not sim.numel():
        raise ValueError(f"similarity must be a non-empty 2-D map, got shape {tuple(sim.shape)}")
    if not bool(torch.isfinite(sim).all()):
        raise ValueError("similarity holds NaN or infinite values")
    rows, cols = sim.shape
    ok = torch.ones(rows, cols, dtype=torch.bool) if valid is None else torch.as_tensor(valid).cpu().bool()
    if ok.shape != sim.shape:
        raise ValueError(f"valid has shape {tuple(ok.shape)}, the map {tuple(sim.shape)}")
    if down_sample > min(rows, cols):
        raise ValueError(f"down_sample={down_sample} exceeds the map's {rows}x{cols} grid")
    w, h = int(image_size[0]), int(image_size[1])
    if w < 1 or h < 1:
        raise ValueError(f"image_size must be a positive (width, height), got {image_size!r}")
    x0, y0, x1, y1 = (float(v) for v in box)
    if not (x1 > x0 and y1 > y0):
        raise ValueError(f"box must be (x0, y0, x1, y1) with x1 > x0 and y1 > y0, got {box!r}")

    sim_d, ok_d = _downsample(sim, ok, down_sample)
    rd, cd = sim_d.shape
    cw, ch = (x1 - x0) / cd, (y1 - y0) / rd
    xs = x0 + (torch.arange(cd, dtype=torch.float64) + 0.5) * cw
    ys = y0 + (torch.arange(rd, dtype=torch.float64) + 0.5) * ch
    ok_d = ok_d & ((ys >= 0) & (ys < h))[:, None] & ((xs >= 0) & (xs < w))[None, :]
    mm = _min_max(sim_d, ok_d)
    flat = mm is None
    mm = torch.zeros_like(sim_d) if flat else mm
    mm = torch.where(ok_d, mm, -1.0)
    eps = 1e-6  # whole cells of the image outside the frame, on each side
    pad = (max(0, math.floor(y0 / ch + eps)), max(0, math.floor(x0 / cw + eps)),
           max(0, math.floor((h - y1) / ch + eps)), max(0, math.floor((w - x1) / cw + eps)))
    padded = torch.full((pad[0] + rd + pad[2], pad[1] + cd + pad[3]), -1.0, dtype=torch.float64)
    padded[pad[0]:pad[0] + rd, pad[1]:pad[1] + cd] = mm

    flat_map = padded.flatten()
    if flat:
        order = torch.zeros(0, dtype=torch.long)
        labels = torch.zeros(0, dtype=torch.long)
    else:
        pos = torch.nonzero(flat_map >= t_pos).flatten()
        pos = pos[torch.sort(flat_map[pos], descending=True, stable=True).indices]
        neg = torch.nonzero((flat_map >= 0) & (flat_map <= t_neg)).flatten()
        neg = neg[torch.sort(flat_map[neg], stable=True).indices]
        neutral = torch.nonzero((flat_map > t_neg) & (flat_map < t_pos)).flatten()
        order = torch.cat([pos, neg, neutral])[:num_points]
        labels = torch.cat([torch.ones(pos.numel(), dtype=torch.long), torch.zeros(neg.numel(), dtype=torch.long),
                            torch.full((neutral.numel(),), -1, dtype=torch.long)])[:num_points]
    width = padded.shape[1]
    r = order // width - pad[0]
    c = order % width - pad[1]
    px = torch.floor((x0 + (c.to(torch.float64) + 0.5) * cw).clamp(0, w - 1))
    py = torch.floor((y0 + (r.to(torch.float64) + 0.5) * ch).clamp(0, h - 1))
    return Points(points=torch.stack([px, py], dim=1), labels=labels, map=padded.to(torch.float32),
                  image_size=(w, h), cells=torch.stack([r, c], dim=1), pad=pad, box=(x0, y0, x1, y1))


def refine_points(points: torch.Tensor, pixel_map: torch.Tensor) -> torch.Tensor:
    """READ's discrete-to-continuous step (DtoC): move each point to the mean pixel coordinate under
    `exp(-||g - q||^2) * softmax(pixel_map)(g)`, normalised per point.

    Args:
        points: `(N, 2)` x / y pixel coordinates.
        pixel_map: `(H, W)` the min-max map at full image resolution (0 outside the frame).

    Returns:
        `(N, 2)` float64 continuous coordinates. The Gaussian is separable, so this costs O(N * (H + W) + H * W)
        rather than READ's O(N * H * W) loop, with the same weights.
    """
    pts = torch.as_tensor(points, dtype=torch.float64).reshape(-1, 2)
    pm = torch.as_tensor(pixel_map, dtype=torch.float64)
    if pm.dim() != 2:
        raise ValueError(f"pixel_map must be (H, W), got shape {tuple(pm.shape)}")
    if not pts.shape[0]:
        return pts.clone()
    h, w = pm.shape
    prob = torch.softmax(pm.flatten(), 0).view(h, w)
    gx = torch.arange(w, dtype=torch.float64)
    gy = torch.arange(h, dtype=torch.float64)
    ex = torch.exp(-(gx[None, :] - pts[:, :1]) ** 2)  # (N, W)
    ey = torch.exp(-(gy[None, :] - pts[:, 1:]) ** 2)  # (N, H)
    py = ey @ prob  # (N, W): sum over rows of the row weights times the pixel probabilities
    total = (py * ex).sum(1)
    cx = (py * ex * gx).sum(1) / total
    cy = ((ey * gy) @ prob * ex).sum(1) / total
    return torch.stack([cx, cy], dim=1)


def _seg_token_id(tokenizer: Any) -> tuple[str, int] | None:
    vocab = tokenizer.get_vocab()
    for name in SEG_TOKENS:
        if name in vocab:
            return name, int(vocab[name])
    return None


def sequence_words(tokenizer: Any, layout: SequenceLayout) -> list[tuple[str, list[int]]]:
    """The words of the text of a sequence, in order, each with the positions of the sub-tokens it spans.

    Text is split at every non-text position (the image, padding) and special token (BOS, ...); each run is decoded
    and its words (`\\w+`) are matched to the tokens whose decoded characters overlap them.
    """
    special = torch.tensor(sorted(set(getattr(tokenizer, "all_special_ids", []) or [])), dtype=layout.ids.dtype)
    is_text = (layout.kind == SequenceLayout.TEXT) & ~torch.isin(layout.ids, special)
    text = torch.nonzero(is_text).flatten().tolist()
    runs: list[list[int]] = []
    for p in text:
        if runs and runs[-1][-1] == p - 1:
            runs[-1].append(p)
        else:
            runs.append([p])
    words = []
    for run in runs:
        ids = layout.ids[run].tolist()
        ends = [len(tokenizer.decode(ids[:i + 1], skip_special_tokens=False)) for i in range(len(ids))]
        full = tokenizer.decode(ids, skip_special_tokens=False)
        starts = [0] + ends[:-1]
        for m in re.finditer(r"\w+", full):
            pos = [run[i] for i, (s, e) in enumerate(zip(starts, ends, strict=True)) if s < m.end() and e > m.start()]
            if pos:
                words.append((m.group(), pos))
    return words


def query_vector(hidden: torch.Tensor, layout: SequenceLayout, tokenizer: Any,
                 query_token: str | None) -> tuple[torch.Tensor, str, list[int]]:
    """The query vector of one sequence: `(D,)`, the label of what it is, and the positions it comes from.

    `query_token=None` (or `"[SEG]"` / `"<SEG>"`): the segmentation token's query, which READ /
    LISA read at the position that predicts it (their `seg_token_mask` is shifted by one; the last one when the
    sequence holds several). Otherwise a word of the prompt or answer, matched case-insensitively over its sub-tokens
    (the last occurrence; the mean of their hidden states).

    Raises:
        ValueError: no `[SEG]` token (tokenizer or sequence) without `query_token`, or a word not in the sequence
            (the message lists the words that are).
    """
    seg = _seg_token_id(tokenizer)
    if query_token is None or query_token in SEG_TOKENS:
        if seg is None:
            words = sorted({w for w, _ in sequence_words(tokenizer, layout)}, key=str.casefold)
            raise ValueError("the tokenizer has no [SEG] / <SEG> token: pass query_token=, a word of the prompt or "
                             f"answer: {', '.join(words)}")
        where = torch.nonzero(layout.ids == seg[1]).flatten()
        where = where[where > 0]
        if not where.numel():
            raise ValueError(f"the sequence holds no {seg[0]} token (the answer did not emit one); pass "
                             "query_token= a word of the prompt or answer, or an answer with the token")
        pos = int(where[-1]) - 1
        return hidden[pos].float(), seg[0], [pos]
    if not isinstance(query_token, str) or not re.fullmatch(r"\w+", query_token.strip()):
        raise ValueError(f"query_token must be one word (letters / digits), got {query_token!r}")
    target = query_token.strip().casefold()
    words = sequence_words(tokenizer, layout)
    hits = [pos for w, pos in words if w.casefold() == target]
    if not hits:
        seen = list(dict.fromkeys(w for w, _ in words))
        raise ValueError(f"query_token {query_token!r} is not a word of the sequence; its words are: "
                         f"{', '.join(seen)}")
    pos = hits[-1]
    return hidden[pos].float().mean(0), query_token.strip(), pos


def _answer_ids(processor: Any, answer: Any) -> torch.Tensor:
    if not isinstance(answer, str):
        raise TypeError(f"answer must be a string (or None to generate it), got {type(answer).__name__}")
    if not answer.strip():
        raise ValueError("answer is empty; pass a non-empty string or None to generate it")
    ids = processor.tokenizer(answer, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


@torch.no_grad()
def similarity_points(model: Any, processor: Any, image: Any, prompt: str, query_token: str | None = None, *,
                      answer: str | None = None, down_sample: int = 1, t_pos: float = 0.8, t_neg: float = 0.2,
                      num_points: int = 30, refine: bool = False, max_new_tokens: int = 32) -> Points:
    """READ's similarity-as-points on one image and prompt.

    Args:
        model: an HF LLaVA / LLaVA-NeXT model or a `WrappedModel` (a pruned model: pruned cells are never points).
        processor: its processor.
        image: a PIL image or a path.
        prompt: the prompt with one image placeholder, or a plain question (put in the chat template).
        query_token: None: the tokenizer's `[SEG]` / `<SEG>` token; else a word of the prompt or answer.
        answer: the answer text to force (generated once, greedy, when None), tokenised as given without special
            tokens: write the leading space a byte-level BPE model would generate (e.g. `" yes"` after `"Answer:"`).
        down_sample, t_pos, t_neg, num_points: see `similarity_map_to_points` (READ-7B: 2 / 0.8 / 0.2 / 30 on
            a 24x24 grid).
        refine: apply READ's discrete-to-continuous refinement (`refine_points`).
        max_new_tokens: generation length limit when the answer is generated.

    Returns:
        `Points` in original-image pixels, with the raw similarity map on the frame.
    """
    _check_params(down_sample, t_pos, t_neg, num_points)
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
    prompt = single_image_prompt(processor, prompt)
    images = load_images(image)
    if len(images) != 1:
        raise ValueError(f"similarity_points takes one image, got {len(images)}")
    img = images[0]
    forced_ids = None if answer is None else _answer_ids(processor, answer)
    with as_wrapped(model) as wrapped:
        if forced_ids is None:
            forced_ids = generate_answers(wrapped, processor, [img], [prompt], max_new_tokens=max_new_tokens)[0]
            if not forced_ids.numel():
                raise ValueError("the model generated an empty answer; pass answer= to force one")
        forced = teacher_force(wrapped, processor, [img], [prompt], [forced_ids], hidden_states=True)
        adapter = wrapped.adapter
    return points_from_pass(forced, processor, adapter, img, query_token, down_sample=down_sample, t_pos=t_pos,
                            t_neg=t_neg, num_points=num_points, refine=refine)


def points_from_pass(forced: ForcedPass, processor: Any, adapter: Any, image: Any, query_token: str | None = None, *,
                     sample: int = 0, down_sample: int = 1, t_pos: float = 0.8, t_neg: float = 0.2,
                     num_points: int = 30, refine: bool = False) -> Points:
    """SasP points of one sample of a teacher-forced pass that kept the hidden states (several queries can share
    one pass; `similarity_points` is generate + `teacher_force` + this).

    Args:
        forced: the pass (`vlm_tools.interpret.forcing.teacher_force(..., hidden_states=True)`).
        processor: the processor of the pass (its tokenizer and image processor).
        adapter: the model's `ModelAdapter` (`WrappedModel.adapter` or `vlm_tools.get_adapter(model)`).
        image: the sample's original PIL image.
        query_token, down_sample, t_pos, t_neg, num_points, refine: see `similarity_points`.
        sample: which sample of the pass.
    """
    _check_params(down_sample, t_pos, t_neg, num_points)
    if forced.hidden_states is None:
        raise ValueError("the pass kept no hidden states; run teacher_force(..., hidden_states=True)")
    img = load_images(image)[0]
    layout = forced.layouts[sample]
    hidden = forced.hidden_states[-1][sample].float()
    q, label, qpos = query_vector(hidden, layout, processor.tokenizer, query_token)
    frame = image_frame(adapter, processor.image_processor, layout, img.size, forced.trace.grid)
    sim = frame.to_grid(hidden @ q)
    valid = ~frame.pruned
    if not bool(valid.any()):
        raise ValueError("no visual token of the image reached the last layer (every cell pruned)")
    pts = similarity_map_to_points(sim, frame.box, img.size, valid=valid, down_sample=down_sample, t_pos=t_pos,
                                   t_neg=t_neg, num_points=num_points)
    pts.similarity = sim.cpu()
    pts.query, pts.query_positions = label, [int(p) for p in qpos]
    pts.answer = processor.tokenizer.decode(forced.answer_ids[sample].tolist(), skip_special_tokens=True)
    pts.image = img
    if refine and len(pts):
        full = _min_max(sim.to(torch.float64).cpu(), valid.cpu())
        if full is not None:
            full = torch.where(valid.cpu(), full, 0.0)
            pts.points = refine_points(pts.points, grid_to_pixels(full, frame.box, img.size).to(torch.float64))
            pts.refined = True
    return pts
