"""`center`: a Gaussian bump at the centre of the image frame, the same for every token (a centre-bias floor).

The distance of each cell to the centre is measured in original-image pixels (`ImageFrame.cell_centers`), so on a
non-square image or non-square cells (LLaVA-NeXT's stitched tiles) the bump is round in the image, not in the grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlm_tools._registry import register_explainer
from vlm_tools.interpret.base import Attribution, ExplainConfig, ExplainContext, Explainer
from vlm_tools.interpret.frame import ImageFrame

__all__ = ["CenterConfig", "CenterExplainer", "center_map"]


@dataclass(frozen=True)
class CenterConfig(ExplainConfig):
    """Attributes:
        sigma: the Gaussian's standard deviation as a fraction of the frame's shorter side (in pixels), > 0.
    """

    sigma: float = 0.25

    def __post_init__(self) -> None:
        if isinstance(self.sigma, bool) or not isinstance(self.sigma, (int, float)):
            raise TypeError(f"sigma must be a float, got {self.sigma!r}")
        if not float(self.sigma) > 0:
            raise ValueError(f"sigma must be > 0 (a fraction of the frame's shorter side), got {self.sigma}")


def center_map(frame: ImageFrame, sigma: float) -> torch.Tensor:
    """`(rows, cols)` fp32 `exp(-d^2 / (2 s^2))`, d the pixel distance of each cell centre to the frame's centre and
    s = `sigma` x the frame's shorter side in pixels; pruned cells 0."""
    x0, y0, x1, y1 = frame.box
    centers = frame.cell_centers()
    d2 = (centers[:, 0] - (x0 + x1) / 2) ** 2 + (centers[:, 1] - (y0 + y1) / 2) ** 2
    s = float(sigma) * min(x1 - x0, y1 - y0)
    bump = torch.exp(-d2 / (2 * s * s)).float().view(frame.rows, frame.cols)
    bump[frame.pruned] = 0.0
    return bump


@register_explainer("center", config=CenterConfig, description="Gaussian bump at the image centre (pixel "
                                                               "distances): a centre-bias floor")
class CenterExplainer(Explainer):
    """Every explained token gets `center_map` of its sample's frame; no text branch."""

    def attribute(self, ctx: ExplainContext) -> list[Attribution]:
        out = []
        for sample, frame in zip(ctx.samples, ctx.frames()):
            bump = center_map(frame, self.config.sigma)
            out.append(Attribution(maps=bump.expand(int(sample.targets.numel()), -1, -1).clone()))
        return out
