"""`vlm-tools demo`: the sub-command (the run is :func:`vlm_tools.demo.runner.run_demo`)."""

from __future__ import annotations

import argparse
import sys

__all__ = ["register_cli"]


def _cmd_demo(args: argparse.Namespace) -> int:
    from vlm_tools.core.io import ensure_writable_dir
    from vlm_tools.errors import OutputDirError
    from vlm_tools.demo.report import format_table
    from vlm_tools.demo.runner import run_demo

    try:
        ensure_writable_dir(args.out)  # before loading anything
        rows = run_demo(args.model, args.out, questions=args.questions, full=args.full, batch_size=args.batch_size,
                        methods=args.methods.split(",") if args.methods else None, dtype=args.dtype,
                        answer=args.answer)
    except (OutputDirError, ValueError) as err:
        print(f"vlm-tools demo: {err}", file=sys.stderr)
        return 2
    print(format_table(rows))
    print(f"\nwritten to {args.out}/ (report.html, results.md/csv/json, accuracy_vs_tokens.png)")
    return 0


def register_cli(sub) -> None:
    """Add the ``demo`` sub-command to the ``vlm-tools`` parser."""
    from vlm_tools.demo.runner import ANSWER_MODES, DEFAULT_QUESTIONS, DEMO_MODELS
    from vlm_tools.loading import DTYPES

    p = sub.add_parser("demo", help="run every pruning method at three budgets and print/write a results table",
                       description="Every registered pruning method at three budgets on the same fixed ShapesVQA "
                       "questions, plus a photo gallery of each method's kept tokens; writes results.{md,csv,json}, "
                       "accuracy_vs_tokens.png and report.html.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="default", choices=DEMO_MODELS,
                   help="the embedded default model (real weights, built offline on first use) or a tiny random one")
    p.add_argument("--out", default="out/demo", help="output folder")
    p.add_argument("--questions", type=int, default=None,
                   help="questions per cell: the first N of the 500-question quick subset, the same for every cell "
                   f"(default: {DEFAULT_QUESTIONS['default']} for the default model, {DEFAULT_QUESTIONS['tiny']} for "
                   "the tiny one)")
    p.add_argument("--full", action="store_true", help="answer all 500 questions of the quick subset in every cell")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--methods", default=None, help="comma-separated subset of methods (default: all)")
    p.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="auto: bf16 on CUDA and on CPUs with bf16 units, else fp32 (vlm_tools.loading.auto_dtype)")
    p.add_argument("--answer", default=None, choices=ANSWER_MODES,
                   help="first-token: one forward pass per question (default for --model default); generate: greedy "
                   "generation, first word (default for --model tiny)")
    p.set_defaults(func=_cmd_demo)
