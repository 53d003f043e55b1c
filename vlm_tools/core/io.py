"""Atomic file writes: a temporary file in the target's folder, flushed and fsync'ed, then renamed into place."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["write_bytes_atomic", "write_text_atomic", "write_json_atomic", "pyplot", "figure_png", "write_figure",
           "image_png", "png_data_uri", "UnwritableFolderError", "ensure_writable_dir"]


def write_bytes_atomic(path: str | Path, data: bytes, mode: int = 0o644) -> Path:
    """Write `data` to `path` atomically (readers see the old file or the whole new one, never a part)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


class UnwritableFolderError(OSError):
    """An output folder that cannot be created or written; the message names it and the reason (one line)."""


def ensure_writable_dir(path: str | Path) -> Path:
    """Create `path` (and its parents) if needed and check that a file can be created in it, before any work.

    Raises:
        UnwritableFolderError: it cannot be created or written (e.g. read-only, or a parent is a file).
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-check-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise UnwritableFolderError(f"cannot write to {path}: {reason}") from None
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """`write_bytes_atomic` for UTF-8 text."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | Path, obj: Any, **dumps_kwargs: Any) -> Path:
    """`write_bytes_atomic` for `json.dumps(obj, **dumps_kwargs)` plus a final newline."""
    return write_text_atomic(path, json.dumps(obj, **dumps_kwargs) + "\n")


def pyplot():
    """`matplotlib.pyplot` with the non-interactive Agg backend (matplotlib is optional: a clear error if missing).

    Text drawn from user input should go through `plain_text` (no mathtext): matplotlib parses `$...$` otherwise.
    """
    try:
        import matplotlib
    except ImportError as exc:  # optional dependency
        raise ImportError("plotting needs matplotlib: pip install matplotlib (or vlm_tools[dev])") from exc
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def figure_png(fig, dpi: int = 120) -> bytes:
    """Render a matplotlib figure to PNG bytes and close it."""
    import io

    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=dpi)
    finally:
        pyplot().close(fig)
    return buf.getvalue()


def write_figure(fig, path: str | Path, dpi: int = 120) -> Path:
    """Write a matplotlib figure as a PNG, atomically, and close it."""
    return write_bytes_atomic(path, figure_png(fig, dpi))


def image_png(image) -> bytes:
    """PNG bytes of a PIL image (for `write_bytes_atomic` or `png_data_uri`)."""
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def png_data_uri(png: bytes) -> str:
    """`data:image/png;base64,...` for inlining a PNG in a self-contained HTML report."""
    import base64

    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")
