"""The demo's outputs: the results table (Markdown, CSV, JSON), the accuracy-vs-visual-tokens plot and the
self-contained `report.html` (table, plot, and a gallery of distinct photos with each method's kept mask and answer).

Everything here is pure presentation: it takes the typed records the runner measured (`DemoRow`, `GalleryPhoto`,
`PhotosScore`) and writes files through `vlm_tools.core.io`. User-supplied text (questions, labels, paths) is
HTML-escaped, and drawn by matplotlib without mathtext.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from vlm_tools.core.io import figure_png, png_data_uri, pyplot, write_bytes_atomic, write_text_atomic

__all__ = ["DemoRow", "GalleryCell", "GalleryPhoto", "PhotosScore", "format_table", "write_results",
           "kept_mask_image", "accuracy_plot_png", "grid_columns", "render_html", "write_report"]


@dataclass
class DemoRow:
    """One method x budget cell of the demo table.

    Attributes:
        method: registered method name (`none` for the unpruned reference).
        budget: `all` or `keep=K`.
        config: extra config the demo gives the method (e.g. `estimator=jacobian`), or "".
        visual_tokens: mean visual tokens per question after pruning.
        prefill_ms: mean prefill wall time per question (batch prefill / batch size).
        accuracy: fraction of correct answers (None when not scored).
        ci_low: lower end of the 95 % Wilson interval of `accuracy`.
        ci_high: upper end of the 95 % Wilson interval.
        n: questions answered.
        retention: accuracy / unpruned accuracy.
        answer: the answer to the first question (shown for the tiny model, whose accuracy is meaningless).
    """

    method: str
    budget: str
    visual_tokens: float
    prefill_ms: float
    config: str = ""
    accuracy: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    n: int | None = None
    retention: float | None = None
    answer: str | None = None


@dataclass
class GalleryCell:
    """One panel of a gallery photo: a method's kept-token mask (or the unpruned photo) and its answer."""

    label: str
    image: Any
    tokens: int
    answer: str


@dataclass
class GalleryPhoto:
    """A distinct photo of the gallery, the question asked about it, and one panel per method."""

    photo: str
    source: str
    credit: str
    question: str
    reference: str
    bbox: list[int] | None
    cells: list[GalleryCell] = field(default_factory=list)


@dataclass
class PhotosScore:
    """The unpruned model's score on all of photos_yesno, next to chance, and its most frequent answer."""

    accuracy: float
    ci_low: float
    ci_high: float
    n: int
    chance: float
    top_answer: str = ""
    top_answer_share: float = 0.0


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if v.is_integer():
            return str(int(v))
        return f"{v:.1f}" if abs(v) >= 10 else f"{v:.3f}"
    return str(v)


def _ci(r: DemoRow) -> str:
    return "" if r.ci_low is None else f"[{r.ci_low:.3f}, {r.ci_high:.3f}]"


def _table_columns(rows: list[DemoRow]) -> list[tuple[str, Any]]:
    cols: list[tuple[str, Any]] = [("method", lambda r: r.method), ("budget", lambda r: r.budget)]
    if any(r.config for r in rows):
        cols.append(("config", lambda r: r.config))
    cols += [("visual tokens", lambda r: _fmt(r.visual_tokens)),
             ("prefill ms / question", lambda r: _fmt(r.prefill_ms))]
    if any(r.accuracy is not None for r in rows):
        cols += [("accuracy", lambda r: _fmt(r.accuracy)), ("95% CI (Wilson)", _ci), ("n", lambda r: _fmt(r.n)),
                 ("retention", lambda r: _fmt(r.retention))]
    if any(r.answer is not None for r in rows):
        cols.append(("answer", lambda r: _fmt(r.answer)))
    return cols


def format_table(rows: list[DemoRow]) -> str:
    """A Markdown table of the demo rows (columns without values are left out; `|` in text is escaped)."""
    cols = _table_columns(rows)
    cell = lambda text: str(text).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| " + " | ".join(h for h, _ in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(get(r)) for _, get in cols) + " |" for r in rows]
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


def kept_mask_image(image, kept: torch.Tensor | None, grid: tuple[int, int] | None, size: int = 176,
                    bbox: list[int] | None = None):
    """A PIL overlay: the model's view of `image` (resized to a square) with pruned patches darkened and a patch grid
    drawn; `kept=None` shows the whole view. `bbox` (`[x0, y0, x1, y1]` pixels of the original, exclusive end) is
    drawn as the box of the asked object."""
    from PIL import Image, ImageDraw

    width, height = image.size
    img = image.convert("RGB").resize((size, size), Image.BICUBIC)
    shade = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    draw = ImageDraw.Draw(shade)
    if kept is not None and grid is not None:
        gh, gw = grid
        keep = torch.zeros(gh * gw, dtype=torch.bool)
        keep[kept.long()] = True
        ch, cw = size / gh, size / gw
        for i in range(gh * gw):
            r, c = divmod(i, gw)
            box = (round(c * cw), round(r * ch), round((c + 1) * cw) - 1, round((r + 1) * ch) - 1)
            if keep[i]:
                draw.rectangle(box, outline=(255, 220, 0, 160))
            else:
                draw.rectangle(box, fill=(0, 0, 0, 200))
    if bbox:
        x0, y0, x1, y1 = bbox
        sx, sy = size / width, size / height
        draw.rectangle((round(x0 * sx), round(y0 * sy), round(x1 * sx) - 1, round(y1 * sy) - 1),
                       outline=(0, 200, 255, 255), width=3)
    return Image.alpha_composite(img.convert("RGBA"), shade).convert("RGB")


def _jpeg_data_uri(image, quality: int = 85) -> str:
    """A photo panel inlined as JPEG (a tenth of the PNG's size for photos)."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _plain(text: str) -> str:
    """Text for matplotlib without mathtext (`$` would start a formula)."""
    return str(text).replace("$", r"\$")


def accuracy_plot_png(rows: list[DemoRow], total_tokens: int | None = None) -> bytes:
    """One accuracy-vs-visual-tokens panel per method (95 % Wilson intervals as error bars), with the unpruned
    accuracy (line and band) and `random` (dashed, when measured) in every panel for reference; PNG bytes."""
    plt = pyplot()
    base = next((r for r in rows if r.method == "none" and r.accuracy is not None), None)
    methods = list(dict.fromkeys(r.method for r in rows if r.method != "none" and r.accuracy is not None))
    if not methods:
        raise ValueError("no scored pruning rows to plot")
    ncols = min(3, len(methods))
    nrows = math.ceil(len(methods) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.0 * ncols, 3.0 * nrows), squeeze=False, sharey=True)

    def series(method: str):
        pts = sorted((r for r in rows if r.method == method and r.accuracy is not None), key=lambda r: r.visual_tokens)
        x = [r.visual_tokens for r in pts]
        y = [r.accuracy for r in pts]
        err = [[r.accuracy - (r.ci_low if r.ci_low is not None else r.accuracy) for r in pts],
               [(r.ci_high if r.ci_high is not None else r.accuracy) - r.accuracy for r in pts]]
        return x, y, err

    xmax = total_tokens or max(r.visual_tokens for r in rows)
    for k, method in enumerate(methods):
        ax = axes[k // ncols][k % ncols]
        if base is not None:
            ax.axhline(base.accuracy, color="black", lw=1, label=_plain(f"unpruned ({base.visual_tokens:g} tokens)"))
            ax.plot([base.visual_tokens], [base.accuracy], "ko", ms=4)
            if base.ci_low is not None:
                ax.axhspan(base.ci_low, base.ci_high, color="black", alpha=0.08)
        if method != "random" and "random" in methods:
            rx, ry, _ = series("random")
            ax.plot(rx, ry, ls="--", color="grey", marker=".", label="random")
        x, y, err = series(method)
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, color="tab:blue", label=_plain(method))
        ax.set_title(_plain(method))
        ax.set_xlim(0, xmax * 1.05)
        ax.set_xlabel("visual tokens kept")
        if k % ncols == 0:
            ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    for k in range(len(methods), nrows * ncols):
        axes[k // ncols][k % ncols].axis("off")
    fig.tight_layout()
    return figure_png(fig)


def grid_columns(n: int, max_columns: int = 8) -> int:
    """Columns of a panel grid for `n` panels: one row up to `max_columns`, otherwise balanced rows (7 -> 7,
    12 -> 6 + 6, 9 -> 5 + 4), never a lone panel on the last row."""
    rows = math.ceil(n / max_columns)
    return math.ceil(n / rows)


_CSS = """body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}td:first-child,td:nth-child(2){text-align:left}
.grid{display:grid;gap:8px}figure{margin:0}figure img{width:100%;height:auto;display:block}
figcaption{font-size:12px;text-align:center}.note{background:#fff4d6;padding:8px 12px;border-left:4px solid #e0a800}
img.plot{max-width:100%}section.photo{margin-bottom:1.5em}.ok{color:#137333}.bad{color:#b3261e}"""


def render_html(rows: list[DemoRow], gallery: list[GalleryPhoto], meta: dict, plot_png: bytes | None,
                photos_score: PhotosScore | None, title: str, note: str) -> str:
    """The report as one self-contained HTML document (images inlined as data URIs)."""
    esc = html.escape
    cols = _table_columns(rows)
    head = "".join(f"<th>{esc(h)}</th>" for h, _ in cols)
    body = "".join("<tr>" + "".join(f"<td>{esc(str(get(r)))}</td>" for _, get in cols) + "</tr>" for r in rows)
    meta_html = "".join(f"<li><b>{esc(str(k))}</b>: {esc(str(v))}</li>" for k, v in meta.items())
    plot = (f'<img class="plot" alt="accuracy vs visual tokens, one panel per method" '
            f'src="{png_data_uri(plot_png)}">' if plot_png else "")
    score = ""
    if photos_score is not None:
        s = photos_score
        score = (f"<p>photos_yesno, unpruned: <b>{s.accuracy:.3f}</b> [{s.ci_low:.3f}, {s.ci_high:.3f}] (95 % Wilson, "
                 f"{s.n} questions); chance is {s.chance:.3f}. Its most frequent answer, "
                 f"<q>{esc(s.top_answer)}</q>, is {s.top_answer_share:.0%} of its answers.</p>")
    sections = []
    for ph in gallery:
        cells = []
        for c in ph.cells:
            mark = "ok" if c.answer == ph.reference else "bad"
            cells.append(f'<figure><img src="{_jpeg_data_uri(c.image)}" alt="{esc(c.label)}">'
                         f"<figcaption>{esc(c.label)} ({c.tokens} tokens)<br>answer: "
                         f'<b class="answer {mark}">{esc(c.answer)}</b></figcaption></figure>')
        columns = grid_columns(len(cells))
        sections.append(
            f'<section class="photo" data-photo="{esc(ph.photo)}"><h3>{esc(ph.photo)} ({esc(ph.source)})</h3>'
            f"<p>Q: <q>{esc(ph.question)}</q>, reference answer: <b>{esc(ph.reference)}</b>. The blue box marks the "
            f"asked object. <small>{esc(ph.credit)}</small></p>"
            f'<div class="grid" style="grid-template-columns:repeat({columns},minmax(0,1fr))">{"".join(cells)}</div>'
            "</section>")
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>{_CSS}</style></head><body><h1>{esc(title)}</h1><ul>{meta_html}</ul>
<h2>ShapesVQA: accuracy per method and budget</h2><table><tr>{head}</tr>{body}</table>
<h2>Accuracy vs visual tokens</h2>{plot}
<h2>Kept visual tokens on real photos</h2><p class="note">{esc(note)}</p>{score}
<p>Dark cells were pruned; the grid is the model's {esc(str(meta.get("patch grid", "")))} patch grid.</p>
{"".join(sections)}</body></html>"""


def write_report(out: Path, rows: list[DemoRow], gallery: list[GalleryPhoto], meta: dict,
                 photos_score: PhotosScore | None, title: str, note: str, total_tokens: int | None = None) -> Path:
    """Write `accuracy_vs_tokens.png` (when rows are scored) and `report.html` into `out`; returns the HTML path."""
    plot = None
    if any(r.accuracy is not None and r.method != "none" for r in rows):
        plot = accuracy_plot_png(rows, total_tokens)
        write_bytes_atomic(out / "accuracy_vs_tokens.png", plot)
    return write_text_atomic(out / "report.html", render_html(rows, gallery, meta, plot, photos_score, title, note))
