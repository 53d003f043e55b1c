"""`vlm-tools points`: READ's similarity-as-points for one image and prompt, as JSON + an overlay PNG.

Examples::

    vlm-tools points --model default --image shapes.png --prompt "What shape is in the image?" --query circle \\
        --out out/points
    vlm-tools points --model PATH --image cat.png --prompt "USER: <image>\\nWhere is the cat? ASSISTANT:" \\
        --query cat --answer "The cat is on the sofa." --refine --out out/

Writes `points.json` (`Points.to_dict()` plus the model, image, prompt, the SAM and HF SAM prompts) and
`overlay.png` (the min-max map over the image with the points: positives green, negatives red, neutral grey).
Without `--query` the model's tokenizer must have a `[SEG]` / `<SEG>` token.
"""

from __future__ import annotations

import argparse

from vlm_tools.loading import cli_prompt, load_model

__all__ = ["register_cli"]


def _cmd_points(args: argparse.Namespace) -> int:
    from vlm_tools.core.io import ensure_writable_dir, write_json_atomic
    from vlm_tools.errors import UsageError
    from vlm_tools.interpret.forcing import load_images
    from vlm_tools.interpret.sasp import similarity_points

    out = ensure_writable_dir(args.out)  # before any model loads
    try:
        image = load_images(args.image)[0]
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    model, processor = load_model(args.model, args.dtype)
    prompt = cli_prompt(args.model, processor, args.prompt)
    try:
        pts = similarity_points(model, processor, image, prompt, args.query, answer=args.answer,
                                down_sample=args.down_sample, t_pos=args.t_pos, t_neg=args.t_neg,
                                num_points=args.num_points, refine=args.refine, max_new_tokens=args.max_new_tokens)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    payload = {"model": args.model, "image": str(args.image), "prompt": prompt, **pts.to_dict()}
    sam = pts.to_sam()
    payload["sam"] = {"point_coords": sam["point_coords"].tolist(), "point_labels": sam["point_labels"].tolist()}
    if len(sam["point_labels"]):
        hf = pts.to_hf_sam()
        payload["hf_sam"] = {"input_points": hf["input_points"].tolist(), "input_labels": hf["input_labels"].tolist()}
    write_json_atomic(out / "points.json", payload)
    pts.save_overlay(out / "overlay.png")
    counts = {k: int((pts.labels == v).sum()) for k, v in (("positive", 1), ("negative", 0), ("neutral", -1))}
    print(f"answer {pts.answer!r}; query {pts.query!r}: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    print(f"wrote {out / 'points.json'} and {out / 'overlay.png'}")
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add the `points` verb."""
    p = subparsers.add_parser("points", help="READ similarity-as-points: SAM point prompts from a query token's "
                                             "hidden state", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="'default', 'tiny', 'tiny_next' or an HF model folder")
    p.add_argument("--image", required=True, help="image file")
    p.add_argument("--prompt", required=True, help="question (put in the model's template) or a full prompt with "
                                                    "the image placeholder")
    p.add_argument("--query", default=None, help="a word of the prompt or answer (default: the [SEG] token)")
    p.add_argument("--answer", default=None, help="answer text to force instead of generating one")
    p.add_argument("--down-sample", type=int, default=1, help="bilinear downsampling factor of the map (READ-7B: 2)")
    p.add_argument("--t-pos", type=float, default=0.8, help="positive threshold on the min-max map")
    p.add_argument("--t-neg", type=float, default=0.2, help="negative threshold on the min-max map")
    p.add_argument("--num-points", type=int, default=30)
    p.add_argument("--refine", action="store_true", help="READ's discrete-to-continuous refinement of the points")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--out", default="out/points", help="output folder")
    p.set_defaults(func=_cmd_points)
