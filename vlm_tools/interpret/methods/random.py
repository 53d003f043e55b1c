"""`random`: uniform random maps and text relevances, a floor for every attribution metric.

The values are drawn from a generator seeded by the config's `seed` and the sample's content (image pixels, prompt,
answer ids, explained tokens), so a sample gets the same maps alone or in any batch, and another seed gives others.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from vlm_tools._registry import register_explainer
from vlm_tools.interpret.base import Attribution, ExplainConfig, ExplainContext, ExplainSample, Explainer

__all__ = ["RandomConfig", "RandomExplainer", "sample_seed"]


@dataclass(frozen=True)
class RandomConfig(ExplainConfig):
    """Attributes:
        seed: combined with each sample's content into the generator's seed.
    """

    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"seed must be an int, got {self.seed!r}")


def sample_seed(seed: int, sample: ExplainSample) -> int:
    """A 63-bit generator seed from `seed` and the sample's image, prompt, answer ids and explained tokens."""
    h = hashlib.sha256()
    h.update(str(int(seed)).encode())
    image = sample.image.convert("RGB")
    h.update(f"{image.size[0]}x{image.size[1]}".encode())
    h.update(image.tobytes())
    h.update(sample.prompt.encode("utf-8"))
    h.update(torch.as_tensor(sample.answer_ids, dtype=torch.long).numpy().tobytes())
    h.update(torch.as_tensor(sample.targets, dtype=torch.long).numpy().tobytes())
    return int.from_bytes(h.digest()[:8], "little") & ((1 << 63) - 1)


@register_explainer("random", config=RandomConfig, description="uniform random maps (seeded per sample): a floor "
                                                               "for every metric")
class RandomExplainer(Explainer):
    """Maps `U(0, 1)` on the frame (pruned cells 0); text relevances `U(0, 1)` before each explained token."""

    def attribute(self, ctx: ExplainContext) -> list[Attribution]:
        clean = ctx.clean
        out = []
        for s, (sample, frame) in enumerate(zip(ctx.samples, ctx.frames(clean))):
            gen = torch.Generator().manual_seed(sample_seed(self.config.seed, sample))
            t = int(sample.targets.numel())
            maps = torch.rand((t, frame.rows, frame.cols), generator=gen)
            maps[:, frame.pruned] = 0.0
            text_pos = ctx.text_positions(clean.layouts[s])
            before = text_pos[None, :] < ctx.target_positions(clean, s)[:, None]
            text = torch.rand((t, text_pos.numel()), generator=gen) * before
            out.append(Attribution(maps=maps, text=text))
        return out
