"""The attribution method protocol: what `vlm_tools.explain` hands a method and what the method returns.

A method is an `Explainer` subclass registered with one line, `@register_explainer("name", config=..., description=...)`
(`vlm_tools._registry`), in a module of `vlm_tools/interpret/methods/`. `vlm_tools.explain(...)` generates the answers
once, builds one `ExplainContext` for the batch and calls `Explainer.attribute(ctx)`, which returns one `Attribution`
per sample: maps on the sample's image frame (`vlm_tools.interpret.frame`), relevances of the text tokens and named
per-token scores. Every multi-pass method gets its passes from `ExplainContext.force` (teacher forcing of the same
answer token ids, batched, through the possibly pruned `WrappedModel`), so all passes explain the same tokens.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from vlm_tools.core.config import MethodConfig
from vlm_tools.core.wrapped import SequenceLayout, WrappedModel
from vlm_tools.interpret.forcing import ForcedPass, teacher_force
from vlm_tools.interpret.frame import ImageFrame, image_frame

__all__ = ["Attribution", "ExplainSample", "ExplainContext", "Explainer", "ExplainConfig"]


@dataclass(frozen=True)
class ExplainConfig(MethodConfig):
    """Base of attribution method configs (no shared fields; methods add theirs)."""


@dataclass
class Attribution:
    """One sample's attribution, as a method returns it.

    Attributes:
        maps: `(T, rows, cols)` fp32, one map per explained token on the sample's frame (`ExplainContext.frames`);
            pruned cells 0, every value finite.
        text: `(T, n_text)` fp32 relevance of each text token of the sequence (`ExplainContext.text_positions`
            order) for each explained token (0 at and after the explained token's own position), or None when the
            method has no text branch.
        scores: named per-token values (each a list of T floats), e.g. the target token's probability.
        pruned: `(rows, cols)` bool cells of the maps' frame that no kept token covers, required when the maps lie
            on another frame than the clean pass's (e.g. the finest scale of a multi-scale method; the pixel box is
            the clean frame's); None: the maps are on the clean pass's frame and its `pruned` applies (or, when
            `frame` is given, that frame's `pruned`).
        frame: the frame `maps` live on when the method chose one (e.g. `msea`: its finest scale's); None means
            the sample's clean frame (`ExplainContext.frames()`).
    """

    maps: torch.Tensor
    text: torch.Tensor | None = None
    scores: dict[str, list[float]] = field(default_factory=dict)
    pruned: torch.Tensor | None = None
    frame: ImageFrame | None = None

    def __post_init__(self) -> None:
        if self.pruned is None and self.frame is not None:
            self.pruned = self.frame.pruned


@dataclass
class ExplainSample:
    """What is explained in one sample: its image, prompt, the answer (token ids) and which answer tokens."""

    image: Any
    prompt: str
    answer_ids: torch.Tensor
    targets: torch.Tensor


class ExplainContext:
    """The batch an attribution method explains, and the shared passes over it.

    Attributes:
        model: the `WrappedModel` the passes run through (a plain model is wrapped with `none` by the caller).
        processor: its processor.
        adapter: the model's `ModelAdapter`.
        samples: one `ExplainSample` per sample.
    """

    def __init__(self, model: WrappedModel, processor: Any, samples: list[ExplainSample]) -> None:
        if not isinstance(model, WrappedModel):
            raise TypeError("ExplainContext needs a WrappedModel (use vlm_tools.interpret.forcing.as_wrapped)")
        self.model = model
        self.processor = processor
        self.adapter = model.adapter
        self.samples = samples
        self._clean: ForcedPass | None = None

    @property
    def images(self) -> list:
        return [s.image for s in self.samples]

    @property
    def prompts(self) -> list[str]:
        return [s.prompt for s in self.samples]

    @property
    def answers(self) -> list[torch.Tensor]:
        return [s.answer_ids for s in self.samples]

    def force(self, images: list | None = None, processor: Any = None, **kwargs: Any) -> ForcedPass:
        """One batched teacher-forced pass of this batch's answers (optionally other images / another processor,
        e.g. a larger input scale); keyword arguments go to `vlm_tools.interpret.forcing.teacher_force`."""
        return teacher_force(self.model, processor if processor is not None else self.processor,
                             images if images is not None else self.images, self.prompts, self.answers, **kwargs)

    @property
    def clean(self) -> ForcedPass:
        """The pass at the original input, with hidden states (computed once and shared by every method)."""
        if self._clean is None:
            self._clean = self.force(hidden_states=True)
        return self._clean

    def frames(self, forced: ForcedPass | None = None, processor: Any = None,
               images: list | None = None) -> list[ImageFrame]:
        """Per sample, the frame of its image in `forced` (the clean pass by default)."""
        forced = forced if forced is not None else self.clean
        proc = processor if processor is not None else self.processor
        imgs = images if images is not None else self.images
        return [image_frame(self.adapter, proc.image_processor, lay, img.size, forced.trace.grid)
                for lay, img in zip(forced.layouts, imgs)]

    def target_positions(self, forced: ForcedPass, sample: int) -> torch.Tensor:
        """Positions in `forced`'s sequence of the sample's explained tokens (their logits sit one position before)."""
        return forced.answer_positions[sample][self.samples[sample].targets]

    @staticmethod
    def text_positions(layout: SequenceLayout) -> torch.Tensor:
        """Positions of the text tokens (prompt text and answer; padding and visual tokens excluded), in order."""
        return torch.nonzero(layout.kind == SequenceLayout.TEXT).flatten()


class Explainer(ABC):
    """Base class of attribution methods. Subclasses set nothing by hand: `register_explainer` sets `name`, `kind`
    and `config_cls`; they implement `attribute`."""

    name: ClassVar[str] = ""
    kind: ClassVar[str] = "explain"
    config_cls: ClassVar[type] = ExplainConfig

    def __init__(self, config: ExplainConfig | None = None) -> None:
        self.config = config if config is not None else self.config_cls()

    @abstractmethod
    def attribute(self, ctx: ExplainContext) -> list[Attribution]:
        """One `Attribution` per sample of `ctx`."""
