"""`vlm-tools explain-eval`: attribution methods compared on shape masks and photo boxes (`vlm_tools.interpret.evaluation`).

Examples::

    vlm-tools explain-eval --model default --methods msea,msea[weighting=relevance],tam,random,center \\
        --set quick --limit 50 --out out/explain_eval
    vlm-tools explain-eval --model PATH --methods occlusion,integrated_gradients[steps=16] --limit 10 --no-photos \\
        --out out/

Runs every method over the first `--limit` questions of the `shapes_vqa` split (masks: the shape) and the
`photos_yesno` items with a box (reported separately: the default model is near chance on photos, so that table
checks the maps, not the model) and writes `comparison.md`, `comparison.csv` and `comparison.json`: per method the
pointing game, Obj-IoU, deletion AUC (lower is better), insertion AUC (higher is better) and the mean time of
`vlm_tools.explain` per explained answer. A variant `name[key=value;key=value]` sets config fields (a tuple field
takes `;`-separated items).
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["register_cli"]


def _cmd_explain_eval(args: argparse.Namespace) -> int:
    from vlm_tools._registry import EXPLAIN, list_methods
    from vlm_tools.core.io import ensure_writable_dir
    from vlm_tools.errors import UsageError
    from vlm_tools.interpret.evaluation import (
        comparison_markdown,
        eval_items,
        parse_method_specs,
        run_explain_eval,
        write_comparison,
    )
    from vlm_tools.loading import load_model

    try:
        specs = parse_method_specs(args.methods or ",".join(m.name for m in list_methods(EXPLAIN)))
    except KeyError as exc:
        raise UsageError(str(exc.args[0]) if exc.args else str(exc)) from None
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    for name, value in (("--limit", args.limit), ("--photos-limit", args.photos_limit), ("--steps", args.steps),
                        ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            raise UsageError(f"{name} must be a positive integer, got {value}")
    if args.faithfulness_limit is not None and args.faithfulness_limit < 0:
        raise UsageError(f"--faithfulness-limit must be >= 0, got {args.faithfulness_limit}")
    out = ensure_writable_dir(args.out)  # before any model loads
    try:
        kinds = [k.strip() for k in args.kinds.split(",") if k.strip()] if args.kinds else None
        items = eval_items(args.set, args.limit, photos=not args.no_photos, photos_limit=args.photos_limit,
                           kinds=kinds)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    model, processor = load_model(args.model, args.dtype)
    result = run_explain_eval(model, processor, items, specs, steps=args.steps, batch_size=args.batch_size,
                              max_new_tokens=args.max_new_tokens, progress=not args.no_progress,
                              faithfulness_limit=args.faithfulness_limit,
                              on_note=lambda line: print(line, file=sys.stderr))
    result.info.update({"model": args.model, "split": args.set, "limit": args.limit, "dtype": args.dtype})
    paths = write_comparison(result, out, title=f"explain-eval: {args.model}, shapes_vqa {args.set}")
    print(comparison_markdown(result))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add the `explain-eval` verb."""
    p = subparsers.add_parser("explain-eval", help="compare attribution methods: pointing game, Obj-IoU, deletion / "
                                                   "insertion AUC, time",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="'default', 'tiny', 'tiny_next' or an HF model folder")
    p.add_argument("--methods", default=None, help="comma-separated methods or variants name[key=value;...] "
                                                   "(default: every registered attribution method)")
    p.add_argument("--set", default="quick", choices=["quick", "eval1000", "full"], help="shapes_vqa split")
    p.add_argument("--limit", type=int, default=None, help="first N questions of the split (default: all)")
    p.add_argument("--photos-limit", type=int, default=None, help="first N photos_yesno items with a box "
                                                                  "(default: --limit)")
    p.add_argument("--kinds", default=None, help="shapes_vqa question kinds to keep, e.g. shape,color (default: all, "
                                                 "yes/no questions explain their first token)")
    p.add_argument("--no-photos", action="store_true", help="skip photos_yesno")
    p.add_argument("--steps", type=int, default=16, help="deletion / insertion steps")
    p.add_argument("--faithfulness-limit", type=int, default=None,
                   help="deletion / insertion AUC on the first N answers of each set only (default: all)")
    p.add_argument("--batch-size", type=int, default=4, help="samples per explain call")
    p.add_argument("--max-new-tokens", type=int, default=8, help="answer length limit")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--out", default="out/explain_eval", help="output folder")
    p.set_defaults(func=_cmd_explain_eval)
