"""Teacher forcing and image positions: the one implementation shared by explanations and grounding diagnostics.

Every multi-pass method explains ONE answer: `generate_answers` produces it once (greedy), `teacher_force` feeds
prompt + answer through the model in one batched forward pass (left padding) under any condition (another image, a
larger input scale, image positions masked out), so every pass scores the same token ids. Passes always run through
a `WrappedModel` (a plain model is wrapped with the unpruned `none` method for the duration of the call, which is
bitwise equal to the base model), so the trace's `SequenceLayout` says what each position of the returned sequence
holds: text, the visual token of which patch of which image, or a visual token pruned away. On a pruned model the
maps therefore cover the kept tokens only.

`teacher_force(..., attention_queries=...)` also returns the fp32 attention rows (head mean, every decoder layer) of
chosen query positions, recomputed with `vlm_tools.core.attention` from pre-hooks (the model keeps SDPA): the one
implementation of attention rows over a forced pass (grounding reliability, attention rollout).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlm_tools.core.attention import (
    attention_rows,
    check_lm_attention,
    layer_inputs,
    rotated_keys,
    rotated_queries,
    visible_keys,
)
from vlm_tools.core.hooks import HookHandle
from vlm_tools.core.method import LmKeep
from vlm_tools.core.wrapped import SequenceLayout, Trace, WrappedModel, wrap

__all__ = ["ForcedPass", "as_wrapped", "load_images", "generate_answers", "forced_inputs", "teacher_force"]


@dataclass
class ForcedPass:
    """One teacher-forced forward pass over a batch of `prompt + answer` sequences.

    Attributes:
        logits: `(B, L, V)` logits over the returned sequence (fp32).
        hidden_states: per layer `(B, L, D)` hidden states (embeddings first; the last entry is the final-norm
            output that `lm_head` reads), or None when not requested.
        layouts: per sample, what each position holds (`SequenceLayout`).
        answer_ids: per sample, the forced answer token ids.
        answer_positions: per sample, the positions of the answer tokens in the returned sequence (the logits at
            `answer_positions - 1` predict them).
        trace: the wrapped call's trace (kept tokens per image, token counts).
        attentions: per sample `(n_layers, Q_s, L)` fp32 softmax attention rows averaged over heads, of the query
            positions asked for with `teacher_force(..., attention_queries=...)` (row `j` is query
            `attention_queries[s][j]`), keys indexed by the positions of the returned sequence; None when not
            requested (see `teacher_force` for pruned models).
    """

    logits: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None
    layouts: list[SequenceLayout]
    answer_ids: list[torch.Tensor]
    answer_positions: list[torch.Tensor]
    trace: Trace
    attentions: list[torch.Tensor] | None = None

    def answer_logprobs(self) -> list[torch.Tensor]:
        """Per sample, `log p(answer_t | prefix)` of each forced answer token (fp32)."""
        out = []
        for s, (ids, pos) in enumerate(zip(self.answer_ids, self.answer_positions)):
            lp = torch.log_softmax(self.logits[s, pos - 1].float(), dim=-1)
            out.append(lp.gather(1, ids.to(lp.device)[:, None])[:, 0])
        return out


@contextmanager
def as_wrapped(model: nn.Module | WrappedModel):
    """`model` itself when it is a `WrappedModel`, else the model wrapped with `none` for the block's duration."""
    if isinstance(model, WrappedModel):
        yield model
        return
    wrapped = wrap(model, "none")
    try:
        yield wrapped
    finally:
        wrapped.unwrap()


def load_images(images: Any) -> list:
    """A list of RGB PIL images from one image or a list of images / paths (a path that cannot be read raises a
    `ValueError` naming it)."""
    from PIL import Image, UnidentifiedImageError

    items = list(images) if isinstance(images, (list, tuple)) else [images]
    out = []
    for item in items:
        if isinstance(item, (str, os.PathLike)):
            path = Path(item)
            try:
                with Image.open(path) as im:
                    item = im.convert("RGB")
            except (OSError, UnidentifiedImageError) as exc:
                raise ValueError(f"cannot read image {path}: {exc}") from None
        elif isinstance(item, Image.Image):
            item = item.convert("RGB")
        else:
            raise TypeError(f"images must be PIL images or paths, got {type(item).__name__}")
        out.append(item)
    return out


def _device_inputs(model: nn.Module, batch: dict) -> dict:
    param = next(model.parameters())
    return {k: (v.to(param.device, param.dtype) if k == "pixel_values" else v.to(param.device))
            for k, v in batch.items() if isinstance(v, torch.Tensor)}


def _eos_ids(model: nn.Module, processor: Any) -> set[int]:
    ids = set()
    for src in (getattr(model, "generation_config", None), getattr(processor, "tokenizer", None)):
        eos = getattr(src, "eos_token_id", None)
        if eos is not None:
            ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
    return {int(i) for i in ids}


@torch.no_grad()
def generate_answers(model: nn.Module | WrappedModel, processor: Any, images: Sequence, prompts: Sequence[str],
                     max_new_tokens: int = 32) -> list[torch.Tensor]:
    """Greedy answers (token ids, end-of-sequence and padding removed) of a batch, generated once.

    Args:
        model: an HF LLaVA / LLaVA-NeXT model or a `WrappedModel` (then the answers are the pruned model's).
        processor: its processor (left padding is used whatever the tokenizer's setting).
        images: one PIL image per prompt.
        prompts: prompts with the image placeholder (see `vlm_tools.loading.format_prompt`).
        max_new_tokens: generation length limit.
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    base = model.model if isinstance(model, WrappedModel) else model
    batch = _device_inputs(base, _processor_batch(processor, images, prompts))
    # an answer may never contain the image placeholder (forcing it would add an image slot)
    out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                         bad_words_ids=[[int(base.config.image_token_id)]])
    seqs = out if isinstance(out, torch.Tensor) else out.sequences
    new = seqs[:, batch["input_ids"].shape[1]:].cpu()
    stop = _eos_ids(base, processor)
    pad = getattr(getattr(processor, "tokenizer", None), "pad_token_id", None)
    answers = []
    for row in new.tolist():
        ids = []
        for t in row:
            if t in stop:
                break
            if pad is not None and t == pad and t not in stop:
                continue
            ids.append(t)
        answers.append(torch.tensor(ids, dtype=torch.long))
    return answers


def _processor_batch(processor: Any, images: Sequence, prompts: Sequence[str]) -> dict:
    tok = processor.tokenizer
    side = tok.padding_side
    tok.padding_side = "left"
    try:
        return dict(processor(images=list(images), text=list(prompts), return_tensors="pt", padding=True))
    finally:
        tok.padding_side = side


def forced_inputs(processor: Any, images: Sequence, prompts: Sequence[str],
                  answers: Sequence[torch.Tensor]) -> dict:
    """Processor inputs of `prompt + answer` per sample, left-padded (pixel values unchanged)."""
    if not (len(images) == len(prompts) == len(answers)):
        raise ValueError(f"got {len(images)} images, {len(prompts)} prompts and {len(answers)} answers; one of each "
                         "per sample")
    image_token = getattr(processor, "image_token_id", None)
    if image_token is None:
        image_token = processor.tokenizer.convert_tokens_to_ids(getattr(processor, "image_token", "<image>"))
    for s, a in enumerate(answers):
        if bool((torch.as_tensor(a) == int(image_token)).any()):
            raise ValueError(f"answer {s} contains the image placeholder token id {int(image_token)}; an answer is "
                             "text only")
    batch = _processor_batch(processor, images, prompts)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    pad = processor.tokenizer.pad_token_id
    pad = int(pad) if pad is not None else 0
    rows = [torch.cat([ids[s][mask[s].bool()], torch.as_tensor(a, dtype=ids.dtype)]) for s, a in enumerate(answers)]
    width = max(r.numel() for r in rows)
    new_ids = torch.full((len(rows), width), pad, dtype=ids.dtype)
    new_mask = torch.zeros((len(rows), width), dtype=mask.dtype)
    for s, r in enumerate(rows):
        new_ids[s, width - r.numel():] = r
        new_mask[s, width - r.numel():] = 1
    batch["input_ids"], batch["attention_mask"] = new_ids, new_mask
    return batch


def _mask_images_hook(module, args, kwargs, wrapper: WrappedModel, positions: Sequence[torch.Tensor] | None):
    """Pre-hook on the language model: zero the 2-D attention mask at the visual positions of the call (all of them,
    or per sample the given `positions`, which must be visual positions)."""
    ctx = wrapper.context
    mask = kwargs.get("attention_mask")
    if ctx is None or not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        return None
    mask = mask.clone()
    for s, runs in enumerate(ctx.lm_spans):
        visual = torch.zeros(mask.shape[1], dtype=torch.bool, device=mask.device)
        for start, n, _ in runs:
            visual[start:start + n] = True
        if positions is None:
            mask[s, visual] = 0
            continue
        pos = torch.as_tensor(positions[s], dtype=torch.long, device=mask.device)
        if pos.numel() and (pos.min() < 0 or pos.max() >= mask.shape[1] or not bool(visual[pos].all())):
            raise ValueError(f"sample {s}: mask_positions must be visual positions of the sequence (0..."
                             f"{mask.shape[1] - 1}, image tokens only)")
        mask[s, pos] = 0
    return args, {**kwargs, "attention_mask": mask}


class _AttentionInputs:
    """What every decoder layer's attention received in one teacher-forced pass (rows are computed afterwards, when
    the LLM-stage kept layout, if any, is known)."""

    def __init__(self, n_layers: int, wrapper: WrappedModel) -> None:
        self.wrapper = wrapper
        self.inputs: list[tuple | None] = [None] * n_layers
        self.keep: LmKeep | None = None


def _attention_inputs_hook(module, args, kwargs, rec: _AttentionInputs, layer: int) -> None:
    """Pre-hook on a decoder layer's attention: keep its (post-LayerNorm) input, rotary embeddings and mask."""
    if rec.wrapper.context is None:
        return None
    if rec.inputs[layer] is not None:
        raise RuntimeError(f"the attention of decoder layer {layer} ran twice in one teacher-forced pass")
    rec.inputs[layer] = layer_inputs(args, kwargs)
    return None


def _kept_layout_hook(module, args, output, rec: _AttentionInputs) -> None:
    """Forward hook on the language model: the call's LLM-stage kept layout (None when nothing was dropped)."""
    ctx = rec.wrapper.context
    if ctx is not None:
        rec.keep = ctx.lm_keep
    return None


def _layer_positions(keep: LmKeep | None, layer: int, sample: int, length: int, n_layer: int) -> torch.Tensor:
    """`(length,)` position in `layer`'s sequence of each position of the returned sequence (-1: not there)."""
    ar = torch.arange(length)
    if keep is None:
        mapped = ar
    else:
        index, valid = keep.index[sample].cpu(), keep.valid[sample].cpu()
        after = layer >= keep.from_layer
        if after and keep.full_output:  # returned = original positions; the layer holds the kept slots
            mapped = torch.full((length,), -1, dtype=torch.long)
            slots = torch.nonzero(valid).flatten()
            mapped[index[slots]] = slots
        elif not after and not keep.full_output:  # returned = kept slots; the layer holds the original positions
            mapped = torch.where(valid, index, torch.full_like(index, -1))
        else:
            mapped = ar
    if mapped.numel() != length or (mapped.numel() and int(mapped.max()) >= n_layer):
        raise RuntimeError(f"decoder layer {layer} ran on {n_layer} positions, which do not map onto the {length} "
                           "positions of the returned sequence")
    return mapped


def _recorded_rows(rec: _AttentionInputs, attns: Sequence[nn.Module], queries: list[torch.Tensor],
                   length: int) -> list[torch.Tensor]:
    """Per sample `(n_layers, Q_s, length)` head-mean fp32 attention rows of the query positions `queries`."""
    b = len(queries)
    q_max = max((q.numel() for q in queries), default=0)
    out = [torch.zeros(len(attns), q.numel(), length) for q in queries]
    if q_max == 0:
        return out
    for i, attn in enumerate(attns):
        if rec.inputs[i] is None:
            raise RuntimeError(f"the attention of decoder layer {i} did not run in the teacher-forced pass")
        hidden, pos_emb, mask = rec.inputs[i]
        n = hidden.shape[1]
        maps = [_layer_positions(rec.keep, i, s, length, n) for s in range(b)]
        rows = torch.full((b, q_max), n - 1, dtype=torch.long)  # padding queries: the last (real) position
        for s, q in enumerate(queries):
            lq = maps[s][q]
            if bool((lq < 0).any()):
                gone = q[lq < 0].tolist()
                raise ValueError(f"sample {s}: attention query position(s) {gone} were dropped before decoder layer "
                                 f"{i} (an LLM-stage pruning method removed them)")
            rows[s, :q.numel()] = lq
        keys = rotated_keys(attn, hidden, pos_emb)
        for j in range(q_max):
            r = rows[:, j].to(hidden.device)
            q = rotated_queries(attn, hidden, pos_emb, r)
            vis = visible_keys(mask, r, n, n)
            probs = attention_rows(q, keys, attn.scaling, vis, attn.num_key_value_groups).mean(1).cpu()  # (B, n)
            for s in range(b):
                if j < queries[s].numel():
                    m = maps[s]
                    out[s][i, j] = torch.where(m >= 0, probs[s, m.clamp(min=0)], torch.zeros(()))
    return out


def _check_queries(attention_queries: Sequence[torch.Tensor], n_samples: int) -> list[torch.Tensor]:
    if isinstance(attention_queries, torch.Tensor) or len(attention_queries) != n_samples:
        raise ValueError(f"attention_queries must give one 1-D tensor of positions per sample ({n_samples}), got "
                         f"{attention_queries!r}")
    out = []
    for s, q in enumerate(attention_queries):
        t = torch.as_tensor(q)
        if t.dim() != 1 or t.dtype.is_floating_point or t.dtype == torch.bool:
            raise ValueError(f"attention_queries[{s}] must be a 1-D integer tensor of positions, got {q!r}")
        out.append(t.long().cpu())
    return out


@torch.no_grad()
def teacher_force(model: nn.Module | WrappedModel, processor: Any, images: Sequence, prompts: Sequence[str],
                  answers: Sequence[torch.Tensor], *, hidden_states: bool = True,
                  mask_images: bool = False, mask_positions: Sequence[torch.Tensor] | None = None,
                  grad: bool = False, attention_queries: Sequence[torch.Tensor] | None = None) -> ForcedPass:
    """One batched forward pass over `prompt + answer`, through the (wrapped) model.

    Args:
        model: an HF LLaVA / LLaVA-NeXT model or a `WrappedModel` (pruned passes).
        processor: its processor.
        images: one PIL image per sample (any resolution the processor and tower accept).
        prompts: prompts with the image placeholder.
        answers: per sample, the answer token ids to force (e.g. from `generate_answers`).
        hidden_states: also return every layer's hidden states.
        mask_images: zero the attention mask over the image positions (position ids are unchanged: the
            forward pass numbers positions from 0 whatever the mask), the "image masked out" condition.
        mask_positions: per sample, visual positions of the returned sequence to mask the same way (e.g. the
            `ImageFrame.cells` of deleted map cells, taken from an earlier pass of the same inputs); exclusive with
            `mask_images`.
        grad: run the forward pass with autograd enabled (gradient methods such as integrated gradients); the
            returned logits then carry the graph.
        attention_queries: per sample, positions of the returned sequence whose attention rows to record (e.g.
            `answer_positions[s] - 1`, the rows that predict the answer tokens). The rows are recomputed in fp32
            with `vlm_tools.core.attention` from forward pre-hooks on every decoder layer's attention (the model
            keeps SDPA / flash) and returned as `ForcedPass.attentions`: per sample `(n_layers, Q_s, L)` softmax
            rows averaged over heads, keys indexed by the positions of the returned sequence. After an LLM-stage
            drop (FastV, FlowCut's LLaVA-NeXT stage) each layer's keys are mapped back through the call's kept
            layout: keys a layer did not see get 0; when the returned sequence holds only the kept slots, the
            layers before the drop also attended to removed positions, whose mass is not in the rows. A query
            position that a layer did not hold raises a `ValueError`.
    """
    if mask_images and mask_positions is not None:
        raise ValueError("pass mask_images=True (every visual position) or mask_positions, not both")
    if mask_positions is not None and len(mask_positions) != len(answers):
        raise ValueError(f"mask_positions holds {len(mask_positions)} entries for {len(answers)} samples")
    queries = None if attention_queries is None else _check_queries(attention_queries, len(prompts))
    inputs = forced_inputs(processor, images, prompts, answers)
    with as_wrapped(model) as wrapped:
        batch = _device_inputs(wrapped.model, inputs)
        attns = [layer.self_attn for layer in wrapped.adapter.lm_layers]
        rec = None
        with HookHandle("teacher_force") as handle:
            if mask_images or mask_positions is not None:
                hook = functools.partial(_mask_images_hook, wrapper=wrapped, positions=mask_positions)
                handle.forward_pre_hook(wrapped.adapter.language_model, hook, with_kwargs=True)
            if queries is not None:
                for attn in attns:
                    check_lm_attention(attn)
                rec = _AttentionInputs(len(attns), wrapped)
                for i, attn in enumerate(attns):
                    handle.forward_pre_hook(attn, functools.partial(_attention_inputs_hook, rec=rec, layer=i),
                                            with_kwargs=True)
                handle.forward_hook(wrapped.adapter.language_model, functools.partial(_kept_layout_hook, rec=rec))
            with torch.enable_grad() if grad else contextlib.nullcontext():
                out = wrapped(**batch, forced_tokens=[len(a) for a in answers], output_hidden_states=hidden_states,
                              return_dict=True)
                logits = out.logits.float()
        trace = wrapped.last_trace
    layouts = [s.layout for s in trace.samples]
    length = out.logits.shape[1]
    positions = [torch.arange(length - len(a), length) for a in answers]
    for s, (lay, pos) in enumerate(zip(layouts, positions)):
        if pos.numel() and not bool((lay.ids[pos] == torch.as_tensor(answers[s], dtype=lay.ids.dtype)).all()):
            raise RuntimeError(f"sample {s}: the forced answer is not at the end of the returned sequence")
    attentions = None
    if queries is not None:
        for s, q in enumerate(queries):
            bad = q[(q < 0) | (q >= length)]
            if bad.numel() or bool((layouts[s].kind[q] == SequenceLayout.PAD).any()):
                raise ValueError(f"attention_queries[{s}] = {q.tolist()} must be real (non-padding) positions of the "
                                 f"returned sequence, 0..{length - 1}")
        attentions = _recorded_rows(rec, attns, queries, length)
    return ForcedPass(logits=logits, hidden_states=tuple(out.hidden_states) if hidden_states else None,
                      layouts=layouts, answer_ids=[torch.as_tensor(a, dtype=torch.long) for a in answers],
                      answer_positions=positions, trace=trace, attentions=attentions)
