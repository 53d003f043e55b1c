"""Config of `zoo_prune`."""

from __future__ import annotations

from dataclasses import dataclass

from vlm_tools.core.config import BudgetConfig

ESTIMATORS = ("zeroth_order", "jacobian")


@dataclass(frozen=True)
class ZooPruneConfig(BudgetConfig):
    """`keep` / `ratio` as every method (per image; split over the crops of a LLaVA-NeXT image).

    Attributes:
        estimator: "zeroth_order" (the paper: central differences through the real projector along `directions`
            random unit directions) or "jacobian" (the expectation in closed form from the projector's Jacobian,
            for a `linear -> elementwise activation -> linear` projector; see `scores.jacobian_sensitivity`).
        directions: m, the number of random unit directions shared by all tokens (paper: 64).
        step: h, the central-difference step (paper: 0.01).
        seed: seed of the direction bank (the same bank for every image and call).
        max_rows: most perturbed rows per projector call (memory bound of the zeroth-order estimator).
        upcast: run the zeroth-order passes in fp32 when the projector is bf16/fp16 (its own forward on fp32 copies
            of its weights, cached in the method object): bf16's spacing near |x| ~ 1 is ~0.008, comparable to
            `step`, so differences in the model's dtype are mostly rounding. False reproduces the official code,
            which differences in the model's dtype (fp16 there).
    """

    estimator: str = "zeroth_order"
    directions: int = 64
    step: float = 0.01
    seed: int = 0
    max_rows: int = 16384
    upcast: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {self.estimator!r}")
        for name in ("directions", "max_rows", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{name} must be an int, got {type(v).__name__}")
        if self.directions < 1:
            raise ValueError(f"directions must be >= 1, got {self.directions}")
        if self.max_rows < 2:
            raise ValueError(f"max_rows must be >= 2, got {self.max_rows}")
        if not isinstance(self.upcast, bool):
            raise TypeError(f"upcast must be a bool, got {type(self.upcast).__name__}")
        if isinstance(self.step, bool) or not isinstance(self.step, (int, float)) or not self.step > 0:
            raise ValueError(f"step must be a positive float, got {self.step!r}")
