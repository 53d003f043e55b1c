"""The main demo job on the embedded default model (DINOv2-S + trained projector + SmolLM2-135M).

Answers the ShapesVQA quick subset unpruned (`none`) and with every registered pruning method at three budgets,
then writes `out/demo/`: `results.{md,csv,json}` (accuracy, retention vs unpruned, visual tokens, prefill ms) and
`report.html` (one self-contained file: the table and the kept-token masks of each method on real photos).
"""

from __future__ import annotations

import base64
import html
import io
import time
from pathlib import Path

import torch

from vlm_tools.core.io import write_text_atomic
from vlm_tools.demo import DemoRow, _write_rows, format_table, pruning_methods

__all__ = ["run_default_demo", "kept_mask_image"]

DEFAULT_BUDGETS = (32, 16, 8)
# Config the demo adds to a method to stay within its time budget on a 2-core CPU. zoo_prune's zeroth-order
# estimator pushes 2 x 64 x 64 rows per image through the projector, more than the whole LM prefill of this small
# model; its closed-form Jacobian estimator ranks tokens the same way (Spearman 0.98-0.99, benchmarks/RESULTS.md).
DEMO_OVERRIDES = {"zoo_prune": {"estimator": "jacobian"}}


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


def kept_mask_image(image, kept: torch.Tensor, grid: tuple[int, int], size: int = 224):
    """A PIL overlay: the model's view of `image` with pruned patches darkened and a patch grid drawn."""
    from PIL import Image, ImageDraw

    img = image.convert("RGB").resize((size, size), Image.BICUBIC)
    gh, gw = grid
    keep = torch.zeros(gh * gw, dtype=torch.bool)
    keep[kept.long()] = True
    shade = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    draw = ImageDraw.Draw(shade)
    ch, cw = size / gh, size / gw
    for i in range(gh * gw):
        r, c = divmod(i, gw)
        box = (round(c * cw), round(r * ch), round((c + 1) * cw) - 1, round((r + 1) * ch) - 1)
        if keep[i]:
            draw.rectangle(box, outline=(255, 220, 0, 160))
        else:
            draw.rectangle(box, fill=(0, 0, 0, 200))
    return Image.alpha_composite(img.convert("RGBA"), shade).convert("RGB")


def _png_b64(img) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _mask_gallery(model, processor, photos: list[dict], methods: list[str], keep: int):
    """Per photo: (title, [(method, PNG base64, visual tokens)]) with the kept-token masks at budget `keep`; and the
    patch grid of the model's view."""
    import vlm_tools
    from vlm_tools.assets.default_model import format_prompt

    out, grid = [], None
    for ph in photos:
        cells = []
        batch = processor(images=[ph["image"]], text=[format_prompt(processor, ph["question"])], return_tensors="pt")
        for name in methods:
            cfg = {"keep": keep, **DEMO_OVERRIDES.get(name, {})}
            with vlm_tools.attached(model, name, **cfg) as wrapped, torch.inference_mode():
                wrapped(**batch)
            kept, grid = wrapped.last_trace.kept[0][0], wrapped.last_trace.grid
            cells.append((name, _png_b64(kept_mask_image(ph["image"], kept, grid)), int(kept.numel())))
        out.append((f"{ph['photo']} ({ph['source']}): {ph['question']}", cells))
    return out, grid


def _write_html(path: Path, rows: list[DemoRow], gallery, meta: dict) -> None:
    esc = html.escape
    head = ["method", "budget", "accuracy", "retention", "visual tokens", "prefill ms / batch"]
    body = "".join(
        "<tr>" + "".join(f"<td>{esc(str(v))}</td>" for v in (
            r.method, r.budget, f"{r.accuracy:.3f}", f"{r.retention:.3f}", f"{r.visual_tokens:g}",
            f"{r.prefill_ms:.1f}")) + "</tr>" for r in rows)
    figs = []
    for title, cells in gallery:
        imgs = "".join(f'<figure><img src="data:image/png;base64,{b64}" alt="{esc(name)}">'
                       f"<figcaption>{esc(name)} ({n} tokens)</figcaption></figure>" for name, b64, n in cells)
        figs.append(f"<h3>{esc(title)}</h3><div class='row'>{imgs}</div>")
    meta_html = "".join(f"<li><b>{esc(str(k))}</b>: {esc(str(v))}</li>" for k, v in meta.items())
    doc = f"""<!doctype html><html><head><meta charset="utf-8"><title>vlm_tools demo</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1200px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}td:first-child,td:nth-child(2){{text-align:left}}
.row{{display:flex;flex-wrap:wrap;gap:8px}}figure{{margin:0}}figcaption{{font-size:12px;text-align:center}}</style>
</head><body><h1>vlm_tools demo: pruning on the default model</h1><ul>{meta_html}</ul>
<h2>ShapesVQA quick subset</h2><table><tr>{"".join(f"<th>{h}</th>" for h in head)}</tr>{body}</table>
<h2>Kept visual tokens on real photos</h2><p>Dark cells were pruned; the grid is the model's {esc(str(meta.get("grid")))}
patch grid.</p>{"".join(figs)}</body></html>"""
    write_text_atomic(path, doc)


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
    _write_rows(rows, out, meta)
    _write_html(out / "report.html", rows, gallery, meta)
    return rows


if __name__ == "__main__":
    print(format_table(run_default_demo()))
