"""Teacher forcing and image positions: the one implementation shared by explanations and grounding diagnostics.

Every multi-pass method explains ONE answer: `generate_answers` produces it once (greedy), `teacher_force` feeds
prompt + answer through the model in one batched forward pass (left padding) under any condition (another image, a
larger input scale, image positions masked out), so every pass scores the same token ids. Passes always run through
a `WrappedModel` (a plain model is wrapped with the unpruned `none` method for the duration of the call, which is
bitwise equal to the base model), so the trace's `SequenceLayout` says what each position of the returned sequence
holds: text, the visual token of which patch of which image, or a visual token pruned away. On a pruned model the
maps therefore cover the kept tokens only.
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

from vlm_tools.core.hooks import HookHandle
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
    """

    logits: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None
    layouts: list[SequenceLayout]
    answer_ids: list[torch.Tensor]
    answer_positions: list[torch.Tensor]
    trace: Trace

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


@torch.no_grad()
def teacher_force(model: nn.Module | WrappedModel, processor: Any, images: Sequence, prompts: Sequence[str],
                  answers: Sequence[torch.Tensor], *, hidden_states: bool = True,
                  mask_images: bool = False, mask_positions: Sequence[torch.Tensor] | None = None,
                  grad: bool = False) -> ForcedPass:
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
    """
    if mask_images and mask_positions is not None:
        raise ValueError("pass mask_images=True (every visual position) or mask_positions, not both")
    if mask_positions is not None and len(mask_positions) != len(answers):
        raise ValueError(f"mask_positions holds {len(mask_positions)} entries for {len(answers)} samples")
    inputs = forced_inputs(processor, images, prompts, answers)
    with as_wrapped(model) as wrapped:
        batch = _device_inputs(wrapped.model, inputs)
        with HookHandle("teacher_force") as handle:
            if mask_images or mask_positions is not None:
                hook = functools.partial(_mask_images_hook, wrapper=wrapped, positions=mask_positions)
                handle.forward_pre_hook(wrapped.adapter.language_model, hook, with_kwargs=True)
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
    return ForcedPass(logits=logits, hidden_states=tuple(out.hidden_states) if hidden_states else None,
                      layouts=layouts, answer_ids=[torch.as_tensor(a, dtype=torch.long) for a in answers],
                      answer_positions=positions, trace=trace)
