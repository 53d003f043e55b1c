"""`occlusion`: captum's `Occlusion` over the cells of the image frame.

captum slides `window x window` cell windows (stride `stride`, default the window) over a per-cell keep vector of
ones (one `(rows, cols)` frame per sample; a batch whose frames differ is padded to the largest, padding cells hide
nothing); an occluded cell (baseline 0) hides every visual position that covers it (`ImageFrame.cells`), which the
forward pass masks out of the attention (`teacher_force(..., mask_positions=...)`, the same condition as deletion
curves). captum evaluates `perturbations_per_eval` windows per forward pass (each a copy of the batch), and the
attribution of a cell is the drop of each explained token's log-probability when its window is hidden (averaged
over the windows covering it when windows overlap). One captum call explains every token: the forward function
returns all of a row's target log-probs. Cells no kept token covers (pruned) hold 0.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from vlm_tools._registry import register_explainer
from vlm_tools.interpret.base import Attribution, ExplainConfig, ExplainContext, Explainer
from vlm_tools.interpret.forcing import teacher_force
from vlm_tools.interpret.frame import ImageFrame
from vlm_tools.interpret.methods.batching import repeated_inputs, row_samples, target_logprobs

__all__ = ["OcclusionConfig", "OcclusionExplainer", "occluded_positions"]


@dataclass(frozen=True)
class OcclusionConfig(ExplainConfig):
    """Attributes:
        window: side of the square window of cells hidden at once (1: each cell alone; 2: 2x2 cells).
        stride: cells between window positions (None: the window, so windows tile the frame).
        perturbations_per_eval: windows evaluated per forward pass (each one copy of the batch).
    """

    window: int = 1
    stride: int | None = None
    perturbations_per_eval: int = 16

    def __post_init__(self) -> None:
        for name in ("window", "stride", "perturbations_per_eval"):
            v = getattr(self, name)
            if v is None and name == "stride":
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.stride is not None and self.stride > self.window:
            raise ValueError(f"stride ({self.stride}) must not exceed window ({self.window}): cells would be skipped")


def occluded_positions(frame: ImageFrame, hidden: torch.Tensor) -> torch.Tensor:
    """Visual positions that cover any of the frame's cells selected by `hidden` (`(rows * cols,)` bool)."""
    cover = frame.cells[:, hidden.to(frame.cells.device)].any(1)
    return frame.positions[cover]


def _forward(keep: torch.Tensor, ctx: ExplainContext, frames: list[ImageFrame],
             targets: list[torch.Tensor]) -> torch.Tensor:
    """captum's forward function: `(rows, R, C)` keep vectors -> `(rows, T_max)` target log-probs."""
    rows = row_samples(keep.shape[0], list(range(len(ctx.samples))))
    images, prompts, answers = repeated_inputs(ctx, rows)
    masked = []
    for r, s in enumerate(rows):
        f = frames[s]
        hidden = keep[r, :f.rows, :f.cols].reshape(-1) == 0
        masked.append(occluded_positions(f, hidden.cpu()))
    forced = teacher_force(ctx.model, ctx.processor, images, prompts, answers, hidden_states=False,
                           mask_positions=masked)
    return target_logprobs(forced, [targets[s] for s in rows])


@register_explainer("occlusion", config=OcclusionConfig,
                    description="captum Occlusion over frame cells: drop of the token's log-prob when hidden")
class OcclusionExplainer(Explainer):
    """Occlusion over the cells of each sample's frame (see the module doc)."""

    def attribute(self, ctx: ExplainContext) -> list[Attribution]:
        from captum.attr import Occlusion

        cfg = self.config
        frames = ctx.frames()
        targets = [smp.targets for smp in ctx.samples]
        n_rows = max(f.rows for f in frames)
        n_cols = max(f.cols for f in frames)
        width = max(int(t.numel()) for t in targets)
        device = next(ctx.model.model.parameters()).device
        keep = torch.ones(len(frames), n_rows, n_cols, device=device)
        stride = cfg.stride if cfg.stride is not None else cfg.window
        win = (min(cfg.window, n_rows), min(cfg.window, n_cols))
        fwd = functools.partial(_forward, ctx=ctx, frames=frames, targets=targets)
        with torch.no_grad():
            attr = Occlusion(fwd).attribute(keep, sliding_window_shapes=win,
                                            strides=(min(stride, win[0]), min(stride, win[1])), baselines=0,
                                            perturbations_per_eval=cfg.perturbations_per_eval)
        # one attribution per output element: (B * T_max, R, C), sample-major
        attr = attr.reshape(len(frames), width, n_rows, n_cols).float().cpu()
        logps = ctx.clean.answer_logprobs()
        out = []
        for s, (f, t) in enumerate(zip(frames, targets)):
            maps = attr[s, :t.numel(), :f.rows, :f.cols].clone()
            maps[:, f.pruned] = 0.0
            out.append(Attribution(maps=maps, text=None, scores={"logprob": logps[s][t].float().cpu().tolist()}))
        return out
