"""Run every README command that works offline, so the README cannot drift from the code.

Usage: `python scripts/check_readme.py [--list] [--only TEXT] [--readme README.md]`.

What runs:
- every line of a ```bash block (with `\\` continuations) that is not tagged;
- every ```python block whose first line is `# runs offline`.
A command that needs what this machine may not have is tagged at the end of its line (a comment starts after two spaces) and only listed:
`# [gpu]` (a CUDA device), `# [hub]` (a model hub or the internet), `# [long]` (longer than the checker's budget; it
names the test that covers it instead). Commands run from the repository root with `.venv/bin` first on PATH, in a
shell, with `HF_HUB_OFFLINE=1`; each must exit 0 within `--timeout` seconds and print no Python traceback. Outputs go
under `out/` (git-ignored).
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TAGS = ("gpu", "hub", "long")


@dataclass
class Snippet:
    kind: str  # "bash" or "python"
    text: str
    line: int
    tag: str | None


def snippets(readme: Path) -> list[Snippet]:
    """The README's bash commands and offline python blocks, in order."""
    out: list[Snippet] = []
    lines = readme.read_text().splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^```(\w+)\s*$", lines[i])
        if not m:
            i += 1
            continue
        lang, start = m.group(1), i + 1
        j = start
        while j < len(lines) and not lines[j].startswith("```"):
            j += 1
        body = lines[start:j]
        if lang == "bash":
            cmd, first = "", None
            for k, ln in enumerate(body):
                if not cmd and (not ln.strip() or ln.lstrip().startswith("#")):
                    continue
                first = first if cmd else start + k + 1
                cmd += ln.rstrip()
                if cmd.endswith("\\"):
                    cmd = cmd[:-1] + " "
                    continue
                tag = re.search(r"#\s*\[(\w+)\]", cmd)
                text = re.sub(r"\s{2,}#.*$", "", cmd).strip()  # a comment starts after two spaces
                out.append(Snippet("bash", text, first, tag.group(1) if tag else None))
                cmd = ""
        elif lang == "python" and body and body[0].strip() == "# runs offline":
            out.append(Snippet("python", "\n".join(body), start + 1, None))
        i = j + 1
    for s in out:
        if s.tag is not None and s.tag not in TAGS:
            raise SystemExit(f"README line {s.line}: unknown tag [{s.tag}]; tags: {', '.join(TAGS)}")
    return out


def bin_dir() -> Path:
    """The folder of the environment's executables: the repository's `.venv/bin` when there is one (what `make`
    creates), else the folder of the Python running this script (an environment made some other way)."""
    venv = ROOT / ".venv" / "bin"
    return venv if (venv / "python").exists() else Path(sys.executable).parent


def failed_output(text: str) -> bool:
    """Whether a command's output shows a Python exception: lmms-eval catches errors of a run, logs a traceback and
    still exits 0, so the exit status alone does not tell."""
    return "Traceback (most recent call last)" in text or "Error during evaluation" in text


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(s: Snippet, timeout: float) -> tuple[bool, float, float, str]:
    """Run one snippet; returns (passed, wall seconds, CPU seconds of its processes, the output's tail)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               PATH=f"{bin_dir()}{os.pathsep}{os.environ.get('PATH', '')}")
    if s.kind == "bash":
        argv = ["bash", "-euo", "pipefail", "-c", s.text]
    else:
        argv = [str(bin_dir() / "python"), "-c", s.text]
    t0, c0 = time.perf_counter(), _children_cpu()
    try:
        proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, time.perf_counter() - t0, _children_cpu() - c0, f"timed out after {timeout:.0f} s"
    text = proc.stdout + proc.stderr
    passed = proc.returncode == 0 and not failed_output(text)
    return passed, time.perf_counter() - t0, _children_cpu() - c0, text[-2000:]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--readme", default=str(ROOT / "README.md"))
    ap.add_argument("--list", action="store_true", help="only list the commands and their tags")
    ap.add_argument("--only", default=None, help="run only the snippets containing this text")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per command")
    args = ap.parse_args(argv)
    items = snippets(Path(args.readme))
    failed = 0
    for s in items:
        code = [ln for ln in s.text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
        label = (f"python: {code[0]}" if s.kind == "python" and code else s.text.splitlines()[0])[:110]
        if s.tag is not None:
            print(f"  [{s.tag:4}] line {s.line}: {label}")
            continue
        if args.list or (args.only and args.only not in s.text):
            print(f"  [run ] line {s.line}: {label}")
            continue
        ok, secs, cpu, tail = run(s, args.timeout)
        print(f"  [{'ok' if ok else 'FAIL':4}] line {s.line}: {label}  ({secs:.1f} s wall, {cpu:.1f} s CPU)", flush=True)
        if not ok:
            failed += 1
            print("    " + tail.replace("\n", "\n    "))
    print(f"{failed} failed" if failed else "all README commands that run offline passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
