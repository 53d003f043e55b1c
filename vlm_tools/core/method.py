"""The method protocol: what a registered method is, and the typed per-call context the core hands it.

A method is a `Method` subclass registered with one `@register_method("name", kind=..., config=...)` line.
`WrappedModel` drives it per call:

1. `check(adapter)` (once, at wrap time) raises a clear error if the method cannot run on this model;
2. `attach(model, adapter, slot)` (once, at wrap time) registers hooks on the model instance and returns their
   `HookHandle`; each hook reads the per-call `CallContext` from `slot.ctx` and does nothing when it is `None`
   (outside a wrapped call);
3. per call, the vision tower runs; hooks score (and may shorten the tower sequence, updating `ctx.token_index`);
4. `select(features, ctx, adapter)` returns, per vision row, the sorted original patch indices to keep (methods that
   select before the LLM: `selects` is True);
5. the kept features are projected and packed; the LLM runs (LLM-stage methods act through `core.lm_drop`).

Data that crosses module boundaries lives in typed `CallContext` fields (documented below); `ctx.state` is only a
method's private scratch space, keyed by the method's name.

Kinds: "vision" (inside the vision tower), "projector" (at the projector), "llm" (inside the language model) select
or drop tokens; "modifier" changes the vision tower without selecting tokens and stacks with one pruning method.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import torch
from torch import nn

from vlm_tools.core.config import BudgetConfig, MethodConfig
from vlm_tools.core.hooks import HookHandle

if TYPE_CHECKING:
    from vlm_tools.core.adapters import ModelAdapter, VisionPlan

__all__ = ["Method", "Modifier", "CallContext", "ContextSlot", "TokenRecord", "LmCall", "LmKeep", "current_index",
           "all_rows", "SELECTING_KINDS"]

#: Kinds whose method chooses the visual tokens before the LLM.
SELECTING_KINDS = ("vision", "projector")


class TokenRecord(NamedTuple):
    """Visual tokens per row (tower stages) or per sample (LLM stages) at one point of a call.

    `where` uses one scheme for every method: `"vision.<b>"` = at the output of vision block b, `"projector"` = what
    enters the LLM, `"llm.<l>"` = at the output of decoder layer l (what layers > l see).
    """

    where: str
    tokens: list[int]


@dataclass
class LmCall:
    """What the language model was called with in its current call (one prefill or one decoding step; set by
    `vlm_tools.core.lm_drop`).

    Attributes:
        mask2d: the call's 2-D attention mask over the full-length key axis, or None (no padding).
        position_ids: the call's position ids, or None (the default numbering from `past`).
        length: query length of the call.
        past: cached length before the call (0: a prefill).
        spans: per row of the call, `(start, length, image)` of each image's placeholder run (the rows of one sample
            repeat its spans under `num_return_sequences` / beam search).
        per_sample: rows per sample (`generate` expands each sample `num_beams` / `num_return_sequences` times).
        forced: `(B,)` trailing teacher-forced tokens per row (see `WrappedModel.forward`), or None.
        first: whether this is the first language-model call of the wrapped call (the prompt's prefill).
        decided: whether a drop decision was made in this call.
        layer_kwargs: the replacement mask / rotary / position kwargs of the layers after the drop (computed once).
    """

    mask2d: torch.Tensor | None
    position_ids: torch.Tensor | None
    length: int
    past: int
    spans: list[list[tuple[int, int, int]]] = field(default_factory=list)
    per_sample: int = 1
    forced: torch.Tensor | None = None
    first: bool = False
    decided: bool = False
    layer_kwargs: dict | None = None

    def sample_of(self, row: int) -> int:
        """The sample (prompt) a row of the call belongs to."""
        return row // self.per_sample

    @property
    def prefill(self) -> bool:
        """Whether the call starts from an empty cache (the prompt; every call of a cache-less generate)."""
        return self.past == 0

    def query_positions(self, rows: int, device) -> torch.Tensor:
        """`(rows,)` position of each row's last prompt token in a prefill: the query whose attention an LLM-stage
        method decides with (the last attended token, before any teacher-forced continuation)."""
        if self.mask2d is None or self.mask2d.shape[-1] != self.length:
            last = torch.full((rows,), self.length - 1, dtype=torch.long, device=device)
        else:
            pos = torch.arange(1, self.length + 1, device=self.mask2d.device)
            last = ((self.mask2d.bool().long() * pos).max(dim=1).values - 1).clamp_min(0).to(device)
        if self.forced is not None:
            last = last - self.forced.to(device)
        return last

    def positions(self, rows: int, device) -> torch.Tensor:
        """`(rows, length)` position ids the model uses in this call (its own, or the default numbering)."""
        if self.position_ids is not None:
            return self.position_ids.to(device).expand(rows, -1)
        return (torch.arange(self.length, device=device) + self.past).expand(rows, -1)


@dataclass
class LmKeep:
    """The kept layout of an LLM-stage drop (`vlm_tools.core.lm_drop`): what decoder layers `> after_layer` hold.

    Attributes:
        after_layer: the drop happens at the output of this decoder layer.
        index: `(B, S)` original prompt position of each slot of the shortened sequence (padding slots: 0).
        valid: `(B, S)` False on padding slots.
        length: the prompt length of the prefill.
        full_output: the last layer's output is scattered back to the full length (FastV), so the returned sequence
            covers every prompt position; otherwise it covers the kept slots.
        held: internal: the full hidden states at the drop, kept until the scatter-back.
    """

    after_layer: int
    index: torch.Tensor
    valid: torch.Tensor
    length: int
    full_output: bool = False
    held: torch.Tensor | None = None

    @property
    def from_layer(self) -> int:
        """The first decoder layer that runs on the kept positions."""
        return self.after_layer + 1

    @property
    def removed(self) -> torch.Tensor:
        """`(B,)` prompt positions removed per row."""
        return self.length - self.valid.sum(1)

    def keys_of(self, values: torch.Tensor, n_keys: int, fill) -> torch.Tensor:
        """Map a per-position tensor `(B, L + generated)` onto the key axis of a layer `>= from_layer`.

        The result has `n_keys` columns: the kept prompt positions (padding slots get `fill`), then the generated
        positions. Raises `RuntimeError` when `values` is too short for the layer's keys.
        """
        short = torch.where(self.valid.to(values.device), values.gather(1, self.index.to(values.device)),
                            torch.as_tensor(fill, dtype=values.dtype, device=values.device))
        extra = n_keys - short.shape[1]
        out = torch.cat([short, values[:, self.length:self.length + extra]], dim=1)
        if out.shape[1] != n_keys:
            raise RuntimeError(f"a layer after the drop attends to {n_keys} keys but {out.shape[1]} are known")
        return out


@dataclass
class CallContext:
    """State of one wrapped call; created and cleared by `WrappedModel` in try/finally.

    Attributes:
        plan: layout of the vision batch and per-row budgets.
        pixel_rows: the vision-tower input of the call, one row per crop.
        token_index: `(rows, T)` original patch index of each patch token at the tower output; `None` means all
            patches in order. Methods that shorten the tower sequence set it.
        scores: `(rows, T)` the selecting method's scores of the current patch tokens (fp32; published in the trace).
        kept: per vision row, the kept original patch indices (set by the wrapper after `select`).
        lm_spans: per sample, `(start, length, image index)` of each image's placeholder run in the LLM input.
        lm_input_ids: the (shrunk, re-padded) `input_ids` the language model receives.
        lm_attention_mask: its 2-D attention mask.
        forced_tokens: `(B,)` trailing teacher-forced tokens per sample (`WrappedModel.forward(forced_tokens=...)`):
            LLM-stage methods decide at the last prompt token before them, as during generation.
        lm_call: what the language model was called with in its current call (set by `core.lm_drop`).
        lm_keep: the LLM-side kept layout of the current pass after an LLM-stage drop (set by `core.lm_drop`; `None`:
            every position). A cache-less `generate` decides afresh at every step.
        prompt_keep: the kept layout of the call's first pass (the prompt), what `SequenceLayout` describes.
        llm_kept: per `(sample, image)`, the patch indices kept by an LLM-stage decision (same index space as
            `kept`: `crop * patches_per_crop + patch`).
        tokens_after: per sample, the visual tokens the LLM's last layers saw after an LLM-stage decision.
        layer_tokens: `TokenRecord`s for the trace.
        prefill_end: wall-clock time the first LLM pass ended.
        state: private scratch space of the methods, keyed by method name (never read by another module).
    """

    plan: VisionPlan | None = None
    pixel_rows: torch.Tensor | None = None
    token_index: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    kept: list[torch.Tensor] | None = None
    lm_spans: list[list[tuple[int, int, int]]] | None = None
    lm_input_ids: torch.Tensor | None = None
    lm_attention_mask: torch.Tensor | None = None
    forced_tokens: torch.Tensor | None = None
    lm_call: LmCall | None = None
    lm_keep: LmKeep | None = None
    prompt_keep: LmKeep | None = None
    llm_kept: dict[tuple[int, int], torch.Tensor] | None = None
    tokens_after: list[int] | None = None
    layer_tokens: list[TokenRecord] = field(default_factory=list)
    prefill_end: float | None = None
    state: dict = field(default_factory=dict)
    _layouts: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    def record_tokens(self, where: str, tokens: list[int]) -> None:
        """Add (or replace) the token record at `where` (see `TokenRecord` for the label scheme)."""
        self.layer_tokens[:] = [r for r in self.layer_tokens if r.where != where]
        self.layer_tokens.append(TokenRecord(where, [int(t) for t in tokens]))

    def add_scores(self, scores: torch.Tensor) -> None:
        """Accumulate `(rows, T)` scores into `scores` (summed over the hooks that contribute, e.g. several blocks)."""
        self.scores = scores if self.scores is None else self.scores + scores

    def token_layout(self, adapter: ModelAdapter, image: int) -> torch.Tensor:
        """Original patch index of each LLM placeholder token of one image (cached per call); -1 for tokens that are
        not patches (the CLS feature of the "full" strategy, LLaVA-NeXT's newlines). See `ModelAdapter.token_layout`.
        """
        if image not in self._layouts:
            kept = self.kept if self.kept is not None else all_rows(self)
            self._layouts[image] = adapter.token_layout(self.plan, kept, image)
        return self._layouts[image]


class ContextSlot:
    """Holds the current `CallContext` of one wrapped model, per thread (None between calls).

    Each thread sees its own context, so concurrent calls of one wrapped model from several threads do not mix their
    state. The slot remembers (weakly) the model whose hooks read it: a copy of the model (`copy.deepcopy`, pickling)
    carries copies of the hooks whose slot owns nothing, which lets a later `wrap` recognise them as stale.
    """

    __slots__ = ("_local", "_owner")

    def __init__(self, owner: nn.Module | None = None) -> None:
        self._local = threading.local()
        self._owner = weakref.ref(owner) if owner is not None else None

    @property
    def ctx(self) -> CallContext | None:
        """This thread's current context."""
        return getattr(self._local, "ctx", None)

    @ctx.setter
    def ctx(self, value: CallContext | None) -> None:
        self._local.ctx = value

    def owned_by(self, model: nn.Module) -> bool:
        """Whether the hooks reading this slot were attached to `model` itself (not to a model it was copied from)."""
        return self._owner is not None and self._owner() is model

    def __deepcopy__(self, memo) -> ContextSlot:
        return ContextSlot()  # a copy belongs to no live wrapper

    def __reduce__(self):
        return ContextSlot, ()


class Method:
    """Base class of every registered method; `@register_method` sets `name`, `kind` and `config_cls`."""

    name: ClassVar[str] = ""
    kind: ClassVar[str] = ""
    config_cls: ClassVar[type] = MethodConfig

    def __init__(self, config: Any) -> None:
        self.config = config

    @property
    def selects(self) -> bool:
        """Whether this method chooses the visual tokens before the LLM (vision and projector kinds)."""
        return self.kind in SELECTING_KINDS

    @property
    def budget(self) -> tuple[int | None, float | None] | None:
        """`(keep, ratio)` of a method with a token budget, else None."""
        if isinstance(self.config, BudgetConfig):
            return self.config.keep, self.config.ratio
        return None

    def check(self, adapter: ModelAdapter) -> None:
        """Raise a clear error if the method cannot run on this model (called before attaching)."""

    def attach(self, model: nn.Module, adapter: ModelAdapter, slot: ContextSlot) -> HookHandle:
        """Register the method's hooks on the model instance and return their handle. Default: none."""
        return HookHandle(self.name)

    def select(self, features: torch.Tensor, ctx: CallContext, adapter: ModelAdapter) -> list[torch.Tensor]:
        """Kept original patch indices per vision row (sorted). `features`: `(rows, T, D)` feature-layer patches."""
        return all_rows(ctx)

    @classmethod
    def example_config(cls, model: nn.Module, workdir: str | None = None) -> dict[str, Any]:
        """A small valid config for `model` (used by `vlm-tools demo` and the contract tests)."""
        if issubclass(cls.config_cls, BudgetConfig):
            from vlm_tools.core.adapters import get_adapter

            return {"keep": max(1, get_adapter(model).n_patches // 8)}
        return {}

    def __repr__(self) -> str:
        cfg = ", ".join(f"{k}={v!r}" for k, v in self.config.to_dict().items() if v is not None)
        return f"{self.name}({cfg})"


class Modifier(Method):
    """A method that changes the vision tower without selecting tokens (e.g. `registers`); stacks with a pruner.

    `appends_tokens`: the modifier appends tokens to the tower's sequence (`VisionPlan.n_suffix`); at most one such
    modifier per wrap (refused at wrap time).
    """

    appends_tokens: ClassVar[bool] = False

    @property
    def selects(self) -> bool:
        return False


def current_index(ctx: CallContext, device) -> torch.Tensor:
    """`(rows, T)` original patch index of each current patch token."""
    if ctx.token_index is not None:
        return ctx.token_index
    plan = ctx.plan
    return torch.arange(plan.n_patches, device=device).expand(plan.n_rows, -1)


def all_rows(ctx: CallContext) -> list[torch.Tensor]:
    """Every current patch of every row (nothing pruned)."""
    idx = current_index(ctx, ctx.plan.valid.device)
    return [idx[r] for r in range(idx.shape[0])]
