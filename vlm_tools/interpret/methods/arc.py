"""`arc`: TAM with the context interference reweighted by rank-biased overlap (ARC, arXiv 2509.22415).

RBO (top-k 50, p 0.9) between each context token's logit-lens top-k and the target's (at the position that predicts
it) replaces TAM's ECI weights. The paper leaves the combination open; both variants of the reference spec are here:
`"irrelevance"` (a) `alpha_j ~ (1 - RBO_jt) relu(logit_j[c])` and `"relevance"` (b) `alpha_j ~ RBO_jt`; alpha is
normalised, then TAM's least-squares scale and ReLU subtraction. The default, `"relevance"`, was chosen by
`benchmarks/explain_eval.py` on the default model (24 shapes_vqa answers): pointing game 0.375 vs 0.292, Obj-IoU
0.183 vs 0.168, deletion AUC 0.510 vs 0.520, insertion AUC 0.835 vs 0.821 (`benchmarks/RESULTS.md`, explain_eval).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from vlm_tools._registry import register_explainer
from vlm_tools.interpret.base import Attribution, ExplainConfig, ExplainContext, Explainer
from vlm_tools.interpret.methods.tam import lens_attributions

__all__ = ["DEFAULT_VARIANT", "Arc", "ArcConfig"]

#: ARC's default weighting (set from the explain-eval comparison).
DEFAULT_VARIANT = "relevance"
VARIANTS = ("irrelevance", "relevance")


@dataclass(frozen=True)
class ArcConfig(ExplainConfig):
    """Attributes:
        variant: `"irrelevance"` ((1 - RBO) x textual score) or `"relevance"` (RBO) context weights.
        filter: apply TAM's rank Gaussian filter.
    """

    variant: Literal["irrelevance", "relevance"] = DEFAULT_VARIANT
    filter: bool = True

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}")
        if not isinstance(self.filter, bool):
            raise TypeError(f"filter must be a bool, got {self.filter!r}")


@register_explainer("arc", config=ArcConfig,
                    description="TAM with the context interference reweighted by rank-biased overlap of logit-lens "
                                "top-50 lists (ARC; variant irrelevance or relevance)")
class Arc(Explainer):
    def attribute(self, ctx: ExplainContext) -> list[Attribution]:
        return lens_attributions(ctx, weighting=self.config.variant, use_eci=True, use_filter=self.config.filter)
