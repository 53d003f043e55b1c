"""`WrappedModel`: runs a base LLaVA model with a method's pruning, reversibly.

The prepare step (see DESIGN.md): the vision tower and projector run with the method's hooks attached; each image's
placeholder run in `input_ids` (and `attention_mask`, `labels`) shrinks to the kept count and the batch is
re-padded on its padding side; the kept features go to the base model's own `forward`/`generate` as pre-encoded
`mm_encoder_outputs`, which the model scatters into the placeholders. The base model is never modified.

`WrappedModel` is module-like without being an `nn.Module`: `.to()`, `.eval()`, `.train()`, `.cuda()`, `.cpu()`,
`.float()` / `.half()` / `.bfloat16()` and `.requires_grad_()` act on the base model and return the wrapper (so
`w = w.eval().to("cuda")` keeps the pruning); every other attribute (`parameters`, `named_modules`, `state_dict`,
`save_pretrained`, `device`, `dtype`, `config`, `generation_config`, ...) is the base model's own. It is not an
`nn.Module` on purpose: a Module would register the base model as a child, so `state_dict()` / `named_modules()`
keys would gain a prefix and checkpoints written from the wrapper would not load into the base class, and torch
would treat the wrapper as a second owner of the same parameters.
"""

from __future__ import annotations

import functools
import threading
import time
import warnings
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from vlm_tools.core.adapters import ModelAdapter, get_adapter
from vlm_tools.core.hooks import HookHandle, marked_hooks, marked_ids, remove_marked, remove_marked_since
from vlm_tools.core.method import CallContext, ContextSlot, Method, TokenRecord, all_rows, current_index
from vlm_tools.core.tokens import assign_images, padding_side, shrink_placeholders

__all__ = ["WrappedModel", "Trace", "SampleTrace", "SequenceLayout", "wrap", "attached", "build_methods",
           "unwrap_model"]

# Module methods that act on the base model in place and return the module: the wrapper returns itself instead.
_CHAINABLE = ("to", "eval", "train", "cuda", "cpu", "float", "half", "bfloat16", "double", "requires_grad_")


@dataclass
class SequenceLayout:
    """What each position of the sequence the language model returned holds (one sample of a call).

    This is the sequence axis of a wrapped `forward`'s logits / hidden states (for `generate`: of the prefill's).
    Vision-side pruning shortens it; an LLM-stage drop without scatter-back (FlowCut's LLaVA-NeXT stage) shortens it
    to the kept slots; with scatter-back (FastV) every position stays, and visual tokens removed inside the LLM are
    marked `DROPPED` (their last-layer hidden states are stale copies from the layer before the drop).

    Attributes:
        ids: `(L,)` token id at each position (the image placeholder id at visual positions).
        kind: `(L,)` `PAD`, `TEXT`, `VISUAL` or `DROPPED`.
        patch: `(L,)` original patch index of visual positions (`crop * patches_per_crop + patch`); -1 at the CLS
            feature of the "full" strategy, LLaVA-NeXT newline tokens and every non-visual position.
        image: `(L,)` index of the image (within the sample) a visual position belongs to, -1 elsewhere.
    """

    PAD = 0
    TEXT = 1
    VISUAL = 2
    DROPPED = 3

    ids: torch.Tensor
    kind: torch.Tensor
    patch: torch.Tensor
    image: torch.Tensor

    def visual_positions(self, image: int | None = None) -> torch.Tensor:
        """Positions of the visual tokens the last layer processed (optionally of one image)."""
        sel = self.kind == self.VISUAL
        if image is not None:
            sel &= self.image == image
        return torch.nonzero(sel).flatten()


@dataclass
class SampleTrace:
    """What happened to one sample (prompt) of a call.

    Attributes:
        kept: per image, the sorted kept patch indices into the image's original grid (LLaVA-NeXT: index
            `crop * patches_per_crop + patch`, crop 0 being the base image).
        tokens_before: visual tokens the LLM would have seen without pruning (newline tokens included).
        tokens_after: visual tokens the LLM saw.
        layout: what each position of the returned sequence holds (see `SequenceLayout`).
    """

    kept: list[torch.Tensor]
    tokens_before: int
    tokens_after: int
    layout: SequenceLayout | None = None


@dataclass
class Trace:
    """Record of the last wrapped call: per-sample traces, per-layer token counts and prefill wall time.

    `grid` is the patch grid `(rows, cols)` of one crop in this call (kept indices refer to it). `layer_tokens` are
    `TokenRecord(where, tokens)` pairs (see `vlm_tools.core.method.TokenRecord` for the label scheme). `extra`
    holds `"scores"`: the selecting method's `(rows, T)` fp32 scores of the patch tokens it chose from, when it has
    any.
    """

    method: str
    samples: list[SampleTrace]
    prefill_ms: float
    grid: tuple[int, int] | None = None
    layer_tokens: list[TokenRecord] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    @property
    def kept(self) -> list[list[torch.Tensor]]:
        """Per sample, per image: kept patch indices (sorted)."""
        return [s.kept for s in self.samples]

    @property
    def tokens_before(self) -> list[int]:
        return [s.tokens_before for s in self.samples]

    @property
    def tokens_after(self) -> list[int]:
        return [s.tokens_after for s in self.samples]

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "prefill_ms": self.prefill_ms,
            "grid": list(self.grid) if self.grid else None,
            "samples": [{"kept": [k.tolist() for k in s.kept], "tokens_before": s.tokens_before,
                         "tokens_after": s.tokens_after} for s in self.samples],
            "layer_tokens": [{"where": w, "tokens": t} for w, t in self.layer_tokens],
        }


def _prefill_hook(module, args, output, slot: ContextSlot) -> None:
    ctx = slot.ctx
    if ctx is not None and ctx.prefill_end is None:
        if isinstance(output, torch.Tensor):
            ref = output
        else:
            ref = output[0] if isinstance(output, tuple) else getattr(output, "last_hidden_state", None)
        if isinstance(ref, torch.Tensor) and ref.is_cuda:
            torch.cuda.synchronize(ref.device)
        ctx.prefill_end = time.perf_counter()


def build_methods(method: str | Method | list, config: dict) -> list[Method]:
    """Instantiate the method(s) of a wrap call.

    `method` is a registered name (with `config` as its keyword arguments), a `Method` instance, or a list of
    `(name, config_dict)` pairs / instances to stack (at most one pruning method; modifiers such as `registers`
    first).
    """
    from vlm_tools._registry import get_method

    if isinstance(method, (list, tuple)):
        if config:
            raise TypeError("pass per-method configs inside the list when stacking methods")
        items = method
    elif isinstance(method, Method):
        if config:
            raise TypeError("a Method instance carries its own config; pass no keyword arguments")
        items = [method]
    else:
        items = [(method, config)]
    out: list[Method] = []
    for item in items:
        if isinstance(item, Method):
            out.append(item)
            continue
        if isinstance(item, str):
            item = (item, {})
        name, cfg = item
        if not isinstance(name, str):
            raise TypeError(f"method must be a registered name or a Method, got {type(name).__name__}")
        info = get_method(name)
        if info.kind not in ("vision", "projector", "llm", "modifier"):
            raise TypeError(f"{name!r} is a {info.kind} method; only pruning methods and modifiers wrap a model")
        out.append(info.cls(info.config_cls.from_dict(cfg, method=name)))
    if not out:
        raise ValueError("no method given")
    names = [m.name for m in out]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"method(s) {twice} given more than once; stack each method at most once")
    appending = [m.name for m in out if getattr(m, "appends_tokens", False)]
    if len(appending) > 1:
        raise ValueError(f"{appending} each append tokens to the vision tower's sequence; stack at most one of them")
    acting = [m for m in out if m.kind != "modifier"]
    if len(acting) > 1:
        raise ValueError(f"at most one pruning method per wrap, got {[m.name for m in acting]}; "
                         "stack a pruning method only with modifiers such as 'registers'")
    return out


class WrappedModel:
    """A base model plus one method (or a modifier stack), with the prepare step for `forward` and `generate`.

    Use `vlm_tools.wrap(model, "cls_topk", keep=64)`; `unwrap()` removes every hook and returns the same model.
    """

    def __init__(self, model: nn.Module, methods: list[Method]) -> None:
        self.adapter: ModelAdapter = get_adapter(model)  # first: anything but a supported model raises here
        _drop_stale_hooks(model)
        self.model = model
        self.methods = methods
        for m in methods:
            m.check(self.adapter)
        self._slot = ContextSlot(owner=model)
        self._local = threading.local()  # per thread: last_trace, disabled()
        self._handle = HookHandle("wrap")
        before = marked_ids(model)
        try:
            for m in methods:
                self._handle.add(m.attach(model, self.adapter, self._slot))
            self._handle.forward_hook(self.adapter.language_model, functools.partial(_prefill_hook, slot=self._slot))
        except BaseException:
            self._handle.remove()
            remove_marked_since(model, before)  # hooks of a method whose attach failed before returning its handle
            raise
        # a wrapper that is dropped without unwrap() (e.g. `wrap(model, ...)(**inputs)` in one line) removes its hooks
        weakref.finalize(self, self._handle.remove)

    # -- public API ------------------------------------------------------------------------------------------
    @property
    def method(self) -> Method:
        """The acting method (the last non-modifier), or the last modifier when only modifiers are stacked."""
        acting = [m for m in self.methods if m.kind != "modifier"]
        return (acting or self.methods)[-1]

    @property
    def selector(self) -> Method | None:
        """The method that selects the visual tokens before the LLM, if any."""
        return next((m for m in self.methods if m.selects), None)

    @property
    def context(self) -> CallContext | None:
        """The per-call context of the call in progress (None between calls): for analysis tools whose hooks run
        inside a wrapped call and need the typed fields (e.g. `lm_keep`, the LLM-side kept layout)."""
        return self._slot.ctx

    @property
    def is_wrapped(self) -> bool:
        return not self._handle.removed

    @property
    def last_trace(self) -> Trace | None:
        """The trace of this thread's last wrapped call (None before the first)."""
        return getattr(self._local, "trace", None)

    @last_trace.setter
    def last_trace(self, trace: Trace | None) -> None:
        self._local.trace = trace

    @property
    def _enabled(self) -> bool:
        return getattr(self._local, "enabled", True)

    @_enabled.setter
    def _enabled(self, value: bool) -> None:
        self._local.enabled = value

    def unwrap(self) -> nn.Module:
        """Remove every hook this wrapper attached and return the base model (the same object)."""
        self._handle.remove()
        return self.model

    @contextmanager
    def disabled(self) -> Iterator[nn.Module]:
        """Within this block, calls (of this thread) go to the base model unchanged (hooks stay attached, inactive)."""
        prev = self._enabled
        self._enabled = False
        try:
            yield self.model
        finally:
            self._enabled = prev

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def __repr__(self) -> str:
        state = "attached" if self.is_wrapped else "unwrapped"
        methods = " + ".join(repr(m) for m in self.methods)
        return f"WrappedModel({type(self.model).__name__}, {methods}, {state})"

    def __reduce__(self):
        # pickling / deepcopy: the base model (with copies of the hooks, stale once copied) and the methods; loading
        # drops the stale hooks and wraps the copy afresh
        if not self.is_wrapped:
            raise TypeError("an unwrapped WrappedModel cannot be pickled; pickle its base model")
        return _rewrap, (self.model, [_method_spec(m) for m in self.methods])

    def __getattr__(self, name: str):
        # only called for names the wrapper does not have: the base model's own (see the module docstring)
        model = self.__dict__.get("model")
        if model is None or (name.startswith("__") and name.endswith("__")):
            raise AttributeError(name)
        attr = getattr(model, name)
        if name in _CHAINABLE:
            return functools.partial(_chain, self, attr)
        return attr

    def forward(self, input_ids: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                image_sizes: torch.Tensor | None = None, forced_tokens: list[int] | torch.Tensor | None = None,
                **kwargs):
        """Forward with pruning. Logits cover the shrunk sequence (see `last_trace` for the kept tokens).

        Args:
            forced_tokens: per sample, how many trailing tokens are a teacher-forced continuation of the prompt (an
                answer). Methods that decide inside the LLM (FastV, FlowCut's LLaVA-NeXT stage) then rank with the
                last prompt token before them, so the pass computes exactly what generating that answer computed.
                Vision-side methods do not depend on it.
        """
        if forced_tokens is not None:
            kwargs["_forced_tokens"] = forced_tokens
        return self._run("forward", input_ids, pixel_values, attention_mask, labels, image_sizes, kwargs)

    def generate(self, input_ids: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, image_sizes: torch.Tensor | None = None, **kwargs):
        """Generate with pruning. Returned sequences start with the caller's original (unshrunk) `input_ids`,
        so `out[:, input_ids.shape[1]:]` are the new tokens, exactly as with the base model."""
        return self._run("generate", input_ids, pixel_values, attention_mask, None, image_sizes, kwargs)

    # -- the prepare step ------------------------------------------------------------------------------------
    def _run(self, mode, input_ids, pixel_values, attention_mask, labels, image_sizes, kwargs):
        if self._handle.removed:
            raise RuntimeError("this WrappedModel was unwrapped; wrap the model again")
        forced = kwargs.pop("_forced_tokens", None)
        if not self._enabled:
            call = self.model.generate if mode == "generate" else self.model
            extra = {"labels": labels} if labels is not None else {}
            if image_sizes is not None:
                extra["image_sizes"] = image_sizes
            return call(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask, **extra,
                        **kwargs)
        if input_ids is None:
            raise ValueError("WrappedModel needs input_ids (the processor's output), not inputs_embeds")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        ctx = CallContext(forced_tokens=_forced(forced, attention_mask))
        self._slot.ctx = ctx
        try:
            t0 = time.perf_counter()
            model_inputs, spans_info = self._prepare(ctx, mode, input_ids, pixel_values, attention_mask, labels,
                                                     image_sizes)
            if mode == "forward":
                out = self.model(**model_inputs, **kwargs)
            else:
                out = self.model.generate(**model_inputs, **kwargs)
                out = self._restore_prompt(out, input_ids, model_inputs["input_ids"].shape[1])
            end = ctx.prefill_end if ctx.prefill_end is not None else time.perf_counter()
            self.last_trace = self._trace(ctx, spans_info, (end - t0) * 1000.0)
            return out
        finally:
            self._slot.ctx = None

    def _prepare(self, ctx: CallContext, mode: str, input_ids, pixel_values, attention_mask, labels, image_sizes):
        ad = self.adapter
        has_placeholders = bool((input_ids == ad.image_token_id).any())
        # generation continues every row at its end: a right-padded batch is re-padded on the left for the LLM (the
        # returned sequences still start with the caller's own input_ids)
        side = "left" if mode == "generate" else padding_side(attention_mask)
        if pixel_values is None:
            if has_placeholders:
                raise ValueError("the prompt has image placeholder tokens but pixel_values is missing")
            ctx.lm_spans = [[] for _ in range(input_ids.shape[0])]
            if side != padding_side(attention_mask):
                input_ids, attention_mask, labels, _ = shrink_placeholders(
                    input_ids, attention_mask, labels, ctx.lm_spans, [], self._pad_id(input_ids, attention_mask),
                    side)
            ctx.lm_input_ids, ctx.lm_attention_mask = input_ids, attention_mask
            inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
            if labels is not None:
                inputs["labels"] = labels
            return inputs, ([], [[] for _ in range(input_ids.shape[0])], [])
        tower = ad.vision_tower
        param = next(tower.parameters())
        pixel_values = pixel_values.to(param.device, param.dtype)
        sel = self.selector
        keep, ratio = (sel.budget if sel is not None else None) or (None, None)
        rows, plan = ad.plan(pixel_values, image_sizes, [], keep, ratio, prune=sel is not None)
        before = ad.tokens_per_image(plan)
        image_sample, spans = assign_images(input_ids, attention_mask, ad.image_token_id, before)
        plan.image_sample = image_sample
        ctx.plan = plan
        ctx.pixel_rows = rows

        out = tower(rows, output_hidden_states=True, return_dict=True)
        hs = out.hidden_states[ad.feature_layer]
        n_pre = plan.n_prefix
        patches = hs[:, n_pre:]
        prefix = hs[:, :n_pre] if ad.keeps_cls else None
        kept = sel.select(patches, ctx, ad) if sel is not None else all_rows(ctx)
        ctx.kept = kept
        idx = current_index(ctx, patches.device)
        gathered = []
        for r, k in enumerate(kept):
            pos = torch.searchsorted(idx[r].contiguous(), k)
            gathered.append(patches[r, pos])
        counts = [g.shape[0] for g in gathered]
        proj = ad.projector
        if prefix is not None:
            gathered = [torch.cat([prefix[r], g], 0) for r, g in enumerate(gathered)]
        if len(set(counts)) == 1:
            projected = list(proj(torch.stack(gathered)))
        else:
            flat = proj(torch.cat(gathered)[None])[0]
            projected = list(torch.split(flat, [g.shape[0] for g in gathered]))
        ctx.record_tokens("projector", counts)
        feats = ad.pack(projected, kept, plan)
        after = [f.shape[0] for f in feats]

        pad_id = self._pad_id(input_ids, attention_mask)
        new_ids, new_mask, new_labels, new_spans = shrink_placeholders(input_ids, attention_mask, labels, spans,
                                                                       after, pad_id, side)
        ctx.lm_spans = new_spans
        ctx.lm_input_ids, ctx.lm_attention_mask = new_ids, new_mask
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        inputs = {"input_ids": new_ids, "attention_mask": new_mask,
                  "mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=feats)}}
        if new_labels is not None:
            inputs["labels"] = new_labels
        return inputs, (before, spans, after)

    def _pad_id(self, input_ids, attention_mask) -> int:
        pads = input_ids[attention_mask == 0]
        if pads.numel():
            return int(pads[0])
        for src in (self.model.generation_config, self.model.config.get_text_config()):
            pid = getattr(src, "pad_token_id", None)
            if pid is not None:
                return int(pid)
        return 0

    @staticmethod
    def _restore_prompt(out, input_ids, shrunk_len):
        seqs = out if isinstance(out, torch.Tensor) else out.sequences
        prompt = input_ids.to(seqs.device)
        if seqs.shape[0] != prompt.shape[0]:  # num_return_sequences: each sample's rows are adjacent
            prompt = prompt.repeat_interleave(seqs.shape[0] // prompt.shape[0], dim=0)
        restored = torch.cat([prompt, seqs[:, shrunk_len:]], dim=1)
        if isinstance(out, torch.Tensor):
            return restored
        out.sequences = restored
        return out

    def _trace(self, ctx: CallContext, spans_info, prefill_ms: float) -> Trace:
        before, spans, after = spans_info
        n_samples = len(spans)
        samples = []
        plan = ctx.plan
        layouts = self._layouts(ctx)
        for s in range(n_samples):
            imgs = [img for _, _, img in spans[s]]
            kept_imgs = []
            for img in imgs:
                if ctx.llm_kept is not None and (s, img) in ctx.llm_kept:
                    kept_imgs.append(ctx.llm_kept[(s, img)])
                    continue
                rws = plan.image_rows[img]
                kept_imgs.append(torch.cat([ctx.kept[r].cpu() + j * plan.n_patches for j, r in enumerate(rws)]))
            tb = sum(before[i] for i in imgs)
            ta = ctx.tokens_after[s] if ctx.tokens_after is not None else sum(after[i] for i in imgs)
            samples.append(SampleTrace(kept=kept_imgs, tokens_before=tb, tokens_after=ta, layout=layouts[s]))
        extra = {}
        if ctx.scores is not None:
            extra["scores"] = ctx.scores.detach().float().cpu()  # per vision row, over current patches
        return Trace(method="+".join(m.name for m in self.methods), samples=samples, prefill_ms=prefill_ms,
                     grid=plan.grid if plan is not None else None, layer_tokens=list(ctx.layer_tokens), extra=extra)


    def _layouts(self, ctx: CallContext) -> list[SequenceLayout]:
        """Per sample, what each position of the returned sequence holds (see `SequenceLayout`)."""
        L = SequenceLayout
        ids = ctx.lm_input_ids.cpu()
        kind = torch.where(ctx.lm_attention_mask.cpu().bool(), L.TEXT, L.PAD)
        patch = torch.full_like(ids, -1)
        image = torch.full_like(ids, -1)
        for s, runs in enumerate(ctx.lm_spans):
            for k, (start, n, img) in enumerate(runs):
                kind[s, start:start + n] = L.VISUAL
                patch[s, start:start + n] = ctx.token_layout(self.adapter, img)
                image[s, start:start + n] = k
        keep = ctx.prompt_keep
        if keep is not None:
            per = keep.index.shape[0] // ids.shape[0]  # generate's num_beams / num_return_sequences rows per sample
            index, valid = keep.index.cpu()[::per], keep.valid.cpu()[::per]
            if keep.full_output:
                seen = torch.zeros_like(kind, dtype=torch.bool)
                for s in range(ids.shape[0]):
                    seen[s, index[s, valid[s]]] = True
                kind = torch.where((kind == L.VISUAL) & ~seen, L.DROPPED, kind)
            else:
                ids, patch, image = (t.gather(1, index) for t in (ids, patch, image))
                kind = torch.where(valid, kind.gather(1, index), L.PAD)
                patch, image = patch.masked_fill(~valid, -1), image.masked_fill(~valid, -1)
        return [L(ids[s], kind[s], patch[s], image[s]) for s in range(ids.shape[0])]


def _forced(forced: list[int] | torch.Tensor | None, attention_mask: torch.Tensor) -> torch.Tensor | None:
    """Validate `forced_tokens` against the batch (one non-negative count per sample, below its real length)."""
    if forced is None:
        return None
    t = torch.as_tensor(forced, dtype=torch.long).flatten()
    real = attention_mask.sum(1).cpu()
    if t.numel() != real.numel() or bool((t < 0).any()) or bool((t >= real).any()):
        raise ValueError(f"forced_tokens must give, per sample, a count in 0..(real length - 1); got {t.tolist()} "
                         f"for real lengths {real.tolist()}")
    return t


def _slot_of(fn) -> ContextSlot | None:
    slot = getattr(fn, "keywords", {}).get("slot")
    return slot if isinstance(slot, ContextSlot) else None


def _drop_stale_hooks(model: nn.Module) -> None:
    """Refuse a model wrapped by a live wrapper; remove vlm_tools hooks that a copy of a wrapped model carried."""
    hooks = marked_hooks(model)
    if not hooks:
        return
    live = [fn for fn in hooks if (slot := _slot_of(fn)) is not None and slot.owned_by(model)]
    if live:
        raise RuntimeError("this model is already wrapped by vlm_tools; call unwrap() on the existing WrappedModel, "
                           "or vlm_tools.unwrap(model) to remove every vlm_tools hook from it")
    n = remove_marked(model)
    warnings.warn(f"removed {n} stale vlm_tools hook(s) that this model carried from the model it was copied from "
                  "(deepcopy / pickle of a wrapped model)", RuntimeWarning, stacklevel=3)


def unwrap_model(model: nn.Module | WrappedModel) -> nn.Module:
    """Remove every vlm_tools hook from `model` (also when its wrapper is gone) and return the base model.

    A `WrappedModel` is unwrapped the normal way (`wrapped.unwrap()`); for a plain model every marked hook is removed,
    whoever attached it. Parameters are never left swapped between calls, so removing the hooks restores the model.
    """
    if isinstance(model, WrappedModel):
        return model.unwrap()
    if not isinstance(model, nn.Module):
        raise TypeError(f"unwrap() takes a model or a WrappedModel, got {type(model).__name__}")
    remove_marked(model)
    return model


def _method_spec(m: Method):
    from vlm_tools._registry import get_method

    try:
        registered = get_method(m.name).cls is type(m)
    except KeyError:
        registered = False
    return (m.name, m.config.to_dict()) if registered else m


def _rewrap(model: nn.Module, specs: list) -> WrappedModel:
    """Unpickling a WrappedModel: the model's copied hooks are stale (their slots own nothing); wrap it afresh."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return WrappedModel(model, build_methods(list(specs), {}))


def _chain(wrapper: WrappedModel, fn, *args, **kwargs) -> WrappedModel:
    """Run a base-model method that returns the module (`.to()`, `.eval()`, ...) and return the wrapper instead."""
    fn(*args, **kwargs)
    return wrapper


def wrap(model: nn.Module, method: str | Method | list = "cls_topk", **config) -> WrappedModel:
    """Wrap a supported HF LLaVA / LLaVA-NeXT model with a registered method.

    Args:
        model: `LlavaForConditionalGeneration` or `LlavaNextForConditionalGeneration` (CLIP or DINOv2 tower).
        method: a registered method name (see `vlm_tools.list_methods()`), a `Method`, or a list of
            `(name, config)` pairs to stack (modifiers such as `registers` plus at most one pruning method).
        **config: the method's config fields, e.g. `keep=64` or `ratio=0.75`.

    Returns:
        A `WrappedModel`; its `forward`/`generate` prune, `unwrap()` restores the model exactly.
    """
    if isinstance(model, WrappedModel):
        raise RuntimeError("this model is already wrapped; call unwrap() first or wrap the base model")
    methods = build_methods(method, config)
    return WrappedModel(model, methods)


@contextmanager
def attached(model: nn.Module, method: str | Method | list = "cls_topk", **config) -> Iterator[WrappedModel]:
    """Temporary form of `wrap`: the wrapper is removed when the block exits, also on an exception."""
    wrapped = wrap(model, method, **config)
    try:
        yield wrapped
    finally:
        wrapped.unwrap()
