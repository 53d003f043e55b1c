"""`tam`: Token Activation Maps (xmed-lab/TAM, ICCV 2025) on one teacher-forced pass.

Per explained answer token: the logit-lens map of its class over the image positions, the estimated-causal-inference
subtraction of the context's interference, the rank Gaussian filter, min-max per token. The mechanism is
`vlm_tools.interpret.logit_lens.token_maps` (shared with `arc` and every scale of `msea`); see that module for the
semantics and where they deviate from TAM's code.
"""

from __future__ import annotations

from dataclasses import dataclass

from vlm_tools._registry import register_explainer
from vlm_tools.interpret.base import Attribution, ExplainConfig, ExplainContext, Explainer
from vlm_tools.interpret.logit_lens import TokenMaps, special_ids, token_maps

__all__ = ["TamConfig", "Tam", "lens_attributions"]


@dataclass(frozen=True)
class TamConfig(ExplainConfig):
    """Attributes:
        filter: apply TAM's rank Gaussian filter.
        eci: subtract the context interference (estimated causal inference).
    """

    filter: bool = True
    eci: bool = True

    def __post_init__(self) -> None:
        for name in ("filter", "eci"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")


def to_attribution(tm: TokenMaps, frame) -> Attribution:
    """An `Attribution` from one sample's `TokenMaps` (scores `prob` and `eci_scale`)."""
    return Attribution(maps=tm.maps, text=tm.text, frame=frame,
                       scores={"prob": tm.prob.tolist(), "eci_scale": tm.scale.tolist()})


def lens_attributions(ctx: ExplainContext, *, weighting: str, use_eci: bool, use_filter: bool) -> list[Attribution]:
    """Logit-lens attributions of every sample of `ctx` on its clean pass (one forced pass for all tokens)."""
    forced = ctx.clean
    frames = ctx.frames(forced)
    skip = special_ids(ctx.processor)
    out = []
    for s, frame in enumerate(frames):
        tm = token_maps(forced, s, frame, ctx.samples[s].targets, weighting=weighting, use_eci=use_eci,
                        use_filter=use_filter, skip=skip)
        out.append(to_attribution(tm, frame))
    return out


@register_explainer("tam", config=TamConfig,
                    description="Token Activation Maps: logit-lens maps of each answer token, context interference "
                                "removed (ECI), rank Gaussian filter (one forced pass)")
class Tam(Explainer):
    def attribute(self, ctx: ExplainContext) -> list[Attribution]:
        return lens_attributions(ctx, weighting="tam", use_eci=self.config.eci, use_filter=self.config.filter)
