"""`Explanation`: one sample's attribution result (answer tokens, per-token image maps, text relevances, scores).

Arrays are numpy (what `maps.npz` stores); `save(dir)` / `Explanation.load(dir)` round-trip them bit-exactly
(`vlm_tools.interpret.export` writes the overlays, the summary sheet, `explanation.json` and `report.html`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Explanation"]


@dataclass
class Explanation:
    """The attribution of one answer.

    Attributes:
        method: the attribution method's name; `config` its config as a dict.
        prompt: the prompt (with the image placeholder); `answer` the decoded answer.
        answer_ids: `(A,)` int64 answer token ids; `answer_tokens` their decoded strings.
        targets: `(T,)` int64 indices into the answer of the explained tokens; `tokens` their strings.
        maps: `(T, rows, cols)` float32, one map per explained token on the image's patch frame (LLaVA-1.5: the
            call's grid; LLaVA-NeXT: the stitched anyres tiles after unpadding), pruned cells 0.
        pruned: `(rows, cols)` bool, cells the model never saw (pruned tokens).
        text_tokens: the sequence's text tokens (prompt text and answer); `text_relevance` `(T, n_text)` float32
            their relevance for each explained token (zeros when the method has no text branch).
        scores: named per-token values (lists of T floats).
        box: `(x0, y0, x1, y1)` of the original image (pixels) the frame spans; `image_size` its `(width, height)`.
        image: the original image (PIL, RGB) or None.
        metadata: model, method, config, library versions, timings, kept tokens.
    """

    method: str
    config: dict
    prompt: str
    answer: str
    answer_ids: np.ndarray
    answer_tokens: list[str]
    targets: np.ndarray
    tokens: list[str]
    maps: np.ndarray
    pruned: np.ndarray
    text_tokens: list[str]
    text_relevance: np.ndarray
    box: tuple[float, float, float, float]
    image_size: tuple[int, int]
    scores: dict[str, list[float]] = field(default_factory=dict)
    image: Any = None
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.maps = np.asarray(self.maps, dtype=np.float32)
        self.pruned = np.asarray(self.pruned, dtype=bool)
        self.answer_ids = np.asarray(self.answer_ids, dtype=np.int64)
        self.targets = np.asarray(self.targets, dtype=np.int64)
        self.text_relevance = np.asarray(self.text_relevance, dtype=np.float32)
        t = len(self.tokens)
        if self.maps.ndim != 3 or self.maps.shape[0] != t:
            raise ValueError(f"maps must be (tokens={t}, rows, cols), got {self.maps.shape}")
        if self.pruned.shape != self.maps.shape[1:]:
            raise ValueError(f"pruned must be {self.maps.shape[1:]}, got {self.pruned.shape}")
        if self.targets.shape != (t,):
            raise ValueError(f"targets must hold {t} indices, got shape {self.targets.shape}")
        if self.text_relevance.shape != (t, len(self.text_tokens)):
            raise ValueError(f"text_relevance must be ({t}, {len(self.text_tokens)}), got {self.text_relevance.shape}")
        if not np.isfinite(self.maps).all():
            raise ValueError("maps must be finite")

    @property
    def grid(self) -> tuple[int, int]:
        """The frame's `(rows, cols)`."""
        return int(self.maps.shape[1]), int(self.maps.shape[2])

    def maps_in_pixels(self, size: tuple[int, int] | None = None) -> np.ndarray:
        """`(T, H, W)` float32 maps over the original image (bilinear; 0 where the model saw no pixels).

        Args:
            size: output `(width, height)`; the original image's size by default.
        """
        import torch

        from vlm_tools.interpret.frame import grid_to_pixels

        return grid_to_pixels(torch.from_numpy(self.maps), self.box, self.image_size, size).numpy()

    def token_index(self, token: int | str) -> int:
        """Row of `maps` for an explained token given by its answer index or its string (first match)."""
        if isinstance(token, str):
            for i, t in enumerate(self.tokens):
                if t == token or t.strip() == token.strip():
                    return i
            raise KeyError(f"token {token!r} is not among the explained tokens {self.tokens}")
        where = np.nonzero(self.targets == int(token))[0]
        if where.size == 0:
            raise KeyError(f"answer token {token} is not explained; explained answer indices: {self.targets.tolist()}")
        return int(where[0])

    def save(self, directory: str | os.PathLike) -> Path:
        """Write overlay PNGs per token, a summary sheet, `maps.npz`, `explanation.json` and `report.html`."""
        from vlm_tools.interpret.export import save_explanation

        return save_explanation(self, directory)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Explanation:
        """Read a folder written by `save` (arrays bit-exact)."""
        from vlm_tools.interpret.export import load_explanation

        return load_explanation(directory, cls)
