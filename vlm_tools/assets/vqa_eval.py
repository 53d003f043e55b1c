"""Short-answer VQA scoring for the default model: batched greedy answers, per-kind accuracy, language-prior baselines.

Used by the training script's final evaluation, the real-weights tests and the demo, so every number is produced
the same way: the prompt of :func:`vlm_tools.assets.default_model.format_prompt`, greedy decoding, and the first
word of the continuation compared (lower-cased, punctuation stripped) with the reference answer.
"""

from __future__ import annotations

import random
import string
from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

SHAPES = ("circle", "rectangle", "triangle")
COLORS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
KINDS = ("shape", "color", "yesno")


def answer_kind(answer: str) -> str:
    """``"shape"``, ``"color"`` or ``"yesno"`` for an easy-vqa answer."""
    answer = answer.strip().lower()
    if answer in SHAPES:
        return "shape"
    if answer in COLORS:
        return "color"
    if answer in ("yes", "no"):
        return "yesno"
    raise ValueError(f"not an easy-vqa answer: {answer!r}")


def normalize_answer(text: str) -> str:
    """The first word of a generated continuation, lower-cased, without surrounding punctuation."""
    words = text.strip().split()
    return words[0].strip(string.punctuation).lower() if words else ""


def answer_questions(
    model: Any,
    processor: Any,
    images: Sequence[Any],
    questions: Sequence[str],
    batch_size: int = 16,
    max_new_tokens: int = 4,
    progress: bool = False,
) -> list[str]:
    """Greedy short answers, one per (image, question) pair.

    Args:
        model: a LLaVA-style model with ``generate`` (or a wrapper exposing it).
        processor: its processor (left padding is set for the call).
        images: PIL images (or anything the processor accepts), one per question.
        questions: question texts.
        batch_size: pairs per ``generate`` call.
        max_new_tokens: tokens to generate; the first word is kept.
        progress: show a tqdm bar.

    Returns:
        normalised answers (see :func:`normalize_answer`).
    """
    import torch

    from vlm_tools.assets.default_model import format_prompt

    if len(images) != len(questions):
        raise ValueError(f"{len(images)} images for {len(questions)} questions")
    tokenizer = processor.tokenizer
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    answers: list[str] = []
    starts = range(0, len(questions), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="answering", unit="batch")
    try:
        for start in starts:
            prompts = [format_prompt(processor, q) for q in questions[start : start + batch_size]]
            batch = processor(
                images=list(images[start : start + batch_size]), text=prompts, return_tensors="pt", padding=True
            ).to(device)
            dtype = next(model.parameters()).dtype
            batch["pixel_values"] = batch["pixel_values"].to(dtype)
            with torch.inference_mode():
                out = model.generate(
                    **batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
                )
            texts = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
            answers.extend(normalize_answer(t) for t in texts)
    finally:
        tokenizer.padding_side = old_side
    return answers


def accuracy_by_kind(predictions: Sequence[str], references: Sequence[str]) -> dict[str, Any]:
    """Overall and per-kind accuracy.

    Returns:
        ``{"overall": acc, "shape": acc, "color": acc, "yesno": acc, "n": {...}}`` (accuracies in [0, 1]).
    """
    hits: dict[str, list[bool]] = defaultdict(list)
    for pred, ref in zip(predictions, references, strict=True):
        ok = pred == ref.strip().lower()
        hits["overall"].append(ok)
        hits[answer_kind(ref)].append(ok)
    out: dict[str, Any] = {k: sum(v) / len(v) for k, v in hits.items()}
    out["n"] = {k: len(v) for k, v in hits.items()}
    return out


def derangement(keys: Sequence[Any], seed: int = 0) -> dict[Any, Any]:
    """A seeded permutation of the distinct ``keys`` with no fixed point (Sattolo's algorithm: one cycle).

    Used to give each question a mismatched image: image ``k`` is replaced by ``mapping[k] != k``.
    """
    distinct = sorted(set(keys))
    if len(distinct) < 2:
        raise ValueError("a derangement needs at least two distinct keys")
    perm = list(distinct)
    rng = random.Random(seed)
    for i in range(len(perm) - 1, 0, -1):
        j = rng.randrange(i)
        perm[i], perm[j] = perm[j], perm[i]
    return dict(zip(distinct, perm, strict=True))


def question_prior(train_questions: Sequence[str], train_answers: Sequence[str]) -> tuple[dict[str, str], str]:
    """The most common training answer per exact question wording, and the overall most common answer (fallback).

    Ties are broken by the answer's first occurrence in the training list, so the result is deterministic.
    """
    counts: dict[str, Counter] = defaultdict(Counter)
    for q, a in zip(train_questions, train_answers, strict=True):
        counts[q][a] += 1
    prior = {q: c.most_common(1)[0][0] for q, c in counts.items()}
    overall = Counter(train_answers).most_common(1)[0][0]
    return prior, overall
