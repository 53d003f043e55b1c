"""The files of an `Explanation`: overlays, a summary sheet, `maps.npz`, `explanation.json` and one `report.html`.

`save_explanation(exp, folder)` writes the folder as a set (`vlm_tools.core.io.replace_dir_atomic`: everything goes
to a temporary sibling that then replaces `folder`, so a reader never sees the arrays of one explanation beside the
JSON of another):

- `image.png`: the original image (when the explanation has one), lossless;
- `token_00_<name>.png`, one per explained token: the map in image pixels (`Explanation.maps_in_pixels`, bilinear)
  as a jet overlay on the image, each token scaled to its own min..max over the cells the model saw, pruned cells
  grey-hatched, a colour bar, the token as title. The image panel is the image scaled to `OVERLAY_SIDE` pixels on
  its long side; the PNG is the panel plus `OVERLAY_MARGINS` (left, top, right, bottom) pixels, 256 colours
  (dithered) to stay small;
- `summary.png`: every token's overlay on one sheet (panels of `SHEET_SIDE` pixels) with the prompt and the answer;
- `maps.npz`: the arrays (`ARRAYS`), plain `np.savez` (no pickled objects);
- `explanation.json`: every other field; tuples become lists, non-finite floats `null`;
- `report.html`: one self-contained page (images inlined as data URIs, no scripts, no external assets or fonts,
  every piece of text HTML-escaped): model, method, config, prompt and answer; the answer tokens as chips coloured
  by their map's mean; each token's overlay, scores and text relevances; the legend of the pruned cells.

`load_explanation(folder, cls)` reads `maps.npz`, `explanation.json` and `image.png` back (arrays bit-exact, same
dtypes); a missing, unreadable or inconsistent file raises `ValueError` naming it. Scores stored as `null` (they
were not finite) come back as NaN. Matplotlib draws without LaTeX and without mathtext on user text (`$` escaped).
"""

from __future__ import annotations

import html
import io
import json
import math
import os
import re
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from vlm_tools.core.io import (
    ensure_writable_dir,
    figure_png,
    image_png,
    plain_text,
    png_data_uri,
    pyplot,
    replace_dir_atomic,
    write_bytes_atomic,
    write_text_atomic,
)

__all__ = ["ARRAYS", "FORMAT", "IMAGE_FILE", "JSON_FILE", "MAPS_FILE", "OVERLAY_MARGINS", "OVERLAY_SIDE", "REPORT_FILE",
           "SHEET_SIDE", "SUMMARY_FILE", "load_explanation", "overlay_file_names", "save_explanation"]

FORMAT = "vlm_tools.explanation/1"
ARRAYS = {"maps": np.float32, "pruned": np.bool_, "answer_ids": np.int64, "targets": np.int64,
          "text_relevance": np.float32}
IMAGE_FILE, MAPS_FILE, JSON_FILE = "image.png", "maps.npz", "explanation.json"
SUMMARY_FILE, REPORT_FILE = "summary.png", "report.html"
OVERLAY_SIDE = 384
OVERLAY_MARGINS = (8, 30, 80, 24)
SHEET_SIDE = 256

_DPI = 100
_ALPHA = 0.5  # weight of the heat colour over the image
_PNG_MODES = {"1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16"}
_OVERLAY_RE = re.compile(r"token_\d+_[A-Za-z0-9_]*\.png")
_JSON_KEYS = ("method", "config", "prompt", "answer", "answer_tokens", "tokens", "text_tokens", "scores", "box",
              "image_size", "metadata")

E = TypeVar("E")


# -- file names -----------------------------------------------------------------------------------------------------

def _safe_name(token: str) -> str:
    name = re.sub(r"[^A-Za-z0-9]+", "_", str(token)).strip("_")[:24].strip("_")
    return name or "tok"


def overlay_file_names(tokens: list[str]) -> list[str]:
    """`token_<i>_<name>.png` for each explained token (`i` zero-padded to 2 digits or more; `name` ASCII)."""
    width = max(2, len(str(len(tokens) - 1)))
    return [f"token_{i:0{width}d}_{_safe_name(t)}.png" for i, t in enumerate(tokens)]


def _is_export_file(name: str) -> bool:
    return name in (IMAGE_FILE, MAPS_FILE, JSON_FILE, SUMMARY_FILE, REPORT_FILE) or bool(_OVERLAY_RE.fullmatch(name))


# -- JSON -----------------------------------------------------------------------------------------------------------

def _jsonable(value: Any, where: str) -> Any:
    """`value` as plain JSON types (tuples -> lists, numpy -> Python, non-finite floats -> None)."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        v = float(value)
        return v if math.isfinite(v) else None
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist(), where)
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{where}: key {k!r} is a {type(k).__name__}; explanation.json needs string keys")
            out[k] = _jsonable(v, f"{where}[{k!r}]")
        return out
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"{where} = {value!r} is a {type(value).__name__}, which explanation.json cannot store "
                    "(use numbers, strings, lists and dicts)")


def _json_record(exp: Any, overlays: list[str], has_image: bool) -> dict:
    record: dict[str, Any] = {"format": FORMAT}
    for key in _JSON_KEYS:
        record[key] = _jsonable(getattr(exp, key), key)
    record["arrays"] = {k: {"shape": list(np.shape(getattr(exp, k))), "dtype": np.dtype(t).name}
                        for k, t in ARRAYS.items()}
    record["files"] = {"image": IMAGE_FILE if has_image else None, "overlays": overlays, "summary": SUMMARY_FILE,
                       "maps": MAPS_FILE, "report": REPORT_FILE}
    return record


# -- pictures -------------------------------------------------------------------------------------------------------

def _display_size(image_size: tuple[int, int], side: int) -> tuple[int, int]:
    w, h = image_size
    s = side / max(w, h)
    return max(1, round(w * s)), max(1, round(h * s))


def _rgb_image(exp: Any) -> Any:
    """The explanation's image as PIL, or None; anything else is an error naming its type."""
    if exp.image is None:
        return None
    from PIL import Image

    if isinstance(exp.image, Image.Image):
        return exp.image
    raise TypeError(f"Explanation.image must be a PIL image or None, got {type(exp.image).__name__}")


def _token_ranges(exp: Any) -> list[tuple[float, float]]:
    """Each token's colour range: min..max of its map over the cells the model saw (0..1 when none or flat)."""
    seen = ~exp.pruned
    out = []
    for m in exp.maps:
        vals = m[seen]
        lo, hi = (float(vals.min()), float(vals.max())) if vals.size else (0.0, 1.0)
        out.append((lo, hi if hi > lo else lo + 1.0))
    return out


def _cell_masks(exp: Any, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """`(inside, pruned)` boolean `(H, W)` masks of a picture of `size`: pixels in the frame's box, pixels of pruned cells."""
    w, h = size
    w_img, h_img = exp.image_size
    x0, y0, x1, y1 = exp.box
    rows, cols = exp.grid
    xs = (np.arange(w) + 0.5) * w_img / w
    ys = (np.arange(h) + 0.5) * h_img / h
    c = np.floor((xs - x0) / (x1 - x0) * cols).astype(np.int64)
    r = np.floor((ys - y0) / (y1 - y0) * rows).astype(np.int64)
    inside = ((r >= 0) & (r < rows))[:, None] & ((c >= 0) & (c < cols))[None, :]
    pruned = exp.pruned[np.clip(r, 0, rows - 1)][:, np.clip(c, 0, cols - 1)] & inside
    return inside, pruned


def _base_picture(exp: Any, side: int) -> np.ndarray:
    """`(H, W, 3)` float picture of the image scaled to `side` pixels on its long side (mid-grey without an image)."""
    size = _display_size(exp.image_size, side)
    image = _rgb_image(exp)
    if image is None:
        return np.full((size[1], size[0], 3), 0.5, dtype=np.float32)
    from PIL import Image

    return np.asarray(image.convert("RGB").resize(size, Image.BILINEAR), dtype=np.float32) / 255.0


def _composites(exp: Any, side: int) -> list[np.ndarray]:
    """One `(H, W, 3)` float picture per token: jet heat over the image, pruned cells grey-hatched."""
    import matplotlib

    jet = matplotlib.colormaps["jet"]
    size = _display_size(exp.image_size, side)
    base = _base_picture(exp, side)
    inside, pruned = _cell_masks(exp, size)
    heat = inside & ~pruned
    yy, xx = np.mgrid[0:size[1], 0:size[0]]
    hatch = np.where(((xx + yy) // 4) % 2 == 0, 0.62, 0.38).astype(np.float32)[..., None]
    pixels = exp.maps_in_pixels(size)
    out = []
    for px, (lo, hi) in zip(pixels, _token_ranges(exp)):
        colour = jet(np.clip((px - lo) / (hi - lo), 0.0, 1.0))[..., :3].astype(np.float32)
        pic = base.copy()
        pic[heat] = (1 - _ALPHA) * base[heat] + _ALPHA * colour[heat]
        pic[pruned] = 0.3 * base[pruned] + 0.7 * hatch[pruned]
        out.append(pic)
    return out


def _show_token(token: str, limit: int = 40) -> str:
    """A token for a title: quoted (leading spaces visible), newlines shown as `\\n`, cut at `limit` characters."""
    s = str(token).replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
    if len(s) > limit:
        s = s[: limit - 1] + "…"
    return f"'{s}'"


def _pruned_legend(exp: Any) -> str:
    rows, cols = exp.grid
    n = int(exp.pruned.sum())
    return (f"grid {rows}x{cols}; {n} pruned cell{'s' if n != 1 else ''} (grey hatching)" if n
            else f"grid {rows}x{cols}; no pruned cells")


def _small_png(fig: Any) -> bytes:
    """A figure as a 256-colour PNG (octree palette, Floyd-Steinberg dithered): a third of the RGB file's size."""
    from PIL import Image

    with Image.open(io.BytesIO(figure_png(fig, dpi=_DPI))) as img:
        rgb = img.convert("RGB")
    palette = rgb.quantize(256, method=Image.Quantize.FASTOCTREE)
    return image_png(rgb.quantize(palette=palette, dither=Image.Dither.FLOYDSTEINBERG))


def _overlay_png(exp: Any, i: int, picture: np.ndarray, lo: float, hi: float) -> bytes:
    import matplotlib
    from matplotlib.patches import Rectangle

    plt = pyplot()
    h, w = picture.shape[:2]
    left, top, right, bottom = OVERLAY_MARGINS
    fw, fh = w + left + right, h + top + bottom
    fig = plt.figure(figsize=(fw / _DPI, fh / _DPI), dpi=_DPI)
    ax = fig.add_axes((left / fw, bottom / fh, w / fw, h / fh))
    ax.imshow(picture, interpolation="nearest")
    ax.set_axis_off()
    cax = fig.add_axes(((left + w + 10) / fw, bottom / fh, 12 / fw, h / fh))
    bar = matplotlib.cm.ScalarMappable(norm=matplotlib.colors.Normalize(lo, hi), cmap="jet")
    fig.colorbar(bar, cax=cax)
    cax.tick_params(labelsize=7)
    title = f"{i}: {_show_token(exp.tokens[i])}  (answer token {int(exp.targets[i])})"
    fig.text(left / fw, 1 - 6 / fh, plain_text(title), ha="left", va="top", fontsize=9)
    if exp.pruned.any():
        fig.add_artist(Rectangle((left / fw, 5 / fh), 14 / fw, 12 / fh, transform=fig.transFigure, hatch="////",
                                 facecolor="0.55", edgecolor="0.3", linewidth=0.5))
    fig.text((left + 20) / fw, 6 / fh, _pruned_legend(exp), ha="left", va="bottom", fontsize=7)
    return _small_png(fig)


def _caption_lines(exp: Any, width: int) -> list[str]:
    lines = []
    for label, text in (("prompt", exp.prompt), ("answer", exp.answer)):
        wrapped = textwrap.wrap(f"{label}: {' '.join(str(text).split())}", width) or [f"{label}:"]
        if len(wrapped) > 6:
            wrapped = wrapped[:5] + [wrapped[5][: width - 1] + "…"]
        lines += wrapped
    return lines + ["each panel coloured (jet) by its own min..max; " + _pruned_legend(exp)]


def _summary_png(exp: Any) -> bytes:
    plt = pyplot()
    pictures = _composites(exp, SHEET_SIDE)
    if not pictures:  # no explained token: the image alone
        pictures = [_base_picture(exp, SHEET_SIDE)]
        titles = ["no explained tokens"]
    else:
        titles = [f"{i}: {_show_token(t, 28)}" for i, t in enumerate(exp.tokens)]
    h, w = pictures[0].shape[:2]
    ncols = min(len(pictures), 4)
    nrows = math.ceil(len(pictures) / ncols)
    gap, title_h = 8, 22
    sheet_w = ncols * (w + gap) + gap
    lines = _caption_lines(exp, max(40, sheet_w // 7))
    caption_h = 14 * len(lines) + 10
    sheet_h = nrows * (h + title_h + gap) + gap + caption_h
    fig = plt.figure(figsize=(sheet_w / _DPI, sheet_h / _DPI), dpi=_DPI)
    for k, (pic, title) in enumerate(zip(pictures, titles)):
        r, c = divmod(k, ncols)
        x = gap + c * (w + gap)
        y = sheet_h - (r + 1) * (h + title_h + gap)
        ax = fig.add_axes((x / sheet_w, y / sheet_h, w / sheet_w, h / sheet_h))
        ax.imshow(pic, interpolation="nearest")
        ax.set_axis_off()
        fig.text(x / sheet_w, (y + h + 4) / sheet_h, plain_text(title), ha="left", va="bottom", fontsize=8)
    fig.text(gap / sheet_w, (caption_h - 6) / sheet_h, plain_text("\n".join(lines)), ha="left", va="top",
             fontsize=8, linespacing=1.3)
    return _small_png(fig)


# -- report.html ----------------------------------------------------------------------------------------------------

_CSS = """
body{font-family:sans-serif;margin:1.5em;max-width:1100px;color:#222}
table.meta td{padding:2px 10px 2px 0;vertical-align:top}
pre{white-space:pre-wrap;background:#f4f4f4;padding:6px;margin:0}
.chip{display:inline-block;white-space:pre;padding:2px 4px;margin:2px 1px;border-radius:4px;
font-family:monospace;border:1px solid #bbb}
.plain{background:#eee;color:#777}
.strip span{display:inline-block;white-space:pre;font-family:monospace;padding:1px 2px;margin:1px 0}
.hatch{display:inline-block;width:18px;height:14px;vertical-align:middle;border:1px solid #444;
background:repeating-linear-gradient(45deg,#9e9e9e 0 3px,#616161 3px 6px)}
.bar{display:inline-block;width:160px;height:12px;vertical-align:middle;border:1px solid #444}
section.token{border-top:1px solid #ccc;margin-top:1.2em;padding-top:.6em}
table.scores td{padding:1px 8px 1px 0;font-family:monospace}
"""


# the browser itself refuses anything but the inlined images and the inline style (no scripts, fonts, requests)
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"


def _hex(rgba: Any) -> str:
    r, g, b = (round(255 * float(v)) for v in rgba[:3])
    return f"#{r:02x}{g:02x}{b:02x}"


def _ink(rgba: Any) -> str:
    r, g, b = (float(v) for v in rgba[:3])
    return "#000" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "#fff"


def _chip_text(token: str) -> str:
    return str(token) if str(token).strip() else repr(str(token))


def _fmt(v: Any) -> str:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    return f"{f:.4g}"


def _render_html(exp: Any, overlay_pngs: list[bytes]) -> str:
    import matplotlib

    jet = matplotlib.colormaps["jet"]
    esc = html.escape
    seen = ~exp.pruned
    means = [float(m[seen].mean()) if seen.any() else 0.0 for m in exp.maps]
    lo, hi = (min(means), max(means)) if means else (0.0, 1.0)
    span = hi - lo if hi > lo else 1.0
    first = {}
    for i, t in enumerate(exp.targets.tolist()):
        first.setdefault(int(t), i)

    def scores_of(i: int) -> str:
        cells = "".join(f"<tr><td>{esc(str(name))}</td><td>{esc(_fmt(vals[i]))}</td></tr>"
                        for name, vals in exp.scores.items() if i < len(vals))
        return f'<table class="scores">{cells}</table>' if cells else ""

    chips = []
    for j, tok in enumerate(exp.answer_tokens):
        i = first.get(j)
        if i is None:
            chips.append(f'<span class="chip plain" title="not explained">{esc(_chip_text(tok))}</span>')
            continue
        rgba = jet((means[i] - lo) / span)
        tip = f"token {i}, answer index {j}: mean map value {_fmt(means[i])}"
        tip += "".join(f"; {name} {_fmt(vals[i])}" for name, vals in exp.scores.items() if i < len(vals))
        chips.append(f'<span class="chip" style="background:{_hex(rgba)};color:{_ink(rgba)}" '
                     f'title="{esc(tip)}">{esc(_chip_text(tok))}</span>')
    gradient = ",".join(_hex(jet(k / 8)) for k in range(9))

    sections = []
    for i, (tok, png) in enumerate(zip(exp.tokens, overlay_pngs)):
        rel = exp.text_relevance[i]
        finite = rel[np.isfinite(rel)]
        top = float(np.abs(finite).max()) if finite.size else 0.0
        if top > 0:
            spans = []
            for text, v in zip(exp.text_tokens, rel.tolist()):
                if not math.isfinite(v):
                    colour = "#ccc"
                else:
                    colour = f"rgba({'220,40,40' if v >= 0 else '40,80,220'},{abs(v) / top:.3f})"
                spans.append(f'<span style="background:{colour}" title="{esc(_fmt(v))}">'
                             f'{esc(_chip_text(text))}</span>')
            strip = (f'<p>Text relevance (red positive, blue negative; full colour at |value| = {esc(_fmt(top))}):</p>'
                     f'<div class="strip">{"".join(spans)}</div>')
        else:
            strip = "<p>No text relevance (zero for every text token: the method has no text branch).</p>"
        sections.append(
            f'<section class="token"><h2>Token {i}: <span class="chip">{esc(_chip_text(tok))}</span> '
            f"<small>(answer index {int(exp.targets[i])})</small></h2>"
            f'<img alt="{esc(f"overlay of token {i}")}" src="{png_data_uri(png)}">'
            f"{scores_of(i)}{strip}</section>")

    def dump(v: Any) -> str:
        return esc(json.dumps(_jsonable(v, "value"), indent=2, ensure_ascii=False))

    model = exp.metadata.get("model", "") if isinstance(exp.metadata, Mapping) else ""
    rows, cols = exp.grid
    header = (
        f"<h1>Explanation: {esc(str(exp.method))}</h1>"
        '<table class="meta">'
        f"<tr><td>model</td><td><pre>{dump(model) if not isinstance(model, str) else esc(model)}</pre></td></tr>"
        f"<tr><td>method</td><td><pre>{esc(str(exp.method))}</pre></td></tr>"
        f"<tr><td>config</td><td><pre>{dump(exp.config)}</pre></td></tr>"
        f"<tr><td>prompt</td><td><pre>{esc(str(exp.prompt))}</pre></td></tr>"
        f"<tr><td>answer</td><td><pre>{esc(str(exp.answer))}</pre></td></tr>"
        f"<tr><td>frame</td><td>{rows} x {cols} cells over the box ({esc(', '.join(_fmt(v) for v in exp.box))})"
        f" of the {int(exp.image_size[0])} x {int(exp.image_size[1])} image</td></tr></table>")
    legend = (f'<p><span class="hatch"></span> grey hatching: cells the model never saw (pruned tokens): '
              f"{int(exp.pruned.sum())} of {rows * cols}. Each overlay is coloured (jet) by its own min..max over "
              "the cells the model saw.</p>")
    answer = (f"<h2>Answer tokens</h2><p>{''.join(chips)}</p>"
              f'<p>Chip colour: the token\'s mean map value, <span class="bar" style="background:linear-gradient('
              f'to right,{gradient})"></span> from {esc(_fmt(lo))} to {esc(_fmt(hi))}; grey chips are not '
              "explained.</p>")
    meta = f"<h2>Metadata</h2><pre>{dump(exp.metadata)}</pre>"
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
            f"<title>{esc(f'Explanation: {exp.method}')}</title><style>{_CSS}</style></head><body>"
            f"{header}{answer}{legend}{''.join(sections)}{meta}</body></html>\n")


# -- save / load ----------------------------------------------------------------------------------------------------

def _npz_bytes(exp: Any) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(getattr(exp, k)) for k in ARRAYS})
    return buf.getvalue()


def save_explanation(exp: Any, directory: str | os.PathLike) -> Path:
    """Write an `Explanation`'s folder (see the module docstring); returns the folder.

    The folder is replaced as a whole; an existing folder must hold nothing but the files of an earlier export.

    Raises:
        FileExistsError: `directory` is a file, or a folder with other files.
        OutputDirError: the parent folder cannot be written.
        TypeError: a config or metadata value JSON cannot hold (the message names it), an image that is not PIL.
        ValueError: a non-positive `image_size` or an empty `box`.
    """
    target = Path(directory)
    if target.exists():
        if not target.is_dir():
            raise FileExistsError(f"{target} is a file; an explanation is saved as a folder")
        other = sorted(p.name for p in target.iterdir() if not _is_export_file(p.name))
        if other:
            raise FileExistsError(f"{target} holds files other than an explanation's ({other[:3]}); saving replaces "
                                  "the folder as a whole, so give a new folder or one written by save")
    w, h = exp.image_size
    x0, y0, x1, y1 = exp.box
    if not (int(w) == w > 0 and int(h) == h > 0):
        raise ValueError(f"Explanation.image_size must be a positive (width, height), got {exp.image_size!r}")
    if not (x1 > x0 and y1 > y0 and all(math.isfinite(float(v)) for v in exp.box)):
        raise ValueError(f"Explanation.box must be a finite (x0, y0, x1, y1) with x1 > x0 and y1 > y0, got {exp.box!r}")
    ensure_writable_dir(target.parent)
    image = _rgb_image(exp)
    if image is not None and image.mode not in _PNG_MODES:
        image = image.convert("RGB")
    overlays = overlay_file_names(list(exp.tokens))
    record = _json_record(exp, overlays, image is not None)
    record_text = json.dumps(record, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    plt = pyplot()
    with plt.rc_context({"text.usetex": False, "axes.formatter.use_mathtext": False}):
        pictures = _composites(exp, OVERLAY_SIDE)
        overlay_pngs = [_overlay_png(exp, i, pic, lo, hi)
                        for i, (pic, (lo, hi)) in enumerate(zip(pictures, _token_ranges(exp)))]
        summary = _summary_png(exp)
    report = _render_html(exp, overlay_pngs)
    arrays = _npz_bytes(exp)

    def fill(folder: Path) -> None:
        if image is not None:
            write_bytes_atomic(folder / IMAGE_FILE, image_png(image))
        for name, png in zip(overlays, overlay_pngs):
            write_bytes_atomic(folder / name, png)
        write_bytes_atomic(folder / SUMMARY_FILE, summary)
        write_bytes_atomic(folder / MAPS_FILE, arrays)
        write_text_atomic(folder / JSON_FILE, record_text)
        write_text_atomic(folder / REPORT_FILE, report)

    return replace_dir_atomic(target, fill)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise ValueError(f"explanation file not found: {path}")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ValueError(f"{path} is not an explanation file (expected format {FORMAT!r})")
    missing = [k for k in (*_JSON_KEYS, "arrays", "files") if k not in record]
    if missing:
        raise ValueError(f"{path} lacks the entries {missing}")
    for key, kind in (("config", dict), ("metadata", dict), ("scores", dict), ("files", dict), ("arrays", dict),
                      ("method", str), ("prompt", str), ("answer", str)):
        if not isinstance(record[key], kind):
            raise ValueError(  # noqa: TRY004 - a bad file is a ValueError naming it
                f"{path}: entry {key!r} must be a {kind.__name__}, got {type(record[key]).__name__}")
    for key in ("answer_tokens", "tokens", "text_tokens"):
        value = record[key]
        if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
            raise ValueError(f"{path}: entry {key!r} must be a list of strings")
    for key, n in (("box", 4), ("image_size", 2)):
        value = record[key]
        if (not isinstance(value, list) or len(value) != n
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
            raise ValueError(f"{path}: entry {key!r} must be a list of {n} numbers, got {value!r}")
    for name, vals in record["scores"].items():
        if not isinstance(vals, list) or not all(v is None or isinstance(v, (int, float)) for v in vals):
            raise ValueError(f"{path}: score {name!r} must be a list of numbers (or null)")
    return record


def _read_npz(path: Path, expected: Mapping[str, Any], json_path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise ValueError(f"explanation file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in ARRAYS if k not in npz.files]
            if missing:
                raise ValueError(f"lacks the arrays {missing}")
            arrays = {k: npz[k] for k in ARRAYS}
    except Exception as exc:  # noqa: BLE001 - a damaged zip raises zipfile, zlib, OS or value errors
        raise ValueError(f"cannot read {path}: {exc}") from None
    for k, dtype in ARRAYS.items():
        a = arrays[k]
        if a.dtype != np.dtype(dtype):
            raise ValueError(f"{path}: array {k!r} must be {np.dtype(dtype).name}, got {a.dtype.name}")
        want = expected.get(k, {}).get("shape") if isinstance(expected.get(k), Mapping) else None
        if want is not None and list(a.shape) != list(want):
            raise ValueError(f"{path}: array {k!r} has shape {list(a.shape)}, {json_path.name} says {want}")
    return arrays


def _read_image(path: Path) -> Any:
    if not path.is_file():
        raise ValueError(f"explanation file not found: {path}")
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()
            return img.copy()
    except Exception as exc:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError... for damaged files
        raise ValueError(f"cannot read {path}: {exc}") from None


def load_explanation(directory: str | os.PathLike, cls: type[E]) -> E:
    """Read a folder written by `save_explanation` into `cls` (the `Explanation` class or a subclass).

    `Explanation.load(folder)` is the usual call. Arrays come back bit-exact with their dtypes; tuples of `config`
    and `metadata` come back as lists; `null` scores (non-finite when saved) as NaN.

    Raises:
        ValueError: naming the file that is missing, unreadable, of another format or inconsistent with the others.
    """
    folder = Path(directory)
    json_path = folder / JSON_FILE
    record = _read_json(json_path)
    arrays = _read_npz(folder / MAPS_FILE, record["arrays"], json_path)
    image_name = record["files"].get("image")
    image = _read_image(folder / IMAGE_FILE) if image_name else None
    fields = {k: record[k] for k in ("method", "config", "prompt", "answer", "answer_tokens", "tokens",
                                     "text_tokens", "metadata")}
    fields["scores"] = {k: [float("nan") if v is None else float(v) for v in vals]
                        for k, vals in record["scores"].items()}
    fields["box"] = tuple(float(v) for v in record["box"])
    fields["image_size"] = tuple(int(v) for v in record["image_size"])
    try:
        return cls(**fields, **arrays, image=image)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{folder / MAPS_FILE} and {json_path} do not make an explanation: {exc}") from None
