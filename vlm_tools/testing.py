"""Test helpers: tiny cases (model, processor, a left-padded batch of two prompts, the two single inputs)."""

from __future__ import annotations

import numpy as np
from PIL import Image

__all__ = ["PROMPTS", "make_images", "TinyCase"]

PROMPTS = ["USER : <image> what is in the image ? ASSISTANT :", "<image> describe it"]


def make_images(seed: int = 0) -> list[Image.Image]:
    """Two random RGB images of different sizes and aspect ratios (different anyres grids on LLaVA-NeXT)."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray((rng.random((40, 60, 3)) * 255).astype("uint8")),
            Image.fromarray((rng.random((64, 30, 3)) * 255).astype("uint8"))]


class TinyCase:
    """A tiny model with a batch of two left-padded prompts and the two single-prompt inputs."""

    def __init__(self, kind: str, vision: str = "clip", **kw):
        from vlm_tools.core.models import build_tiny_llava

        self.kind, self.vision = kind, vision
        self.model, self.processor = build_tiny_llava(kind, vision, **kw)
        imgs = make_images()
        self.batch = self.processor(images=imgs, text=PROMPTS, return_tensors="pt", padding=True)
        self.singles = [self.processor(images=[im], text=[t], return_tensors="pt") for im, t in zip(imgs, PROMPTS)]
        self.id = f"{kind}-{vision}"
