"""`vlm_tools.explain(...)`: the one call that explains a VLM's answer with any registered attribution method.

The call checks everything it can before any pass runs (the model family, the method, its config, the images, the
prompts and the requested tokens), generates each answer once (greedy, through the possibly pruned model) unless
given, builds one `ExplainContext` for the batch, lets the method attribute it (its passes are batched and teacher
force the same answer token ids) and assembles one `Explanation` per sample: the answer and its tokens, the maps on
the image's frame, which cells pruning removed, the text relevances, the scores and the metadata (model, method,
config, library versions, kept tokens, time). A plain model is wrapped with the unpruned `none` method for the call
only; a `WrappedModel` (pruned) is used as it is, so its maps cover the kept tokens and its pruned cells are marked.
No hook stays on the model after the call, also when it raises.
"""

from __future__ import annotations

import numbers
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from vlm_tools.core.wrapped import WrappedModel
from vlm_tools.interpret.base import Attribution, ExplainContext, ExplainSample
from vlm_tools.interpret.explanation import Explanation
from vlm_tools.interpret.frame import ImageFrame

__all__ = ["explain"]

TokenSpec = int | str


def explain(model: nn.Module | WrappedModel, processor: Any, images: Any, prompts: str | Sequence[str],
            method: str = "msea", *, tokens: Any = None, answers: Any = None, max_new_tokens: int = 32,
            **config: Any) -> Explanation | list[Explanation]:
    """Explain the model's answer to each image + prompt with a registered attribution method.

    Args:
        model: an HF LLaVA / LLaVA-NeXT model (CLIP or DINOv2 tower), or a `WrappedModel` (pruned: the maps cover
            the kept tokens only and `Explanation.pruned` marks the cells the model never saw).
        processor: the model's processor.
        images: one image (PIL image or path) or a list, one per prompt.
        prompts: one prompt or a list. A prompt holds exactly one image placeholder (`<image>`); a plain question
            is put in the processor's chat template (`vlm_tools.loading.format_prompt`).
        method: a registered attribution method (`vlm_tools.list_methods("explain")`).
        tokens: which answer tokens to explain (default: all): answer indices (negative ones count from the end)
            and/or strings (the first run of answer sub-tokens whose decoded text equals the string, e.g. a word
            split into several tokens). For a batch, one spec for every sample or a list of one spec per sample.
        answers: the answers to explain instead of generating them: per sample a string (tokenised without
            special tokens) or token ids.
        max_new_tokens: generation length limit when the answers are generated.
        **config: the method's config fields (e.g. `scales=(1.0, 2.0)` for msea).

    Returns:
        One `Explanation` for a single image + prompt, else a list (one per sample, the passes batched).

    Raises:
        TypeError: an unsupported model (names the supported families) or inputs of the wrong type.
        KeyError: an unknown method (lists the registered attribution methods).
        ValueError: an unreadable image (names it), images and prompts of different lengths, a prompt without
            exactly one image placeholder, a token not in the answer (lists the answer's tokens), an empty answer,
            an unknown config field (lists the valid ones) or a bad config value.
    """
    from vlm_tools._registry import get_explainer
    from vlm_tools.core.adapters import get_adapter
    from vlm_tools.interpret.forcing import as_wrapped, generate_answers, load_images

    start = time.perf_counter()
    base = model.model if isinstance(model, WrappedModel) else model
    get_adapter(base)  # an unsupported model raises here, naming the supported families
    info = get_explainer(method)
    cfg = info.config_cls.from_dict(dict(config), method=method)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    single = isinstance(prompts, str) and not isinstance(images, (list, tuple))
    prompt_list = _prompt_list(prompts)
    image_list = load_images(images)
    if len(image_list) != len(prompt_list):
        raise ValueError(f"got {len(image_list)} images and {len(prompt_list)} prompts; explain takes one image per "
                         "prompt")
    prompt_list = [_one_image_prompt(processor, p, s) for s, p in enumerate(prompt_list)]
    n = len(prompt_list)
    token_specs = _token_specs(tokens, n)
    given = _answer_list(processor, answers, n)

    with as_wrapped(model) as wrapped:
        answer_ids = given if given is not None else generate_answers(wrapped, processor, image_list, prompt_list,
                                                                      max_new_tokens=max_new_tokens)
        tok = processor.tokenizer
        samples = []
        for s, ids in enumerate(answer_ids):
            if ids.numel() == 0:
                raise ValueError(f"sample {s}: the answer is empty (the model stopped at once); pass answers= to "
                                 "explain a given answer")
            targets = _resolve_targets(tok, ids, token_specs[s], s)
            samples.append(ExplainSample(image=image_list[s], prompt=prompt_list[s], answer_ids=ids,
                                         targets=torch.tensor(targets, dtype=torch.long)))
        ctx = ExplainContext(wrapped, processor, samples)
        attributions = info.cls(cfg).attribute(ctx)
        if not isinstance(attributions, (list, tuple)) or len(attributions) != n:
            got = len(attributions) if isinstance(attributions, (list, tuple)) else type(attributions).__name__
            raise RuntimeError(f"explain method {method!r} returned {got} attributions for {n} samples")
        clean = ctx.clean
        frames = ctx.frames(clean)
        pruning = [{"method": m.name, "config": m.config.to_dict() if hasattr(m.config, "to_dict") else None}
                   for m in wrapped.methods]
    elapsed_ms = (time.perf_counter() - start) * 1000.0

    meta_common = _metadata_common(base, method, cfg.to_dict(), pruning, elapsed_ms, n,
                                   generated=given is None)
    out = []
    for s, (sample, att, frame) in enumerate(zip(samples, attributions, frames)):
        trace_s = clean.trace.samples[s]
        meta = {**meta_common, "kept_tokens": [int(k.numel()) for k in trace_s.kept],
                "visual_tokens_before": int(trace_s.tokens_before), "visual_tokens_after": int(trace_s.tokens_after)}
        text_pos = ExplainContext.text_positions(clean.layouts[s])
        text_ids = clean.layouts[s].ids[text_pos].tolist()
        out.append(_assemble(method, cfg.to_dict(), tok, sample, att, frame, text_ids, meta, s))
    return out[0] if single else out


def _prompt_list(prompts: Any) -> list[str]:
    items = [prompts] if isinstance(prompts, str) else prompts
    if not isinstance(items, (list, tuple)):
        raise TypeError(f"prompts must be a string or a list of strings, got {type(prompts).__name__}")
    for s, p in enumerate(items):
        if not isinstance(p, str):
            raise TypeError(f"prompt {s} must be a string, got {type(p).__name__}")
    return list(items)


def _one_image_prompt(processor: Any, prompt: str, s: int) -> str:
    """The prompt with exactly one image placeholder (a plain question goes through the chat template)."""
    from vlm_tools.loading import format_prompt

    placeholder = getattr(processor, "image_token", None) or "<image>"
    text = format_prompt(processor, prompt)
    count = text.count(placeholder)
    if count != 1:
        raise ValueError(f"prompt {s} {prompt!r} holds {count} image placeholders {placeholder!r}; explain takes one "
                         "image per prompt (one placeholder each)")
    return text


def _token_specs(tokens: Any, n: int) -> list[list[TokenSpec] | None]:
    """Per sample, the requested tokens (None: all)."""
    if tokens is None:
        return [None] * n
    if isinstance(tokens, torch.Tensor):
        tokens = tokens.tolist()
    if isinstance(tokens, (str, numbers.Integral)):
        tokens = [tokens]
    if not isinstance(tokens, (list, tuple)):
        raise TypeError(f"tokens must be answer indices and/or strings (or one such list per sample), got "
                        f"{type(tokens).__name__}")
    if tokens and all(t is None or isinstance(t, (list, tuple)) for t in tokens):  # one spec per sample
        if len(tokens) != n:
            raise ValueError(f"tokens holds {len(tokens)} per-sample lists for {n} samples")
        specs = [None if t is None else list(t) for t in tokens]
    else:
        specs = [list(tokens)] * n
    for spec in specs:
        for t in spec or []:
            if isinstance(t, bool) or not isinstance(t, (str, numbers.Integral)):
                raise TypeError(f"a token is an answer index (int) or a string, got {t!r}")
    return specs


def _answer_list(processor: Any, answers: Any, n: int) -> list[torch.Tensor] | None:
    """Per sample, the given answer's token ids (strings tokenised without special tokens), or None."""
    if answers is None:
        return None
    if isinstance(answers, (str, torch.Tensor)) or (isinstance(answers, (list, tuple)) and answers
                                                    and all(isinstance(a, numbers.Integral) for a in answers)):
        answers = [answers]
    if not isinstance(answers, (list, tuple)):
        raise TypeError(f"answers must be strings or token ids (one per sample), got {type(answers).__name__}")
    if len(answers) != n:
        raise ValueError(f"got {len(answers)} answers for {n} samples; give one answer per prompt")
    out = []
    for s, a in enumerate(answers):
        if isinstance(a, str):
            ids = torch.tensor(processor.tokenizer(a, add_special_tokens=False)["input_ids"], dtype=torch.long)
        else:
            try:
                ids = torch.as_tensor(a, dtype=torch.long)
            except (TypeError, ValueError):
                raise TypeError(f"answer {s} must be a string or token ids, got {a!r}") from None
            if ids.dim() != 1:
                raise ValueError(f"answer {s} must be a 1-D sequence of token ids, got shape {tuple(ids.shape)}")
        if ids.numel() == 0:
            raise ValueError(f"answer {s} {a!r} is empty")
        out.append(ids)
    return out


def _decode(tok: Any, ids: Sequence[int]) -> str:
    return tok.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _find_span(tok: Any, ids: list[int], word: str) -> list[int] | None:
    """Indices of the first (shortest) run of answer tokens whose decoded text equals `word` (spaces stripped;
    exact case first, then ignoring case)."""
    target = word.strip()
    if not target:
        return None
    texts = {}
    for fold in (False, True):
        want = target.lower() if fold else target
        for i in range(len(ids)):
            for j in range(i, len(ids)):
                text = texts.get((i, j))
                if text is None:
                    text = texts[(i, j)] = _decode(tok, ids[i:j + 1]).strip()
                cand = text.lower() if fold else text
                if cand == want:
                    return list(range(i, j + 1))
                if len(cand) > len(want):  # longer runs only grow
                    break
    return None


def _resolve_targets(tok: Any, answer_ids: torch.Tensor, spec: list[TokenSpec] | None, s: int) -> list[int]:
    """Sorted unique indices into the answer of the requested tokens."""
    ids = answer_ids.tolist()
    n = len(ids)
    if spec is None:
        return list(range(n))
    if not spec:
        raise ValueError(f"sample {s}: tokens is empty; give answer indices or strings, or None for every token")
    out: set[int] = set()
    for t in spec:
        if isinstance(t, str):
            span = _find_span(tok, ids, t)
            if span is None:
                answer_tokens = [_decode(tok, [a]) for a in ids]
                raise ValueError(f"sample {s}: token {t!r} is not in the answer {_decode(tok, ids)!r}; its tokens: "
                                 f"{answer_tokens}")
            out.update(span)
        else:
            i = int(t) + n if int(t) < 0 else int(t)
            if not 0 <= i < n:
                answer_tokens = [_decode(tok, [a]) for a in ids]
                raise ValueError(f"sample {s}: token index {int(t)} is outside the answer ({n} tokens: "
                                 f"{answer_tokens})")
            out.add(i)
    return sorted(out)


def _metadata_common(base: nn.Module, method: str, config: dict, pruning: list, elapsed_ms: float, n: int,
                     generated: bool) -> dict:
    import transformers

    import vlm_tools

    return {"model": type(base).__name__,
            "model_path": str(getattr(base.config, "_name_or_path", "") or ""),
            "method": method, "config": config, "pruning": pruning,
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "vlm_tools": vlm_tools.__version__},
            "answer_generated": generated, "batch_size": n, "time_ms": elapsed_ms}


def _assemble(method: str, config: dict, tok: Any, sample: ExplainSample, att: Attribution, frame: ImageFrame,
              text_ids: list[int], metadata: dict, s: int) -> Explanation:
    """One sample's `Explanation` from its `Attribution` (shapes checked, naming the method)."""
    if not isinstance(att, Attribution):
        raise RuntimeError(f"explain method {method!r} returned {type(att).__name__} for sample {s}, not an "
                           "Attribution")
    targets = sample.targets.tolist()
    t = len(targets)
    maps = torch.as_tensor(att.maps).detach().float().cpu()
    if maps.dim() != 3 or maps.shape[0] != t:
        raise RuntimeError(f"explain method {method!r}: sample {s} maps must be (tokens={t}, rows, cols), got "
                           f"{tuple(maps.shape)}")
    if att.pruned is not None:
        pruned = torch.as_tensor(att.pruned).detach().bool().cpu()
        if tuple(pruned.shape) != tuple(maps.shape[1:]):
            raise RuntimeError(f"explain method {method!r}: sample {s} pruned cells {tuple(pruned.shape)} do not "
                               f"match its maps {tuple(maps.shape[1:])}")
    elif tuple(maps.shape[1:]) == frame.shape:
        pruned = frame.pruned
    else:
        raise RuntimeError(f"explain method {method!r}: sample {s} maps are {tuple(maps.shape[1:])}, not on the clean "
                           f"pass's frame {frame.shape}, and its Attribution gives no pruned cells")
    if not bool(torch.isfinite(maps).all()):
        raise RuntimeError(f"explain method {method!r}: sample {s} maps are not finite")
    n_text = len(text_ids)
    if att.text is None:
        text = torch.zeros(t, n_text)
    else:
        text = torch.as_tensor(att.text).detach().float().cpu()
        if tuple(text.shape) != (t, n_text):
            raise RuntimeError(f"explain method {method!r}: sample {s} text relevances must be ({t}, {n_text}), got "
                               f"{tuple(text.shape)}")
    scores = {}
    for name, vals in (att.scores or {}).items():
        vals = [float(v) for v in (vals.tolist() if isinstance(vals, torch.Tensor) else vals)]
        if len(vals) != t:
            raise RuntimeError(f"explain method {method!r}: score {name!r} of sample {s} holds {len(vals)} values "
                               f"for {t} tokens")
        scores[name] = vals
    ids = sample.answer_ids.tolist()
    answer_tokens = [_decode(tok, [i]) for i in ids]
    return Explanation(
        method=method, config=config, prompt=sample.prompt,
        answer=tok.decode(ids, skip_special_tokens=True), answer_ids=sample.answer_ids.numpy(),
        answer_tokens=answer_tokens, targets=sample.targets.numpy(), tokens=[answer_tokens[i] for i in targets],
        maps=maps.numpy(), pruned=pruned.numpy(), text_tokens=[_decode(tok, [i]) for i in text_ids],
        text_relevance=text.numpy(), box=tuple(float(v) for v in frame.box),
        image_size=(int(frame.image_size[0]), int(frame.image_size[1])), scores=scores, image=sample.image,
        metadata=metadata)
