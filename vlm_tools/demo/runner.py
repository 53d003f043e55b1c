"""The demo runs: every registered pruning method at three budgets on the default model or a tiny random LLaVA.

With the default model: answers the ShapesVQA quick subset unpruned (`none`) and with every method and budget, and
computes the kept-token masks on real photos. With the tiny model: a random LLaVA built offline in a second, to
check the pipeline end to end. Both write their outputs through :mod:`vlm_tools.demo.report`.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from vlm_tools.demo.report import DemoRow, write_html, write_results

__all__ = ["pruning_methods", "run_tiny_demo", "run_default_demo", "run_demo", "DEFAULT_BUDGETS", "DEMO_OVERRIDES"]

DEFAULT_BUDGETS = (32, 16, 8)
# Config the demo adds to a method to stay within its time budget on a 2-core CPU. zoo_prune's zeroth-order
# estimator pushes 2 x 64 x 64 rows per image through the projector, more than the whole LM prefill of this small
# model; its closed-form Jacobian estimator ranks tokens the same way (Spearman 0.98-0.99, benchmarks/RESULTS.md).
DEMO_OVERRIDES = {"zoo_prune": {"estimator": "jacobian"}}


def pruning_methods() -> list[str]:
    """Registered token-selecting methods (modifiers and the `none` reference excluded)."""
    from vlm_tools._registry import list_methods

    return [m.name for m in list_methods() if m.kind != "modifier" and m.name != "none"]


def run_tiny_demo(budgets: tuple[int, ...] = (32, 16, 8), max_new_tokens: int = 4) -> list[DemoRow]:
    """Build a tiny random LLaVA offline, wrap it with each method at three budgets, generate, and time prefill."""
    import vlm_tools
    from vlm_tools.testing import TinyCase

    case = TinyCase("llava", "clip")
    inputs = case.singles[0]
    rows = []
    configs = [("none", {}, "all")]
    for m in pruning_methods():
        base = vlm_tools.get_method(m).cls.example_config(case.model)  # fits the tiny model (e.g. fastv's layer)
        base.pop("ratio", None)
        configs += [(m, {**base, "keep": k}, f"keep={k}") for k in budgets]
    for name, cfg, label in configs:
        with vlm_tools.attached(case.model, name, **cfg) as wrapped, torch.no_grad():
            wrapped.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)  # warm-up
            out = wrapped.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            trace = wrapped.last_trace
        text = case.processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]
        rows.append(DemoRow(method=name, budget=label, visual_tokens=float(trace.tokens_after[0]),
                            prefill_ms=trace.prefill_ms, answer=text.strip()))
    return rows


def _answer(wrapped, processor, items, batch_size, bar) -> tuple[list[str], list[float], list[float]]:
    from vlm_tools.assets.default_model import format_prompt
    from vlm_tools.assets.vqa_eval import normalize_answer

    tok = processor.tokenizer
    answers, tokens, prefill = [], [], []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        images = [it["image"] for it in chunk]
        prompts = [format_prompt(processor, it["question"]) for it in chunk]
        batch = processor(images=images, text=prompts, return_tensors="pt", padding=True)
        with torch.inference_mode():
            out = wrapped.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
        texts = tok.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        answers += [normalize_answer(t) for t in texts]
        tokens += [float(t) for t in wrapped.last_trace.tokens_after]
        prefill.append(wrapped.last_trace.prefill_ms)
        bar.update(len(chunk))
    return answers, tokens, prefill


def _mask_gallery(model, processor, photos: list[dict], methods: list[str], keep: int):
    """Per photo: (title, [(method, PIL overlay, visual tokens)]) with the kept-token masks at budget `keep`; and the
    patch grid of the model's view."""
    import vlm_tools
    from vlm_tools.assets.default_model import format_prompt
    from vlm_tools.demo.report import kept_mask_image

    out, grid = [], None
    for ph in photos:
        cells = []
        batch = processor(images=[ph["image"]], text=[format_prompt(processor, ph["question"])], return_tensors="pt")
        for name in methods:
            cfg = {"keep": keep, **DEMO_OVERRIDES.get(name, {})}
            with vlm_tools.attached(model, name, **cfg) as wrapped, torch.inference_mode():
                wrapped(**batch)
            kept, grid = wrapped.last_trace.kept[0][0], wrapped.last_trace.grid
            cells.append((name, kept_mask_image(ph["image"], kept, grid), int(kept.numel())))
        out.append((f"{ph['photo']} ({ph['source']}): {ph['question']}", cells))
    return out, grid


def run_default_demo(out_dir: str = "out/demo", limit: int | None = None, batch_size: int = 32,
                     methods: list[str] | None = None, budgets: tuple[int, ...] = DEFAULT_BUDGETS,
                     dtype: torch.dtype = torch.bfloat16) -> list[DemoRow]:
    """Run every method x budget on the ShapesVQA quick subset and write results + report.html to `out_dir`.

    The model runs in bf16 by default (about 3x faster than fp32 on CPUs with bf16 matrix units; the ShapesVQA
    accuracy is the same within noise).
    """
    from tqdm.auto import tqdm

    import vlm_tools
    from vlm_tools.assets.data import load_shapes_vqa, photos_yesno
    from vlm_tools.assets.default_model import load_default

    t0 = time.perf_counter()
    torch.manual_seed(0)
    model, processor = load_default(dtype=dtype)
    processor.tokenizer.padding_side = "left"
    items = load_shapes_vqa("quick")
    if limit is not None:
        items = items[:limit]
    from PIL import Image

    for it in items:
        it["image"] = Image.open(it["image"]).convert("RGB")
    methods = methods or pruning_methods()
    unknown = sorted(set(methods) - set(pruning_methods()))
    if unknown:
        raise ValueError(f"unknown pruning methods {unknown}; available: {', '.join(pruning_methods())}")
    configs = [("none", {}, "all")]
    for m in methods:
        extra = DEMO_OVERRIDES.get(m, {})
        note = "".join(f", {k}={v}" for k, v in extra.items())
        configs += [(m, {"keep": k, **extra}, f"keep={k}{note}") for k in budgets]
    rows: list[DemoRow] = []
    gold = [it["answer"] for it in items]
    base_acc = None
    with tqdm(total=len(configs) * len(items), desc="demo", unit="q") as bar:
        for name, cfg, label in configs:
            bar.set_postfix_str(f"{name} {label}")
            with vlm_tools.attached(model, name, **cfg) as wrapped:
                answers, tokens, prefill = _answer(wrapped, processor, items, batch_size, bar)
            acc = sum(a == g for a, g in zip(answers, gold)) / len(gold)
            base_acc = acc if name == "none" else base_acc
            rows.append(DemoRow(method=name, budget=label, visual_tokens=sum(tokens) / len(tokens),
                                prefill_ms=sum(prefill) / len(prefill), accuracy=acc,
                                retention=acc / base_acc if base_acc else float("nan")))
    photos = [p for p in photos_yesno() if p["answer"] == "yes"][:4]
    for p in photos:
        p["image"] = Image.open(p["image"]).convert("RGB")
    gallery, rows_grid = _mask_gallery(model, processor, photos, methods, keep=budgets[len(budgets) // 2])
    meta = {"model": str(vlm_tools.default_model_path(build=False)), "questions": len(items),
            "batch size": batch_size, "dtype": str(dtype).replace("torch.", ""),
            "grid": "x".join(map(str, rows_grid)) if rows_grid else "",
            "budgets (tokens kept of 64)": ", ".join(map(str, budgets)), "threads": torch.get_num_threads(),
            "seconds": round(time.perf_counter() - t0, 1)}
    out = Path(out_dir)
    write_results(rows, out, meta)
    write_html(out / "report.html", rows, gallery, meta)
    return rows


def run_demo(model: str = "default", out_dir: str = "out/demo", **kw) -> list[DemoRow]:
    """Run the demo on `model` ("default" or "tiny"); returns the table rows and writes them under `out_dir`."""
    t0 = time.perf_counter()
    if model == "tiny":
        rows = run_tiny_demo()
        write_results(rows, Path(out_dir), {"model": "tiny", "seconds": time.perf_counter() - t0})
        return rows
    return run_default_demo(out_dir=out_dir, **kw)
