"""`vlm-tools dominance`: MDI / AEI of one image and prompt, before and after pruning, as JSON + PNG.

Examples::

    vlm-tools dominance --model default --image cat.png --prompt "What shape is in the image?" \\
        --method cls_topk --ratios 0.75,0.9,0.95 --out out/dominance
    vlm-tools dominance --model PATH --image cat.png --prompt "USER: <image>\\nDescribe it. ASSISTANT:" --out out/

Writes `dominance.json` (one report per run: the base model first, then the method at each budget) and
`dominance.png` (per-stage MDI / AEI bars; a single run also gets its per-layer chart).
"""

from __future__ import annotations

import argparse
import math

from vlm_tools.loading import cli_prompt, load_model

__all__ = ["register_cli"]


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _cmd_dominance(args: argparse.Namespace) -> int:

    from vlm_tools.analysis import dominance, plot_comparison
    from vlm_tools.analysis.report import report_json
    from vlm_tools.core.io import ensure_writable_dir, write_bytes_atomic
    from vlm_tools.errors import UsageError
    from vlm_tools.interpret.forcing import load_images

    if args.ratios and args.keep:
        raise UsageError("give --ratios or --keep, not both")
    if (args.ratios or args.keep) and not args.method:
        raise UsageError("--ratios / --keep need --method (e.g. --method cls_topk)")
    if args.method and not (args.ratios or args.keep):
        raise UsageError("--method needs a budget: --ratios 0.75,0.9,0.95 or --keep 64")
    if args.boundaries is not None and len(args.boundaries) != 2:
        raise UsageError("--boundaries takes two layer indices a,b (early [0,a), middle [a,b), late [b,L))")
    out = ensure_writable_dir(args.out)  # before any model loads
    try:
        image = load_images(args.image)[0]
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    model, processor = load_model(args.model, args.dtype)
    prompt = cli_prompt(args.model, processor, args.prompt)
    common = {"max_new_tokens": args.max_new_tokens,
              "boundaries": tuple(args.boundaries) if args.boundaries else None}
    runs: list[tuple[str, dict]] = [("base", {})]
    runs += [(f"{args.method} ratio={r}", {"ratio": r}) for r in args.ratios or []]
    runs += [(f"{args.method} keep={k}", {"keep": k}) for k in args.keep or []]
    reports = {}
    for label, budget in runs:
        method = None if label == "base" else args.method
        reports[label] = dominance(model, processor, image, prompt, method, **common, **budget)
        st = reports[label].stages
        print(f"{label:<28} " + "  ".join(f"{n}: MDI {_fmt(s.mdi)} AEI {_fmt(s.aei_text)}" for n, s in st.items())
              + f"  | {reports[label].generated_text!r}")
    payload = {"model": args.model, "image": str(args.image), "prompt": prompt,
               "runs": [{"label": k, **v.to_dict()} for k, v in reports.items()]}
    write_bytes_atomic(out / "dominance.json", report_json(payload))
    if len(reports) == 1:
        reports["base"].plot(out / "dominance.png")
    else:
        plot_comparison(reports, out / "dominance.png")
    print(f"wrote {out / 'dominance.json'} and {out / 'dominance.png'}")
    return 0


def _fmt(v: float) -> str:
    return "n/a" if math.isnan(v) else f"{v:.2f}"


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add the `dominance` verb."""
    p = subparsers.add_parser("dominance", help="text-dominance metrics (MDI / AEI) before and after pruning",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="'default', 'tiny', 'tiny_next' or an HF model folder")
    p.add_argument("--image", required=True, help="image file")
    p.add_argument("--prompt", required=True, help="question (put in the model's template) or a full prompt with "
                                                    "the image placeholder")
    p.add_argument("--method", default=None, help="pruning method to compare against the base model (cls_topk "
                                                  "reproduces the paper)")
    p.add_argument("--ratios", type=_floats, default=None, help="comma-separated fractions removed, e.g. "
                                                                "0.75,0.9,0.95")
    p.add_argument("--keep", type=_ints, default=None, help="comma-separated token budgets instead of --ratios")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--boundaries", type=_ints, default=None, help="stage boundaries a,b (default: thirds)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--out", default="out/dominance", help="output folder")
    p.set_defaults(func=_cmd_dominance)
