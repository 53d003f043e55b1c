"""`vlm-tools reliability` (and `reliability-eval`): per-token grounding reliability of one answer, as JSON, a PNG token strip and HTML.

Examples::

    vlm-tools reliability --model default --image shapes.png --prompt "What shape is in the image?" --out out/rel
    vlm-tools reliability --model default --image shapes.png --prompt "What color is the shape?" --answer red \\
        --prune cls_topk --keep 8 --out out/rel8

Writes `reliability.json` (tokens, r_t per token, the sentence score and every per-token feature), `strip.png` and
`strip.html` (the answer's tokens coloured from red, guessed, to green, grounded).
"""

from __future__ import annotations

import argparse
import contextlib
import html

__all__ = ["register_cli", "register_eval_cli"]


def _cmd_reliability(args: argparse.Namespace) -> int:
    from vlm_tools.core.io import ensure_writable_dir, write_json_atomic, write_text_atomic
    from vlm_tools.core.wrapped import attached
    from vlm_tools.errors import UsageError
    from vlm_tools.interpret.forcing import load_images
    from vlm_tools.interpret.reliability import Combiner, reliability
    from vlm_tools.loading import cli_prompt, load_model

    if (args.prune is None) != (args.keep is None):
        raise UsageError("--prune METHOD and --keep N go together (e.g. --prune cls_topk --keep 8)")
    if args.keep is not None and args.keep < 1:
        raise UsageError(f"--keep must be a positive number of visual tokens, got {args.keep}")
    out = ensure_writable_dir(args.out)  # before any model loads
    try:
        load_images(args.image)
        if args.mismatched:
            load_images(args.mismatched)
        combiner = Combiner.load(args.combiner) if args.combiner else None
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    model, processor = load_model(args.model, args.dtype)
    prompt = cli_prompt(args.model, processor, args.prompt)
    with contextlib.ExitStack() as stack:  # the pruned wrapper (if any) is removed when the block exits
        target = model
        if args.prune:
            try:
                target = stack.enter_context(attached(model, args.prune, keep=args.keep))
            except (KeyError, ValueError, TypeError) as exc:
                raise UsageError(f"--prune {args.prune} --keep {args.keep}: {exc}") from None
        try:
            result = reliability(target, processor, args.image, prompt, args.answer, mismatched=args.mismatched,
                                 layer=args.layer, combiner=combiner, masked=args.masked,
                                 max_new_tokens=args.max_new_tokens)
        except (ValueError, TypeError) as exc:
            raise UsageError(str(exc)) from None
    payload = {"model": args.model, "image": str(args.image), "prompt": prompt,
               "prune": {"method": args.prune, "keep": args.keep} if args.prune else None, **result.to_dict()}
    write_json_atomic(out / "reliability.json", payload, indent=1)
    result.strip_png(out / "strip.png")
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>reliability</title></head><body>"
            f"<p>{html.escape(prompt)}</p>{result.strip_html()}"
            f"<p>sentence score {result.sentence_score:.3f}</p></body></html>\n")
    write_text_atomic(out / "strip.html", page)
    print(f"answer {result.answer!r}: sentence score {result.sentence_score:.3f}; "
          + " ".join(f"{t}={r:.2f}" for t, r in zip(result.tokens, result.reliability)))
    print(f"wrote {out / 'reliability.json'}, {out / 'strip.png'} and {out / 'strip.html'}")
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add the `reliability` verb."""
    p = subparsers.add_parser("reliability", help="per-token grounding reliability of an answer (clean, masked and "
                                                  "mismatched passes)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="'default', 'tiny', 'tiny_next' or an HF model folder")
    p.add_argument("--image", required=True, help="image file")
    p.add_argument("--prompt", required=True, help="question (put in the model's template) or a full prompt with "
                                                    "the image placeholder")
    p.add_argument("--answer", default=None, help="the answer to score (default: the model's greedy answer)")
    p.add_argument("--mismatched", default=None, help="mismatched image of the same size and mode (default: a "
                                                      "seeded noise image)")
    p.add_argument("--prune", default=None, help="pruning method to run the passes through (e.g. cls_topk)")
    p.add_argument("--keep", type=int, default=None, help="visual tokens kept by --prune")
    p.add_argument("--masked", choices=["attention", "mean_color"], default="attention",
                   help="image-masked pass: attention mask over the image positions, or a mean-colour image")
    p.add_argument("--layer", type=int, default=-1, help="hidden-state layer of the angle feature (-1: last)")
    p.add_argument("--combiner", default=None, help="a Combiner JSON (Combiner.save); default: unsupervised")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--out", default="out/reliability", help="output folder")
    p.set_defaults(func=_cmd_reliability)
    register_eval_cli(subparsers)


def _cmd_reliability_eval(args: argparse.Namespace) -> int:
    import torch

    from vlm_tools.core.io import ensure_writable_dir, write_json_atomic, write_text_atomic
    from vlm_tools.errors import UsageError
    from vlm_tools.interpret.reliability_eval import evaluate, render_markdown
    from vlm_tools.loading import load_model

    budgets = []
    for b in args.budgets.split(","):
        b = b.strip()
        if b == "none":
            budgets.append(None)
        elif b.isdigit() and int(b) > 0:
            budgets.append(int(b))
        else:
            raise UsageError(f"--budgets takes 'none' and positive token counts, e.g. none,16,8,4; got {b!r}")
    out = ensure_writable_dir(args.out)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, processor = load_model(args.model, args.dtype)
    report = evaluate(model, processor, n_shapes=args.n_shapes, n_photos=args.n_photos, n_guess=args.n_guess,
                      budgets=tuple(budgets), batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
    write_json_atomic(out / "reliability_eval.json", report, indent=1)
    text = render_markdown(report)
    write_text_atomic(out / "reliability_eval.md", text + "\n")
    print(text)
    print(f"wrote {out / 'reliability_eval.json'} and {out / 'reliability_eval.md'}")
    return 0


def register_eval_cli(subparsers: argparse._SubParsersAction) -> None:
    from vlm_tools.interpret import reliability_eval

    p = subparsers.add_parser("reliability-eval", help="AUROC / AP of the reliability score for wrong and guessed "
                                                       "answers (shapes_vqa at pruning budgets, photos_yesno, "
                                                       "blank / noise images)",
                              description=reliability_eval.__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="'default' or an HF model folder with a chat template")
    p.add_argument("--n-shapes", type=int, default=48, help="shapes_vqa quick-set questions per budget")
    p.add_argument("--n-photos", type=int, default=42, help="photos_yesno questions (at most 42)")
    p.add_argument("--n-guess", type=int, default=24, help="questions asked about a blank and a noise image")
    p.add_argument("--budgets", default="none,16,8,4", help="cls_topk budgets ('none' = unpruned)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=4)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--out", default="out/reliability_eval", help="output folder")
    p.set_defaults(func=_cmd_reliability_eval)
