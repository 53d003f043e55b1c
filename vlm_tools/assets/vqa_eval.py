"""Short-answer VQA scoring for the default model: batched greedy answers, per-kind accuracy, confidence intervals,
language-prior baselines.

Used by the training script's final evaluation, the real-weights tests and the demo, so every number is produced
the same way: the prompt of :func:`vlm_tools.loading.format_prompt` (the default model's chat template), greedy
decoding, and the first word of the continuation compared (lower-cased, punctuation stripped) with the reference
answer. When the possible answers are known and start with distinct tokens (easy-vqa's 13, yes/no), one forward
pass decides the answer: the candidate whose first token is the greedy first token (``candidates=``).
"""

from __future__ import annotations

import math
import random
import string
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
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


def first_token_ids(tokenizer: Any, candidates: Sequence[str]) -> dict[int, str]:
    """``{first token id: answer}`` of each candidate answer as the model writes it after the prompt (``" " + a``).

    Raises:
        ValueError: two candidates start with the same token (one forward pass cannot tell them apart).
    """
    out: dict[int, str] = {}
    for answer in sorted(set(candidates)):
        ids = tokenizer(" " + answer, add_special_tokens=False).input_ids
        if not ids:
            raise ValueError(f"candidate answer {answer!r} tokenises to nothing")
        if ids[0] in out:
            raise ValueError(f"candidate answers {out[ids[0]]!r} and {answer!r} start with the same token {ids[0]}; "
                             "answer them with generate (candidates=None)")
        out[ids[0]] = answer
    return out


def answer_batches(
    model: Any,
    processor: Any,
    images: Sequence[Any],
    questions: Sequence[str],
    batch_size: int = 16,
    max_new_tokens: int = 4,
    prompt: Callable[[Any, str], str] | None = None,
    candidates: Sequence[str] | None = None,
) -> Iterator[list[str]]:
    """Greedy short answers, yielded one batch at a time (a wrapped model's ``last_trace`` then holds that batch).

    Args:
        model: a LLaVA-style model with ``generate`` (or a wrapper exposing it).
        processor: its processor (the batch is padded on the left, whatever its tokenizer's setting).
        images: PIL images (or anything the processor accepts), one per question.
        questions: question texts.
        batch_size: pairs per model call.
        max_new_tokens: tokens to generate; the first word is kept (without ``candidates``).
        prompt: ``prompt(processor, question)`` -> model prompt; default :func:`vlm_tools.loading.format_prompt`.
        candidates: the possible answers: one forward pass per batch; a row's answer is the candidate whose first
            token (:func:`first_token_ids`) is the row's greedy next token, else that token's word (then wrong).
            Equal to the first word of greedy generation whenever the model completes the candidate it started.

    Yields:
        normalised answers (see :func:`normalize_answer`) of each batch.
    """
    import torch

    from vlm_tools.loading import format_prompt

    if len(images) != len(questions):
        raise ValueError(f"{len(images)} images for {len(questions)} questions")
    prompt = prompt or format_prompt
    tokenizer = processor.tokenizer
    first = first_token_ids(tokenizer, candidates) if candidates is not None else None
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    for start in range(0, len(questions), batch_size):
        prompts = [prompt(processor, q) for q in questions[start : start + batch_size]]
        old_side, tokenizer.padding_side = tokenizer.padding_side, "left"
        try:
            batch = processor(
                images=list(images[start : start + batch_size]), text=prompts, return_tensors="pt", padding=True
            ).to(device)
        finally:
            tokenizer.padding_side = old_side
        batch["pixel_values"] = batch["pixel_values"].to(dtype)
        with torch.inference_mode():
            if first is not None:
                next_ids = model(**batch, logits_to_keep=1).logits[:, -1].argmax(-1).tolist()
                answers = [first.get(t) or normalize_answer(tokenizer.decode([t])) for t in next_ids]
            else:
                out = model.generate(
                    **batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
                )
                texts = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
                answers = [normalize_answer(t) for t in texts]
        yield answers  # no state of this function (grad mode, padding side) is held while the caller runs


def answer_questions(
    model: Any,
    processor: Any,
    images: Sequence[Any],
    questions: Sequence[str],
    batch_size: int = 16,
    max_new_tokens: int = 4,
    progress: bool = False,
    prompt: Callable[[Any, str], str] | None = None,
    candidates: Sequence[str] | None = None,
) -> list[str]:
    """Greedy short answers, one per (image, question) pair (:func:`answer_batches`, flattened).

    Args:
        progress: show a tqdm bar (other arguments: see :func:`answer_batches`).

    Returns:
        normalised answers (see :func:`normalize_answer`).
    """
    batches = answer_batches(model, processor, images, questions, batch_size, max_new_tokens, prompt, candidates)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, total=math.ceil(len(questions) / batch_size), desc="answering", unit="batch")
    return [a for batch in batches for a in batch]


def wilson_interval(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (95 % for the default ``z``).

    Args:
        successes: correct answers.
        n: questions (> 0).
        z: the normal quantile of the confidence level.

    Returns:
        ``(low, high)`` in [0, 1].

    Raises:
        ValueError: ``n <= 0`` or ``successes`` outside ``[0, n]``.
    """
    if n <= 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n and n > 0, got successes={successes}, n={n}")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


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
