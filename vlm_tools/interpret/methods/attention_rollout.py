"""`attention_rollout`: Abnar & Zuidema (2020) attention rollout over the language model's decoder layers.

Per layer, `A_l` is the head-mean softmax attention of every (non-padding) position of the clean teacher-forced
sequence, recomputed in fp32 by `teacher_force(..., attention_queries=...)` (the model keeps SDPA). With the residual
stream folded in, `Ã_l = 0.5 A_l + 0.5 I`, each row renormalised, the rollout is `R = Ã_n ... Ã_2 Ã_1` and the map of
an explained token is the row of `R` of the position that predicts it (the token before it), read at the image
positions and put on the clean pass's frame; the same row at the text positions is the text relevance (0 at and
after the token itself, by causality). Only the rows of the explained tokens are rolled out (vector-matrix products
from the last layer down), so the cost is one forward pass plus the rows' recomputation.

On an LLM-stage pruned model (FastV), visual positions dropped inside the LLM are neither queries nor keys of the
rollout (the layers after the drop never hold them); attention mass that earlier layers put on them is left out
before the rows are renormalised.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlm_tools._registry import register_explainer
from vlm_tools.core.wrapped import SequenceLayout
from vlm_tools.interpret.base import Attribution, ExplainConfig, ExplainContext, Explainer

__all__ = ["AttentionRolloutConfig", "AttentionRollout", "rollout_rows"]


@dataclass(frozen=True)
class AttentionRolloutConfig(ExplainConfig):
    """Attributes:
        residual: weight of the identity (residual stream) in each layer's matrix, `Ã = (1 - residual) A +
            residual I`; Abnar & Zuidema use 0.5.
    """

    residual: float = 0.5

    def __post_init__(self) -> None:
        if isinstance(self.residual, bool) or not isinstance(self.residual, (int, float)) or \
                not 0.0 <= float(self.residual) < 1.0:
            raise ValueError(f"residual must be a float in [0, 1), got {self.residual!r}")


def rollout_rows(attentions: torch.Tensor, rows: torch.Tensor, residual: float = 0.5) -> torch.Tensor:
    """Rows of the attention rollout.

    Args:
        attentions: `(n_layers, N, N)` head-mean attention among N positions (first layer first).
        rows: `(T,)` indices (into the N positions) of the rollout rows to return.
        residual: identity weight of each layer's matrix.

    Returns:
        `(T, N)` fp32 rows `e_row^T Ã_n ... Ã_1` with `Ã_l = rownorm((1 - residual) A_l + residual I)`.
    """
    n = attentions.shape[-1]
    eye = torch.eye(n, dtype=torch.float32, device=attentions.device)
    out = eye[rows.to(attentions.device)]
    for a in attentions.float().flip(0):
        m = (1.0 - residual) * a + residual * eye
        m = m / m.sum(-1, keepdim=True).clamp(min=1e-12)
        out = out @ m
    return out


@register_explainer("attention_rollout", config=AttentionRolloutConfig,
                    description="attention rollout (Abnar & Zuidema) over the LLM layers, fp32 recomputed rows")
class AttentionRollout(Explainer):
    """Attention rollout of each explained token's predicting position (see the module doc)."""

    def attribute(self, ctx: ExplainContext) -> list[Attribution]:
        clean = ctx.clean
        real = [torch.nonzero((lay.kind == SequenceLayout.TEXT) | (lay.kind == SequenceLayout.VISUAL)).flatten()
                for lay in clean.layouts]
        forced = ctx.force(hidden_states=False, attention_queries=real)
        frames = ctx.frames()  # the clean pass's frame (same inputs, same layout as `forced`)
        logps = forced.answer_logprobs()
        out = []
        for s, (smp, frame) in enumerate(zip(ctx.samples, frames)):
            keys = real[s]
            att = forced.attentions[s][:, :, keys]  # (n_layers, N, N): rows = keys = the real positions, in order
            predicting = ctx.target_positions(forced, s) - 1
            index = torch.searchsorted(keys, predicting)
            rows = rollout_rows(att, index, float(self.config.residual)).cpu()
            full = torch.zeros(rows.shape[0], forced.logits.shape[1])
            full[:, keys] = rows
            text = full[:, ctx.text_positions(forced.layouts[s])]
            out.append(Attribution(maps=frame.to_grid(full), text=text,
                                   scores={"logprob": logps[s][smp.targets].float().cpu().tolist()}))
        return out
