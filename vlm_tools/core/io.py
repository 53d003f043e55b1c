"""Atomic file writes: a temporary file in the target's folder, flushed and fsync'ed, then renamed into place."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vlm_tools.errors import OutputDirError

__all__ = ["write_bytes_atomic", "write_text_atomic", "write_json_atomic", "pyplot", "figure_png", "write_figure",
           "image_png", "png_data_uri", "ensure_writable_dir", "plain_text", "replace_dir_atomic"]


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


def ensure_writable_dir(path: str | Path) -> Path:
    """Create `path` if needed and check that files can be written in it, before any work is done.

    Raises:
        OutputDirError: the folder cannot be created or written (e.g. read-only, a file in the way).
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-check.", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputDirError(f"cannot write to the output folder {path}: {exc.strerror or exc}") from None
    return path


def plain_text(text: str) -> str:
    """User text for matplotlib without mathtext: `$` is shown as a dollar sign, not parsed as math."""
    return str(text).replace("$", r"\$")


# -- folders ------------------------------------------------------------------------------------------------------

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically with Linux `renameat2(RENAME_EXCHANGE)`; False where the system cannot."""
    import ctypes
    import errno

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EPERM, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def replace_dir_atomic(target: str | Path, fill: Callable[[Path], Any]) -> Path:
    """Write a folder as a set: `fill(tmp)` writes the files into a temporary sibling, which then replaces `target`.

    Readers see the old folder or the whole new one, never a mix: an error (or a kill) inside `fill` leaves `target`
    as it was and removes the temporary (a killed process leaves `.<name>.tmp-*`, which the owner may clean). An
    existing `target` is swapped with the new folder in one `renameat2(RENAME_EXCHANGE)` where the system supports
    it; elsewhere it is first renamed to `.<name>.old-*` (the one moment without `target`), then removed.

    Returns:
        `target`.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private (0o700); the folder gets a normal folder's mode
        fill(tmp)
        if not target.exists():
            os.rename(tmp, target)
        elif _exchange(tmp, target):
            shutil.rmtree(tmp)  # now holds the old folder
        else:
            old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
            os.rename(target, old / target.name)
            os.rename(tmp, target)
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(target.parent)
    return target
