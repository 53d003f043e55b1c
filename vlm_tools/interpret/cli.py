"""`vlm-tools explain`: explain a model's answer to one image and prompt, and write the explanation folder.

Examples::

    vlm-tools explain --model default --image cat.png --prompt "What shape is in the image?" --method msea \\
        --out out/explain
    vlm-tools explain --model PATH --image cat.png --prompt "USER: <image>\\nWhat is this? ASSISTANT:" \\
        --method tam --tokens circle --prune cls_topk --keep 64 --out out/explain
    vlm-tools explain --model default --image cat.png --prompt "What colour?" --method random --set seed=3 --out out/

`--tokens` takes answer indices (integers) and/or strings (a word split into several sub-tokens selects them all);
`--set key=value` sets the method's config fields (`vlm-tools methods --kind explain` lists the methods);
`--prune METHOD --keep N` explains the pruned model's answer (its maps cover the kept tokens only). The folder gets
overlay PNGs per token, a summary sheet, `maps.npz`, `explanation.json` and `report.html`.
"""

from __future__ import annotations

import argparse
from contextlib import nullcontext
from typing import Any

from vlm_tools.loading import cli_prompt, load_model

__all__ = ["register_cli", "parse_sets", "parse_tokens", "explain_from_args"]


def parse_sets(items: list[str] | None) -> dict[str, str]:
    """`["key=value", ...]` -> `{key: value}` (values stay strings; the method's config casts them)."""
    from vlm_tools.errors import UsageError

    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--set expects key=value, got {item!r}")
        out[key.strip()] = value
    return out


def parse_tokens(items: list[str] | None) -> list[int | str] | None:
    """`--tokens` values: integers are answer indices, anything else a token string."""
    if not items:
        return None
    out: list[int | str] = []
    for item in items:
        try:
            out.append(int(item))
        except ValueError:
            out.append(item)
    return out


def explain_from_args(args: argparse.Namespace) -> Any:
    """Run the `explain` verb's call (checks, model loading, optional pruning, `vlm_tools.explain`) and return the
    `Explanation` (the verb then saves it)."""
    from vlm_tools._registry import get_explainer, get_method
    from vlm_tools.core.wrapped import attached
    from vlm_tools.errors import UsageError
    from vlm_tools.interpret.api import explain
    from vlm_tools.interpret.forcing import load_images

    try:  # everything that can be checked before a model loads
        info = get_explainer(args.method)
        config = info.config_cls.from_dict(parse_sets(args.set), cast=True, method=args.method).to_dict()
        if args.prune is not None:
            get_method(args.prune)
        image = load_images(args.image)[0]
    except (KeyError, ValueError) as exc:
        raise UsageError(exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)) from None
    budget = {k: v for k, v in (("keep", args.keep), ("ratio", args.ratio)) if v is not None}
    if args.prune is None and budget:
        raise UsageError("--keep / --ratio need --prune METHOD (e.g. --prune cls_topk --keep 64)")
    if args.prune is not None and len(budget) != 1:
        raise UsageError(f"--prune {args.prune} needs one budget: --keep N (tokens kept per image) or --ratio R")
    model, processor = load_model(args.model, args.dtype)
    prompt = cli_prompt(args.model, processor, args.prompt)
    answers = [args.answer] if args.answer is not None else None
    try:
        with attached(model, args.prune, **budget) if args.prune is not None else nullcontext(model) as target:
            return explain(target, processor, image, prompt, args.method, tokens=parse_tokens(args.tokens),
                           answers=answers, max_new_tokens=args.max_new_tokens, **config)
    except (KeyError, ValueError) as exc:  # a bad budget, token, prompt or config value: named in the message
        raise UsageError(exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)) from None


def _cmd_explain(args: argparse.Namespace) -> int:
    from vlm_tools.core.io import ensure_writable_dir

    out = ensure_writable_dir(args.out)  # before any model loads
    exp = explain_from_args(args)
    print(f"answer: {exp.answer!r}")
    print(f"explained tokens: {exp.tokens} (maps {exp.maps.shape[1]}x{exp.maps.shape[2]}, "
          f"{int(exp.pruned.sum())} pruned cells, {exp.metadata.get('time_ms', 0.0):.0f} ms)")
    path = exp.save(out)
    print(f"wrote {path}")
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add the `explain` verb."""
    p = subparsers.add_parser("explain", help="explain a model's answer (per-token image maps, text relevances)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="'default', 'tiny', 'tiny_next' or an HF model folder")
    p.add_argument("--image", required=True, help="image file")
    p.add_argument("--prompt", required=True, help="question (put in the model's template) or a full prompt with "
                                                    "the image placeholder")
    p.add_argument("--method", default="msea", help="attribution method (vlm-tools methods --kind explain)")
    p.add_argument("--tokens", nargs="+", default=None, help="answer tokens to explain: indices and/or strings "
                                                             "(default: every answer token)")
    p.add_argument("--answer", default=None, help="explain this answer instead of generating one")
    p.add_argument("--prune", default=None, help="pruning method to explain the pruned model with (needs --keep "
                                                 "or --ratio)")
    p.add_argument("--keep", type=int, default=None, help="visual tokens kept per image by --prune")
    p.add_argument("--ratio", type=float, default=None, help="fraction of visual tokens removed by --prune")
    p.add_argument("--set", action="extend", nargs="+", default=None, metavar="KEY=VALUE",
                   help="method config fields, e.g. --set scales='1;2' seed=3")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--out", default="out/explain", help="output folder")
    p.set_defaults(func=_cmd_explain)
