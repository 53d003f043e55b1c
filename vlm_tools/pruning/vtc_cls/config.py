"""Config of `vtc_cls`."""

from __future__ import annotations

from dataclasses import dataclass

from vlm_tools.core.config import BudgetConfig


@dataclass(frozen=True)
class VtcClsConfig(BudgetConfig):
    """`keep` / `ratio` as every method, plus the vision blocks whose [CLS] attention rows are summed.

    The official code sums `attentions[layer:-1]`, i.e. blocks `layer .. L-2` (penultimate included, last
    excluded); the paper's best setting is the three blocks ending at the penultimate (`--layer 20` on CLIP-L).

    Attributes:
        start_layer: first vision block summed (negative values count from the end, like Python indices);
            default: `end_layer - 2`, i.e. three blocks.
        end_layer: last vision block summed, inclusive (negative values count from the end); default: the
            penultimate block `L - 2`.
    """

    start_layer: int | None = None
    end_layer: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("start_layer", "end_layer"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise TypeError(f"{name} must be an int block index or None, got {type(value).__name__}")

    def block_range(self, n_layers: int) -> tuple[int, int]:
        """The inclusive `(start, end)` block range for a tower of `n_layers` blocks.

        Raises:
            ValueError: the range is empty or outside the tower, naming the valid indices.
        """
        end = n_layers - 2 if self.end_layer is None else self.end_layer
        end = end + n_layers if end < 0 else end
        start = end - 2 if self.start_layer is None else self.start_layer
        start = start + n_layers if start < 0 and self.start_layer is not None else max(start, 0)
        if not 0 <= end < n_layers:
            raise ValueError(f"vtc_cls end_layer={self.end_layer} is outside the tower's blocks 0..{n_layers - 1}")
        if not 0 <= start <= end:
            raise ValueError(f"vtc_cls start_layer={self.start_layer} must lie in 0..end_layer ({end}) for a tower "
                             f"of {n_layers} blocks")
        return start, end
