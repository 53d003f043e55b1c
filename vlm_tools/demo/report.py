"""The demo's outputs: the results table (Markdown, CSV, JSON) and the self-contained `report.html`."""

from __future__ import annotations

import csv
import html
import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from vlm_tools.core.io import image_png, png_data_uri, write_text_atomic

__all__ = ["DemoRow", "format_table", "write_results", "kept_mask_image", "write_html"]


@dataclass
class DemoRow:
    """One method x budget cell of the demo table."""

    method: str
    budget: str
    visual_tokens: float
    prefill_ms: float
    accuracy: float | None = None
    retention: float | None = None
    answer: str | None = None


def format_table(rows: list[DemoRow]) -> str:
    """A Markdown table of the demo rows (columns without values are left out)."""
    cols = [("method", "method"), ("budget", "budget"), ("visual_tokens", "visual tokens"),
            ("prefill_ms", "prefill ms")]
    if any(r.accuracy is not None for r in rows):
        cols += [("accuracy", "accuracy"), ("retention", "retention")]
    if any(r.answer is not None for r in rows):
        cols.append(("answer", "answer"))

    def fmt(v):
        if v is None:
            return ""
        if isinstance(v, float):
            if v.is_integer():
                return str(int(v))
            return f"{v:.1f}" if abs(v) >= 10 else f"{v:.3f}"
        return str(v)

    lines = ["| " + " | ".join(h for _, h in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(getattr(r, k)) for k, _ in cols) + " |" for r in rows]
    return "\n".join(lines)


def write_results(rows: list[DemoRow], out: Path, meta: dict) -> None:
    """`results.md`, `results.json` (rows and `meta`) and `results.csv` in `out`."""
    write_text_atomic(out / "results.md", format_table(rows) + "\n")
    write_text_atomic(out / "results.json", json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=2))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(asdict(rows[0])))
    w.writeheader()
    w.writerows(asdict(r) for r in rows)
    write_text_atomic(out / "results.csv", buf.getvalue())


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


def write_html(path: Path, rows: list[DemoRow], gallery, meta: dict) -> None:
    """`report.html`: the table, and per photo `(title, [(method, PIL image, visual tokens)])` the kept masks."""
    esc = html.escape
    head = ["method", "budget", "accuracy", "retention", "visual tokens", "prefill ms / batch"]
    body = "".join(
        "<tr>" + "".join(f"<td>{esc(str(v))}</td>" for v in (
            r.method, r.budget, f"{r.accuracy:.3f}", f"{r.retention:.3f}", f"{r.visual_tokens:g}",
            f"{r.prefill_ms:.1f}")) + "</tr>" for r in rows)
    figs = []
    for title, cells in gallery:
        imgs = "".join(f'<figure><img src="{png_data_uri(image_png(img))}" alt="{esc(name)}">'
                       f"<figcaption>{esc(name)} ({n} tokens)</figcaption></figure>" for name, img, n in cells)
        figs.append(f"<h3>{esc(title)}</h3><div class='row'>{imgs}</div>")
    meta_html = "".join(f"<li><b>{esc(str(k))}</b>: {esc(str(v))}</li>" for k, v in meta.items())
    doc = f"""<!doctype html><html><head><meta charset="utf-8"><title>vlm_tools demo</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1200px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}td:first-child,td:nth-child(2){{text-align:left}}
.row{{display:flex;flex-wrap:wrap;gap:8px}}figure{{margin:0}}figcaption{{font-size:12px;text-align:center}}</style>
</head><body><h1>vlm_tools demo: pruning on the default model</h1><ul>{meta_html}</ul>
<h2>ShapesVQA quick subset</h2><table><tr>{"".join(f"<th>{h}</th>" for h in head)}</tr>{body}</table>
<h2>Kept visual tokens on real photos</h2><p>Dark cells were pruned; the grid is the model's
{esc(str(meta.get("grid")))} patch grid.</p>{"".join(figs)}</body></html>"""
    write_text_atomic(path, doc)
