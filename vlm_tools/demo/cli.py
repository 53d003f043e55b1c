"""`vlm-tools demo`: the sub-command (the runs are in :mod:`vlm_tools.demo.runner`)."""

from __future__ import annotations

import argparse

__all__ = ["register_cli"]


def _cmd_demo(args: argparse.Namespace) -> int:
    from vlm_tools.demo.report import format_table
    from vlm_tools.demo.runner import run_demo

    kw = {}
    if args.model != "tiny":
        kw = {"limit": args.limit, "batch_size": args.batch_size,
              "methods": args.methods.split(",") if args.methods else None}
    rows = run_demo(args.model, args.out, **kw)
    print(format_table(rows))
    print(f"\nwritten to {args.out}/")
    return 0


def register_cli(sub) -> None:
    """Add the ``demo`` sub-command to the ``vlm-tools`` parser."""
    p = sub.add_parser("demo", help="run every pruning method at three budgets and print/write a results table")
    p.add_argument("--model", default="default", choices=["default", "tiny"],
                   help="the embedded default model (real weights, built offline on first use) or a tiny random one")
    p.add_argument("--out", default="out/demo", help="output folder")
    p.add_argument("--limit", type=int, default=None, help="answer only the first N questions")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--methods", default=None, help="comma-separated subset of methods (default: all)")
    p.set_defaults(func=_cmd_demo)
