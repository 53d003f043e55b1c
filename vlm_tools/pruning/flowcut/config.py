"""Config of `flowcut`."""

from __future__ import annotations

from dataclasses import dataclass

from vlm_tools.core.config import BudgetConfig

COUNT_SCOPES = ("image", "batch")


@dataclass(frozen=True)
class FlowCutConfig(BudgetConfig):
    """`keep` / `ratio` as every method (per image; LLaVA-NeXT: summed over its crops, newlines excluded).

    Attributes:
        count_scope: which vision rows share one adaptive pruning count per pruning layer. The official code
            computes one count for the whole tower batch (the maximum over its rows) and always ran one prompt at a
            time, so one tower batch held one image's crops. `"image"` (default) reproduces exactly that for any
            batch: the crops of one image share the maximum, different images do not influence each other (rows of
            different lengths are padded and masked inside the tower), so a batch gives the same kept tokens as
            single runs. `"batch"` shares one count over the whole tower batch, like the official code called on a
            multi-image batch; every row then has the same length (no padding), but results depend on the batch.
        llm_layer: LLaVA-NeXT only. The decoder layer after which the official text-query stage prunes each
            image to its budget (official: 1). The tower then keeps `budget // 2` patches per crop (the official
            `target_num / 2`). `None` disables the LLM stage: the tower prunes every crop straight to its share of
            the budget (the even split of `vlm_tools.core.adapters`). Ignored on LLaVA-1.5 (one crop per image).
    """

    count_scope: str = "image"
    llm_layer: int | None = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.count_scope not in COUNT_SCOPES:
            raise ValueError(f"count_scope must be one of {COUNT_SCOPES}, got {self.count_scope!r}")
        if self.llm_layer is not None:
            if isinstance(self.llm_layer, bool) or not isinstance(self.llm_layer, int):
                raise TypeError(f"llm_layer must be an int decoder-layer index or None, got "
                                f"{type(self.llm_layer).__name__}")
            if self.llm_layer < 0:
                raise ValueError(f"llm_layer must be a decoder-layer index >= 0 (or None), got {self.llm_layer}")
