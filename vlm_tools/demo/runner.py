"""The demo run: every registered pruning method at three budgets, on the default model or a tiny random LLaVA.

One pipeline for both models: the same fixed ShapesVQA subset answered unpruned (`none`) and by every method x
budget (accuracy with its 95 % Wilson interval, visual tokens, prefill time per question), the unpruned model's
score on photos_yesno next to chance, and a gallery of the distinct photos of photos_yesno with each method's kept
mask and answer. Outputs are written by :mod:`vlm_tools.demo.report`.

Sizing (issue 13.14): by default each cell answers the first :data:`DEFAULT_QUESTIONS` questions of the quick
subset (the same ones for every cell; ``questions=None`` answers all 500), and a one-word answer comes from one
forward pass (the candidate answer whose first token is the greedy next token, see
:func:`vlm_tools.assets.vqa_eval.answer_batches`). The dtype comes from :func:`vlm_tools.loading.auto_dtype`
(fp32 on CPUs without bf16 units, where bf16 is emulated and an order of magnitude slower).
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from vlm_tools.demo.report import DemoRow, GalleryCell, GalleryPhoto, PhotosScore, kept_mask_image, write_report, \
    write_results

__all__ = ["pruning_methods", "run_demo", "demo_configs", "DEFAULT_BUDGETS", "DEFAULT_QUESTIONS", "DEMO_OVERRIDES",
           "ANSWER_MODES", "DEMO_MODELS"]

DEFAULT_BUDGETS = (32, 16, 8)
# questions per cell: the first N of the quick subset (`full=True`: all 500); the tiny model only checks the pipeline
DEFAULT_QUESTIONS = {"default": 64, "tiny": 8}
DEMO_MODELS = ("default", "tiny")
ANSWER_MODES = ("first-token", "generate")
# Config the demo adds to a method to stay within its time budget on a 2-core CPU. zoo_prune's zeroth-order
# estimator pushes 2 x 64 x 64 rows per image through the projector, more than the whole LM prefill of this small
# model; its closed-form Jacobian estimator ranks tokens the same way (Spearman 0.98-0.99, benchmarks/RESULTS.md).
DEMO_OVERRIDES = {"zoo_prune": {"estimator": "jacobian"}}


def pruning_methods() -> list[str]:
    """Registered token-selecting methods (modifiers and the `none` reference excluded)."""
    from vlm_tools._registry import list_methods

    return [m.name for m in list_methods() if m.kind != "modifier" and m.name != "none"]


def demo_configs(model: Any, spec: str, methods: list[str], budgets: tuple[int, ...]) -> list[tuple[str, dict, str,
                                                                                                   str]]:
    """`(method, config, budget label, config note)` of every cell, `none` first.

    The tiny model takes each method's `example_config` (e.g. fastv prunes after layer 1 of its 2); the default
    model the method defaults plus :data:`DEMO_OVERRIDES`.
    """
    import vlm_tools

    configs = [("none", {}, "all", "")]
    for m in methods:
        base = vlm_tools.get_method(m).cls.example_config(model) if spec == "tiny" else {}
        base.pop("ratio", None)
        base.pop("keep", None)
        extra = {**base, **DEMO_OVERRIDES.get(m, {})}
        note = ", ".join(f"{k}={v}" for k, v in extra.items())
        configs += [(m, {**extra, "keep": k}, f"keep={k}", note) for k in budgets]
    return configs


def _dtype_line(requested: str, dtype: torch.dtype) -> str:
    from vlm_tools.loading import cpu_has_native_bf16

    name = str(dtype).removeprefix("torch.")
    cap = torch.backends.cpu.get_cpu_capability()
    why = "auto" if requested == "auto" else "requested"
    return f"{name} ({why}; CPU capability {cap}, native bf16 {'yes' if cpu_has_native_bf16() else 'no'})"


def _distinct_photos(items: list[dict]) -> list[dict]:
    """The first question with a box (a yes-question) of each distinct photo, in the data's order."""
    seen, out = set(), []
    for it in items:
        if it["bbox"] and it["photo"] not in seen:
            seen.add(it["photo"])
            out.append(it)
    return out


def _score(answers: list[str], gold: list[str]) -> tuple[float, float, float, int]:
    from vlm_tools.assets.vqa_eval import wilson_interval

    hits = sum(a == g for a, g in zip(answers, gold, strict=True))
    low, high = wilson_interval(hits, len(gold))
    return hits / len(gold), low, high, len(gold)


def run_demo(model: str = "default", out_dir: str | Path = "out/demo", questions: int | None = None,
             full: bool = False, batch_size: int = 32, methods: list[str] | None = None,
             budgets: tuple[int, ...] = DEFAULT_BUDGETS, dtype: str = "auto", answer: str | None = None,
             gallery: bool = True,
             log: Callable[[str], None] | None = None) -> list[DemoRow]:
    """Run every method x budget on a fixed ShapesVQA subset and write results, plot and report.html to `out_dir`.

    Args:
        model: "default" (the embedded default model) or "tiny" (a random tiny LLaVA, to check the pipeline).
        out_dir: output folder (checked for writing before anything runs).
        questions: questions per cell, the first N of the quick subset (the same for every cell); default
            :data:`DEFAULT_QUESTIONS` of the model.
        full: answer all 500 questions of the quick subset in every cell (overrides `questions`).
        batch_size: questions per model call.
        methods: subset of :func:`pruning_methods` (default: all).
        budgets: visual tokens kept per image (of 64).
        dtype: "auto" (:func:`vlm_tools.loading.auto_dtype`) or a dtype name; the tiny model is always fp32.
        answer: "first-token" (one forward pass per question, default for the default model) or "generate"
            (greedy generation of up to 3 tokens, the first word; default for the tiny model, whose word-level
            tokenizer does not know the answer words).
        gallery: also compute the photo gallery and the photos_yesno score (report.html).
        log: where progress lines go (default: stderr).

    Returns:
        the table rows, `none` first.

    Raises:
        ValueError: unknown model, method, answer mode or dtype, or a non-positive `questions`.
        vlm_tools.errors.OutputDirError: `out_dir` cannot be written.
    """
    from PIL import Image
    from tqdm.auto import tqdm

    import vlm_tools
    from vlm_tools.assets.data import load_shapes_vqa, photos_yesno
    from vlm_tools.assets.vqa_eval import COLORS, SHAPES, answer_batches
    from vlm_tools.core.io import ensure_writable_dir
    from vlm_tools.loading import DTYPES, auto_dtype, cli_prompt, load_model

    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    if model not in DEMO_MODELS:
        raise ValueError(f"demo model {model!r}: choose one of {', '.join(DEMO_MODELS)}")
    answer = answer or ("first-token" if model == "default" else "generate")
    if answer not in ANSWER_MODES:
        raise ValueError(f"answer mode {answer!r}: choose one of {', '.join(ANSWER_MODES)}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if questions is not None and questions < 1:
        raise ValueError(f"questions={questions}: answer at least one question per cell")
    methods = methods or pruning_methods()
    unknown = sorted(set(methods) - set(pruning_methods()))
    if unknown:
        raise ValueError(f"unknown pruning methods {unknown}; available: {', '.join(pruning_methods())}")
    out = ensure_writable_dir(out_dir)

    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    torch.manual_seed(0)
    if model == "tiny":
        torch_dtype = torch.float32
    else:
        torch_dtype = auto_dtype("cpu") if dtype == "auto" else getattr(torch, dtype)
    net, processor = load_model(model, dtype=str(torch_dtype).removeprefix("torch."))
    dtype_line = _dtype_line(dtype, torch_dtype) if model == "default" else "float32 (tiny model)"
    items = load_shapes_vqa("quick")
    items = items if full else items[:questions or DEFAULT_QUESTIONS[model]]
    images = [Image.open(it["image"]).convert("RGB") for it in items]
    texts = [it["question"] for it in items]
    gold = [it["answer"] for it in items]
    timings["load model and data"] = time.perf_counter() - t0
    configs = demo_configs(net, model, methods, budgets)
    log(f"[vlm_tools demo] model {model}, dtype {dtype_line}, {len(items)} questions x {len(configs)} cells, "
        f"answers by {answer}, threads {torch.get_num_threads()}")

    def prompt(proc: Any, question: str) -> str:
        return cli_prompt(model, proc, question)

    candidates = (*SHAPES, *COLORS, "yes", "no") if answer == "first-token" else None
    max_new_tokens = 3

    rows: list[DemoRow] = []
    base_acc = None
    t_cells = time.perf_counter()
    with tqdm(total=len(configs) * len(items), desc="demo", unit="q", file=sys.stderr) as bar:
        for name, cfg, label, note in configs:
            bar.set_postfix_str(f"{name} {label}")
            answers: list[str] = []
            tokens: list[float] = []
            prefill: list[float] = []
            with vlm_tools.attached(net, name, **cfg) as wrapped:
                for batch in answer_batches(wrapped, processor, images, texts, batch_size, max_new_tokens, prompt,
                                            candidates):
                    answers += batch
                    tokens += [float(t) for t in wrapped.last_trace.tokens_after]
                    prefill += [wrapped.last_trace.prefill_ms / len(batch)] * len(batch)
                    bar.update(len(batch))
            acc, low, high, n = _score(answers, gold)
            base_acc = acc if name == "none" else base_acc
            rows.append(DemoRow(method=name, budget=label, config=note, visual_tokens=sum(tokens) / len(tokens),
                                prefill_ms=sum(prefill) / len(prefill), accuracy=acc, ci_low=low, ci_high=high, n=n,
                                retention=acc / base_acc if base_acc else float("nan"),
                                answer=answers[0] if model == "tiny" else None))
    timings["method x budget cells"] = time.perf_counter() - t_cells

    photos, score, grid = [], None, None
    if gallery:
        t_gallery = time.perf_counter()
        photo_items = photos_yesno()
        photo_images = {it["photo"]: Image.open(it["image"]).convert("RGB") for it in photo_items}
        with vlm_tools.attached(net, "none") as wrapped:
            photo_answers = [a for batch in answer_batches(
                wrapped, processor, [photo_images[it["photo"]] for it in photo_items],
                [it["question"] for it in photo_items], batch_size, max_new_tokens, prompt, candidates) for a in batch]
        acc, low, high, n = _score(photo_answers, [it["answer"] for it in photo_items])
        yes = sum(it["answer"] == "yes" for it in photo_items)
        top, count = Counter(photo_answers).most_common(1)[0]
        score = PhotosScore(accuracy=acc, ci_low=low, ci_high=high, n=n, chance=max(yes, n - yes) / n,
                            top_answer=top, top_answer_share=count / n)
        shown = _distinct_photos(photo_items)
        photos = [GalleryPhoto(photo=it["photo"], source=it["source"], credit=it["credit"], question=it["question"],
                               reference=it["answer"], bbox=it["bbox"]) for it in shown]
        keep = budgets[len(budgets) // 2]
        by_label = {(name, label): cfg for name, cfg, label, _ in configs}
        for name in ["none", *methods]:  # all photos in one batch per method: per-call overhead stays small
            cfg = by_label[(name, "all" if name == "none" else f"keep={keep}")]
            replies: list[str] = []
            samples = []
            with vlm_tools.attached(net, name, **cfg) as wrapped:
                for batch in answer_batches(wrapped, processor, [photo_images[it["photo"]] for it in shown],
                                            [it["question"] for it in shown], batch_size, max_new_tokens, prompt,
                                            candidates):
                    replies += batch
                    samples += wrapped.last_trace.samples
                    grid = wrapped.last_trace.grid or grid
            label = "unpruned" if name == "none" else f"{name} keep={keep}"
            for ph, it, reply, sample in zip(photos, shown, replies, samples, strict=True):
                kept = None if name == "none" else sample.kept[0]
                ph.cells.append(GalleryCell(label=label, tokens=int(sample.tokens_after), answer=reply,
                                            image=kept_mask_image(photo_images[it["photo"]], kept, grid,
                                                                  bbox=it["bbox"])))
        timings["photos: score and gallery"] = time.perf_counter() - t_gallery

    seconds = time.perf_counter() - t0
    meta = {
        "model": str(vlm_tools.default_model_path(build=False)) if model == "default" else "tiny random LLaVA",
        "dtype": dtype_line,
        "questions per cell": f"{len(items)} (the first {len(items)} of the ShapesVQA quick subset, the same for "
                              "every cell)",
        "answers": "one forward pass: the candidate answer whose first token is the greedy next token"
                   if answer == "first-token" else f"greedy generate, {max_new_tokens} new tokens, first word",
        "budgets (visual tokens kept)": ", ".join(map(str, budgets)),
        "patch grid": "x".join(map(str, grid)) if grid else "",
        "batch size": batch_size,
        "threads": torch.get_num_threads(),
        "CPU capability": torch.backends.cpu.get_cpu_capability(),
        "seconds": round(seconds, 1),
        "seconds per stage": {k: round(v, 1) for k, v in timings.items()},
    }
    write_results(rows, out, meta)
    if gallery:
        if model == "default":
            title = "vlm_tools demo: visual-token pruning on the default model"
            note = ("The default model was trained on easy-vqa's synthetic shapes only, never on photos: its answers "
                    "below are not evidence of what a method keeps being right. The photos show where each method "
                    "keeps tokens; the score next to chance says how little the model understands photos.")
        else:
            title = "vlm_tools demo: pipeline check on a tiny random LLaVA"
            note = ("The tiny model has random weights: its answers and accuracies are meaningless. This report checks "
                    "the pipeline end to end; the tiny CLIP processor crops the centre, the masks show the whole "
                    "photo.")
        total = int(rows[0].visual_tokens)
        write_report(out, rows, photos, meta, score, title, note, total_tokens=total)
    log(f"[vlm_tools demo] {seconds:.1f} s; written to {out}/")
    return rows
