"""`vlm-tools demo`: every registered pruning method at three budgets, measured on one model.

With the default model (`--model default`): answers the ShapesVQA quick subset with each method and budget and
writes `out/demo/` (results table as Markdown/CSV/JSON, and `report.html` with the kept-token masks on real
photos). With `--model tiny`: a tiny random LLaVA built offline in a second, to check the pipeline end to end.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

__all__ = ["DemoRow", "run_tiny_demo", "run_demo", "format_table", "register_cli", "pruning_methods"]


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


def pruning_methods() -> list[str]:
    """Registered token-selecting methods (modifiers and the `none` reference excluded)."""
    from vlm_tools._registry import list_methods

    return [m.name for m in list_methods() if m.kind != "modifier" and m.name != "none"]


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


def _write_rows(rows: list[DemoRow], out: Path, meta: dict) -> None:
    import csv
    import io

    from vlm_tools.core.io import write_text_atomic

    write_text_atomic(out / "results.md", format_table(rows) + "\n")
    write_text_atomic(out / "results.json", json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=2))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(asdict(rows[0])))
    w.writeheader()
    w.writerows(asdict(r) for r in rows)
    write_text_atomic(out / "results.csv", buf.getvalue())


def run_demo(model: str = "default", out_dir: str = "out/demo", **kw) -> list[DemoRow]:
    """Run the demo on `model` ("default" or "tiny"); returns the table rows and writes them under `out_dir`."""
    t0 = time.perf_counter()
    if model == "tiny":
        rows = run_tiny_demo()
        _write_rows(rows, Path(out_dir), {"model": "tiny", "seconds": time.perf_counter() - t0})
        return rows
    from vlm_tools.demo_default import run_default_demo

    return run_default_demo(out_dir=out_dir, **kw)


def _cmd_demo(args: argparse.Namespace) -> int:
    kw = {}
    if args.model != "tiny":
        kw = {"limit": args.limit, "batch_size": args.batch_size,
              "methods": args.methods.split(",") if args.methods else None}
    rows = run_demo(args.model, args.out, **kw)
    print(format_table(rows))
    print(f"\nwritten to {args.out}/")
    return 0


def register_cli(sub) -> None:
    p = sub.add_parser("demo", help="run every pruning method at three budgets and print/write a results table")
    p.add_argument("--model", default="default", choices=["default", "tiny"],
                   help="the embedded default model (real weights, built offline on first use) or a tiny random one")
    p.add_argument("--out", default="out/demo", help="output folder")
    p.add_argument("--limit", type=int, default=None, help="answer only the first N questions")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--methods", default=None, help="comma-separated subset of methods (default: all)")
    p.set_defaults(func=_cmd_demo)
