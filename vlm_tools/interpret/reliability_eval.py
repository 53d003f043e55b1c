"""Does the reliability score catch wrong and guessed answers? (`vlm-tools reliability-eval`)

Sets where the truth is known, on the default model:

* `shapes_vqa` (easy-vqa labels give the truth for every image) at several pruning budgets (the unpruned model and
  `cls_topk` keeping 16 / 8 / 4 visual tokens): wrong answers are the positives;
* `photos_yesno` (unpruned): wrong answers are the positives;
* the `shapes_vqa` questions asked about a blank image and about a noise image: every answer is a guess (positive).

Every answer is the model's own greedy answer, scored by `reliability` (mismatched image: another image of the set,
through a seeded derangement; photos are resized to the clean photo's size). Detectors of the positives (higher =
more likely wrong): `1 - confidence` (mean p of the answer tokens), the mean token entropy, the perplexity, and
`1 - sentence score` of the generic unsupervised default, of the unsupervised combiner with reference statistics,
of the fitted combiner and of META. Reference statistics and fitted weights come from the other half of a 2-fold
split by image (each item is scored by a combiner that never saw its image), then AUROC and AP are pooled.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from vlm_tools.interpret.reliability import Combiner, Reliability, reliability

__all__ = ["DETECTORS", "EvalItem", "detection_table", "render_markdown", "run_eval"]

#: Detector names, in table order.
DETECTORS = ("confidence", "entropy", "perplexity", "unsupervised (generic)", "unsupervised (reference)", "fitted",
             "META")


@dataclass
class EvalItem:
    """One answered question: where it comes from, whether it is a positive, and its reliability result."""

    dataset: str  # "shapes_vqa", "photos_yesno", "blank", "noise"
    budget: str  # "none" or "keep=K"
    image_key: str
    question: str
    truth: str
    answer: str
    correct: bool
    positive: bool  # wrong answer, or any answer to a blank / noise image
    result: Reliability


def _fold(key: str) -> int:
    return int(hashlib.sha256(key.encode()).hexdigest(), 16) % 2


def _subset(items: list[dict], n: int) -> list[dict]:
    """Up to `n` items, balanced over the question kinds (first ids of each kind)."""
    kinds = sorted({x["kind"] for x in items})
    per = math.ceil(n / len(kinds))
    out = [x for k in kinds for x in [y for y in items if y["kind"] == k][:per]]
    return sorted(out, key=lambda x: x["id"])[:n]


def _round_robin(items: list[dict], n: int) -> list[dict]:
    """Up to `n` items taking one question per photo in turn (so a small subset covers many photos)."""
    groups: dict[str, list[dict]] = {}
    for x in items:
        groups.setdefault(x["image_key"], []).append(x)
    out: list[dict] = []
    while len(out) < min(n, len(items)):
        for g in groups.values():
            if g and len(out) < n:
                out.append(g.pop(0))
    return out


def _answer_items(model, processor, rows, images, mismatched, dataset, budget, batch_size, max_new_tokens,
                  guesses=False) -> list[EvalItem]:
    from vlm_tools.assets.vqa_eval import normalize_answer
    from vlm_tools.loading import format_prompt

    out = []
    for start in range(0, len(rows), batch_size):
        sl = slice(start, start + batch_size)
        prompts = [format_prompt(processor, r["question"]) for r in rows[sl]]
        results = reliability(model, processor, images[sl], prompts, mismatched=mismatched[sl],
                              max_new_tokens=max_new_tokens)
        for r, res, im_key in zip(rows[sl], results, [r["image_key"] for r in rows[sl]]):
            ans = normalize_answer(res.answer)
            correct = ans == str(r["answer"]).strip().lower()
            out.append(EvalItem(dataset=dataset, budget=budget, image_key=im_key, question=r["question"],
                                truth=str(r["answer"]), answer=ans, correct=correct,
                                positive=True if guesses else not correct, result=res))
    return out


def run_eval(model, processor, *, n_shapes: int = 48, n_photos: int = 42, n_guess: int = 24,
             budgets: tuple[int | None, ...] = (None, 16, 8, 4), batch_size: int = 8, max_new_tokens: int = 4,
             seed: int = 0, log=print) -> dict[str, Any]:
    """Answer and score every set, then compare the detectors (see the module docstring).

    Args:
        model: the base model (the default model; pruned budgets wrap it with `cls_topk`).
        processor: its processor.
        n_shapes: `shapes_vqa` quick-set questions (balanced over shape / colour / yes-no), asked at every budget.
        n_photos: `photos_yesno` questions (at most 42).
        n_guess: `shapes_vqa` questions asked about a blank and about a noise image.
        budgets: visual tokens kept (None: unpruned).
        batch_size: samples per reliability call.
        max_new_tokens: answer length limit (one-word answers).
        seed: derangement / noise seed.
        log: progress printer.

    Returns:
        `{"items": [EvalItem, ...], "timing": {...}, "sizes": {...}}`.
    """
    from PIL import Image

    import vlm_tools
    from vlm_tools.assets.data import load_shapes_vqa, photos_yesno
    from vlm_tools.assets.vqa_eval import derangement

    shapes = _subset(load_shapes_vqa("quick"), n_shapes)
    for r in shapes:
        r["image_key"] = f"shapes:{r['image_id']}"
    pool = {f"shapes:{r['image_id']}": Image.open(r["image"]).convert("RGB")
            for r in load_shapes_vqa("quick")[:200]}
    pool.update({r["image_key"]: Image.open(r["image"]).convert("RGB") for r in shapes})
    perm = derangement(list(pool), seed=seed)
    s_imgs = [pool[r["image_key"]] for r in shapes]
    s_mis = [pool[perm[r["image_key"]]] for r in shapes]
    items: list[EvalItem] = []
    t0 = time.perf_counter()
    for k in budgets:
        label = "none" if k is None else f"keep={k}"
        target = model if k is None else vlm_tools.wrap(model, "cls_topk", keep=k)
        try:
            items += _answer_items(target, processor, shapes, s_imgs, s_mis, "shapes_vqa", label, batch_size,
                                   max_new_tokens)
        finally:
            if target is not model:
                target.unwrap()
        log(f"shapes_vqa {label}: {len(shapes)} questions, {time.perf_counter() - t0:.0f} s")
    all_photos = photos_yesno()
    for r in all_photos:
        r["image_key"] = f"photo:{r['photo']}"
    photos = _round_robin(all_photos, n_photos)
    if photos:
        p_pool = {r["image_key"]: Image.open(r["image"]).convert("RGB") for r in all_photos}
        p_perm = derangement(list(p_pool), seed=seed)
        p_imgs = [p_pool[r["image_key"]] for r in photos]
        p_mis = [p_pool[p_perm[r["image_key"]]].resize(im.size) for r, im in zip(photos, p_imgs)]
        items += _answer_items(model, processor, photos, p_imgs, p_mis, "photos_yesno", "none", batch_size,
                               max_new_tokens)
        log(f"photos_yesno: {len(photos)} questions, {time.perf_counter() - t0:.0f} s")
    guess_rows = _subset(load_shapes_vqa("quick"), n_guess)
    rng = np.random.default_rng(seed)
    size = s_imgs[0].size if s_imgs else (64, 64)
    for kind in ("blank", "noise"):
        rows = [dict(r, image_key=f"{kind}:{i}") for i, r in enumerate(guess_rows)]
        if kind == "blank":
            imgs = [Image.new("RGB", size, (255, 255, 255)) for _ in rows]
        else:
            imgs = [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in rows]
        mis = [pool[perm[f"shapes:{r['image_id']}"]] if f"shapes:{r['image_id']}" in perm else s_mis[0]
               for r in rows]
        items += _answer_items(model, processor, rows, imgs, mis, kind, "none", batch_size, max_new_tokens,
                               guesses=True)
        log(f"{kind} images: {len(rows)} questions, {time.perf_counter() - t0:.0f} s")
    timing = _timing(model, processor, s_imgs[0], shapes[0]["question"], s_mis[0], max_new_tokens)
    return {"items": items, "timing": timing, "seconds": time.perf_counter() - t0,
            "sizes": {"shapes_vqa": len(shapes), "budgets": ["none" if k is None else k for k in budgets],
                      "photos_yesno": len(photos), "guess": len(guess_rows)}}


def _timing(model, processor, image, question, mismatched, max_new_tokens, repeats: int = 3) -> dict[str, float]:
    """Median seconds of one generate, one reliability call with the answer given (three forced passes) and one
    that also generates it, on one sample."""
    import torch

    from vlm_tools.interpret.forcing import generate_answers
    from vlm_tools.loading import format_prompt

    prompt = format_prompt(processor, question)
    answer = processor.tokenizer.decode(generate_answers(model, processor, [image], [prompt],
                                                         max_new_tokens=max_new_tokens)[0])

    def median(fn):
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            with torch.no_grad():
                fn()
            times.append(time.perf_counter() - t)
        return float(np.median(times))

    gen = median(lambda: generate_answers(model, processor, [image], [prompt], max_new_tokens=max_new_tokens))
    forced = median(lambda: reliability(model, processor, image, prompt, answer, mismatched=mismatched))
    full = median(lambda: reliability(model, processor, image, prompt, mismatched=mismatched,
                                      max_new_tokens=max_new_tokens))
    return {"generate_s": gen, "reliability_given_answer_s": forced, "reliability_with_generation_s": full,
            "answer_tokens": len(processor.tokenizer(answer, add_special_tokens=False)["input_ids"])}


def _auc_ap(y: np.ndarray, score: np.ndarray) -> tuple[float, float]:
    from sklearn.metrics import average_precision_score, roc_auc_score

    if len(set(y.tolist())) < 2:
        return float("nan"), float("nan")
    return float(roc_auc_score(y, score)), float(average_precision_score(y, score))


def _cross_fitted(items: list[EvalItem]) -> dict[str, np.ndarray]:
    """Per item, `1 - sentence score` under combiners fitted on the other fold (by image)."""
    folds = np.asarray([_fold(it.image_key) for it in items])
    out = {name: np.full(len(items), np.nan) for name in ("unsupervised (reference)", "fitted", "META")}
    for f in (0, 1):
        train = [it for it, g in zip(items, folds) if g != f]
        test = [i for i, g in enumerate(folds) if g == f]
        if not train or not test:
            continue
        ref = Combiner.from_reference([it.result for it in train])
        labels = [0 if it.positive else 1 for it in train]
        combs = {"unsupervised (reference)": ref}
        if len(set(labels)) == 2:
            combs["fitted"] = Combiner.fit([it.result for it in train], labels, reference=ref)
            combs["META"] = Combiner.fit([it.result for it in train], labels, meta=True, reference=ref)
        for name, comb in combs.items():
            for i in test:
                out[name][i] = 1.0 - items[i].result.rescored(comb).sentence_score
    return out


def detection_table(items: list[EvalItem]) -> list[dict[str, Any]]:
    """AUROC / AP of every detector on each evaluated set (all items, shapes_vqa at all budgets, photos_yesno,
    shapes_vqa unpruned + blank/noise guesses)."""
    crossed = _cross_fitted(items)
    scores = {
        "confidence": np.asarray([1.0 - it.result.confidence for it in items]),
        "entropy": np.asarray([it.result.entropy for it in items]),
        "perplexity": np.asarray([it.result.perplexity for it in items]),
        "unsupervised (generic)": np.asarray([1.0 - it.result.sentence_score for it in items]),
        **crossed,
    }
    sets = {
        "all": [True] * len(items),
        "shapes_vqa (all budgets)": [it.dataset == "shapes_vqa" for it in items],
        "photos_yesno": [it.dataset == "photos_yesno" for it in items],
        "shapes_vqa unpruned + blank/noise": [(it.dataset == "shapes_vqa" and it.budget == "none")
                                              or it.dataset in ("blank", "noise") for it in items],
    }
    rows = []
    y_all = np.asarray([it.positive for it in items], dtype=int)
    for name, sel in sets.items():
        sel = np.asarray(sel, dtype=bool)
        if not sel.any():
            continue
        y = y_all[sel]
        row = {"set": name, "positives": int(y.sum()), "negatives": int((1 - y).sum())}
        for det in DETECTORS:
            s = scores[det][sel]
            ok = ~np.isnan(s)
            row[det] = _auc_ap(y[ok], s[ok]) if ok.any() else (float("nan"), float("nan"))
        rows.append(row)
    return rows


def budget_table(items: list[EvalItem]) -> list[dict[str, Any]]:
    """Per pruning budget on shapes_vqa: accuracy, mean sentence score and mean r_t (generic unsupervised)."""
    out = []
    for b in dict.fromkeys(it.budget for it in items if it.dataset == "shapes_vqa"):
        sel = [it for it in items if it.dataset == "shapes_vqa" and it.budget == b]
        out.append({"budget": b, "n": len(sel), "accuracy": float(np.mean([it.correct for it in sel])),
                    "mean_sentence_score": float(np.mean([it.result.sentence_score for it in sel])),
                    "mean_r_t": float(np.mean(np.concatenate([it.result.reliability for it in sel]))),
                    "mean_s_log": float(np.mean(np.concatenate([it.result.features["s_log"] for it in sel])))})
    for d in ("photos_yesno", "blank", "noise"):
        sel = [it for it in items if it.dataset == d]
        if sel:
            out.append({"budget": f"{d} (unpruned)", "n": len(sel), "accuracy": float(np.mean([it.correct for it in sel])),
                        "mean_sentence_score": float(np.mean([it.result.sentence_score for it in sel])),
                        "mean_r_t": float(np.mean(np.concatenate([it.result.reliability for it in sel]))),
                        "mean_s_log": float(np.mean(np.concatenate([it.result.features["s_log"] for it in sel])))})
    return out


def _fmt(v: float) -> str:
    return "n/a" if isinstance(v, float) and math.isnan(v) else f"{v:.3f}"


def render_markdown(report: dict[str, Any]) -> str:
    """The detection table, the per-budget table and the timing, as Markdown."""
    det, bud, tim = report["detection"], report["budgets"], report["timing"]
    lines = [("AUROC / AP of detecting wrong or guessed answers (positives) with each score (higher = more likely "
              "wrong: 1 - confidence, entropy, perplexity, 1 - sentence score). Reference statistics and fitted "
              "weights: 2-fold split by image, each item scored by the combiner fitted on the other fold."), "",
             "| set | pos | neg | " + " | ".join(DETECTORS) + " |",
             "|---|---|---|" + "---|" * len(DETECTORS)]
    for row in det:
        cells = [f"{_fmt(row[d][0])} / {_fmt(row[d][1])}" for d in DETECTORS]
        lines.append(f"| {row['set']} | {row['positives']} | {row['negatives']} | " + " | ".join(cells) + " |")
    lines += ["", "Grounding per pruning budget (`cls_topk`; generic unsupervised combiner):", "",
              "| budget | n | accuracy | mean sentence score | mean r_t | mean s_log |", "|---|---|---|---|---|---|"]
    for row in bud:
        lines.append(f"| {row['budget']} | {row['n']} | {row['accuracy']:.3f} | {row['mean_sentence_score']:.3f} | "
                     f"{row['mean_r_t']:.3f} | {row['mean_s_log']:.3f} |")
    ratio = tim["reliability_given_answer_s"] / tim["generate_s"] if tim["generate_s"] else float("nan")
    lines += ["", (f"Timing (one sample, median of 3, answer of {tim['answer_tokens']} tokens): generate "
                   f"{tim['generate_s'] * 1000:.0f} ms; reliability with the answer given (three teacher-forced "
                   f"passes) {tim['reliability_given_answer_s'] * 1000:.0f} ms ({ratio:.2f}x one generate); "
                   f"reliability that also generates the answer {tim['reliability_with_generation_s'] * 1000:.0f} "
                   "ms."),
              "", f"Sizes: {report['sizes']}; wall time {report['seconds']:.0f} s."]
    return "\n".join(lines)


def evaluate(model, processor, **kwargs) -> dict[str, Any]:
    """`run_eval`, then the detection and per-budget tables; JSON-ready (items summarised, not their features)."""
    run = run_eval(model, processor, **kwargs)
    items = run["items"]
    return {"detection": detection_table(items), "budgets": budget_table(items), "timing": run["timing"],
            "sizes": run["sizes"], "seconds": run["seconds"],
            "items": [{"dataset": it.dataset, "budget": it.budget, "image": it.image_key, "question": it.question,
                       "truth": it.truth, "answer": it.answer, "correct": it.correct, "positive": it.positive,
                       "sentence_score": float(it.result.sentence_score), "confidence": float(it.result.confidence),
                       "entropy": float(it.result.entropy), "perplexity": float(it.result.perplexity)}
                      for it in items]}
