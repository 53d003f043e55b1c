"""Write a benchmark's section of `benchmarks/RESULTS.md` from the script that measured it.

Each script owns one section, delimited by `<!-- results:NAME:begin -->` / `<!-- results:NAME:end -->` markers;
`write_section` replaces that block (or appends it) and stamps it with the command line, the CPU capability, the
torch version, the dtype and the date, so every figure in RESULTS.md says how and where it was measured.
"""

from __future__ import annotations

import datetime
import platform
import re
import shlex
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"

__all__ = ["RESULTS", "machine_line", "write_section"]


def machine_line(dtype: str | None = None) -> str:
    """One line naming the machine a figure was measured on (CPU capability, cores, torch, dtype, device)."""
    import os

    import torch

    parts = [f"CPU capability {torch.backends.cpu.get_cpu_capability()}", f"{os.cpu_count()} cores",
             f"torch {torch.__version__}", f"threads {torch.get_num_threads()}"]
    if torch.cuda.is_available():
        parts.append(f"GPU {torch.cuda.get_device_name(0)}")
    if dtype:
        parts.append(f"dtype {dtype}")
    parts.append(platform.machine())
    return ", ".join(parts)


def write_section(name: str, title: str, body: str, dtype: str | None = None, path: Path = RESULTS) -> Path:
    """Replace (or append) the section `name` of RESULTS.md with `title` and `body` (Markdown).

    The section starts with the exact command that produced it and the machine line.
    """
    if not re.fullmatch(r"[a-z0-9_\-]+", name):
        raise ValueError(f"section names are lower-case words, got {name!r}")
    script = Path(sys.argv[0]).resolve()
    root = Path(__file__).resolve().parent.parent
    shown = script.relative_to(root).as_posix() if script.is_relative_to(root) else script.name
    cmd = "python " + " ".join(shlex.quote(a) for a in [shown, *sys.argv[1:]])
    stamp = datetime.date.today().isoformat()
    block = (f"<!-- results:{name}:begin -->\n## {title}\n\n```\n{cmd}\n```\n\nMeasured {stamp} on: "
             f"{machine_line(dtype)}.\n\n{body.strip()}\n<!-- results:{name}:end -->")
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    pattern = re.compile(rf"<!-- results:{name}:begin -->.*?<!-- results:{name}:end -->", re.S)
    text = pattern.sub(lambda _m: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)
    return path
