"""MDI and AEI ("When Language Overrules", arXiv 2508.10552): the per-layer / per-stage statistics.

`MDI = (A_T / |T|) / (A_O / |O|)`, `AEI_T = P_T / Q_T` with `P_T = A_T / (A_T + A_O)`, `Q_T = |T| / (|T| + |O|)`
(and `AEI_O` likewise, so `MDI = AEI_T / AEI_O`). A stage (early / middle / late; default the three thirds of the
layers, `boundaries=(a, b)` gives `[0, a)`, `[a, b)`, `[b, L)`) sums `A_T` and `A_O` over its layers before
normalising; its `|T|`, `|O|` are the mean counts over its layers (they differ only inside an LLM-pruning method
such as FastV, whose pruned layers see fewer image tokens).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["DominanceStats", "compute_stats", "stage_layers", "STAGES"]

STAGES = ("early", "middle", "late")


@dataclass
class DominanceStats:
    """MDI / AEI of one layer or one stage.

    Attributes:
        name: "layer 3" or a stage name.
        layers: the decoder layers aggregated.
        text_attention: P_T, the share of the attention to T and O that goes to text tokens.
        image_attention: P_O = 1 - P_T.
        n_text: |T| (mean over the layers).
        n_image: |O| (mean over the layers).
        mdi: (P_T / |T|) / (P_O / |O|); NaN without image tokens or layers, inf if P_O = 0.
        aei_text: P_T / Q_T.
        aei_image: P_O / Q_O.
    """

    name: str
    layers: list[int]
    text_attention: float
    image_attention: float
    n_text: float
    n_image: float
    mdi: float
    aei_text: float
    aei_image: float

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON-ready values: one rule for every writer, a non-finite number (MDI undefined without
        image tokens, or infinite when no attention reaches them) is `None` (JSON `null`)."""
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()}


def _ratio(a: float, b: float) -> float:
    if b == 0:
        return float("nan") if a == 0 else float("inf")
    return a / b


def compute_stats(name: str, layers: list[int], a_text: float, a_image: float, n_text: float,
                  n_image: float) -> DominanceStats:
    """MDI / AEI from attention masses (any scale: they are normalised) and token counts."""
    total = a_text + a_image
    if not layers or total <= 0 or n_text <= 0 or n_image <= 0:
        nan = float("nan")
        return DominanceStats(name, list(layers), nan, nan, n_text, n_image, nan, nan, nan)
    p_t, p_o = a_text / total, a_image / total
    q_t = n_text / (n_text + n_image)
    q_o = 1.0 - q_t
    return DominanceStats(name, list(layers), p_t, p_o, n_text, n_image, _ratio(p_t / n_text, p_o / n_image),
                          p_t / q_t, p_o / q_o)


def stage_layers(n_layers: int, boundaries: tuple[int, int] | None = None) -> dict[str, list[int]]:
    """Layers of the early / middle / late stages: `[0, a)`, `[a, b)`, `[b, L)`; default thirds (rounded).

    Raises:
        ValueError: boundaries outside `0 <= a <= b <= L`.
    """
    if boundaries is None:
        boundaries = (round(n_layers / 3), round(2 * n_layers / 3))
    if len(boundaries) != 2:
        raise ValueError(f"boundaries must be two layer indices (a, b), got {boundaries!r}")
    a, b = (int(x) for x in boundaries)
    if not 0 <= a <= b <= n_layers:
        raise ValueError(f"stage boundaries must satisfy 0 <= a <= b <= {n_layers} (the number of decoder layers), "
                         f"got {boundaries!r}")
    return {"early": list(range(a)), "middle": list(range(a, b)), "late": list(range(b, n_layers))}
