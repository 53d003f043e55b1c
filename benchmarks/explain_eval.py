"""Attribution methods on the default model (DINOv2-S + SmolLM2-135M, 64 image tokens): `vlm-tools explain-eval`.

Runs every registered method of `METHODS` (msea with both ARC weightings, arc with both variants, tam,
integrated_gradients with 16 steps, occlusion, attention_rollout, random, center; a method that is not registered is
skipped with a printed note) over the first `--limit` shape / colour questions of the `shapes_vqa` quick split
(masks: the shape; explained token: the shape / colour word when the answer holds it) and the first
`--photos-limit` `photos_yesno` items with a box (boxes; the default model is near chance on photos, so that
table is a sanity check of the maps), through `vlm_tools.interpret.evaluation` (the library behind the CLI verb),
and writes the tables into `benchmarks/RESULTS.md` (section `explain_eval`) and `--out` (comparison.md / .csv /
.json).

    python benchmarks/explain_eval.py                  # the recorded run (sized for < 15 min on 2 CPU cores)
    python benchmarks/explain_eval.py --limit 4 --photos-limit 2 --no-results   # smoke test

Size (the defaults): 4 shapes questions and 2 photos, deletion / insertion (4 steps: one clean pass and one batched
pass of 8 rows per answer and method) on the first 2 of each. Measured per answer on the 2-core machine (process CPU
seconds, `torch.set_num_threads(2)`, on a busy machine): explain random ~4, tam / arc ~3, msea ~12,
attention_rollout ~22, occlusion ~50, integrated_gradients ~82 at 32 steps (hence 16 steps here, ~41); the two
curves ~10 at 4 steps (~20 at 8). That is ~1,350 CPU seconds, about 11-13 minutes on 2 idle cores (3x longer when
the machine is shared). Means over so few answers are coarse; a bigger run:
`--limit 100 --photos-limit 21 --faithfulness-limit 20 --steps 16` (hours).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

#: The method variants of the recorded table, in report order (first: the flagship the claims are about).
METHODS = ("msea[weighting=irrelevance]", "msea[weighting=relevance]", "arc[variant=irrelevance]",
           "arc[variant=relevance]", "tam",
           "integrated_gradients[n_steps=16]", "occlusion", "attention_rollout", "random", "center")
#: Baselines MSEA is compared against on pointing game and Obj-IoU (every non-MSEA method).
CLAIM_METRICS = (("pointing_game", "pointing game"), ("obj_iou", "Obj-IoU"))


def registered_variants(wanted: list[str]) -> list[str]:
    """The variants whose method is registered (a note is printed for each one skipped)."""
    from vlm_tools._registry import EXPLAIN, list_methods

    names = {m.name for m in list_methods(EXPLAIN)}
    keep = []
    for v in wanted:
        name = v.split("[", 1)[0].strip()
        if name in names:
            keep.append(v)
        else:
            print(f"note: {v}: method {name!r} is not registered, skipped")
    return keep


def claim_lines(result, flagship: str = "msea") -> list[str]:
    """Does each `flagship` variant beat tam, arc and every baseline (every non-MSEA row) on pointing game and
    Obj-IoU? As measured."""
    block = result.sets.get("shapes_vqa")
    if block is None:
        return []
    mine_rows = [r for r in block.rows if r.method.split("[", 1)[0] == flagship]
    if not mine_rows:
        return [f"{flagship} was not run: no claim checked."]
    others = [r for r in block.rows if r.method.split("[", 1)[0] != flagship]
    lines = []
    for row in mine_rows:
        for key, label in CLAIM_METRICS:
            mine = getattr(row, key)
            beaten = [r.method for r in others if getattr(r, key) >= mine]
            verdict = ("beats tam, arc and every baseline" if not beaten
                       else f"does NOT beat (ties count) {', '.join(beaten)}")
            lines.append(f"- shapes_vqa {label}, as measured: {row.method} ({mine:.3f}) {verdict}.")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=4, help="shapes_vqa quick shape / colour questions")
    ap.add_argument("--photos-limit", type=int, default=2, help="photos_yesno items with a box")
    ap.add_argument("--faithfulness-limit", type=int, default=2,
                    help="answers per set with deletion / insertion AUC (the first ones)")
    ap.add_argument("--kinds", default="shape,color", help="shapes_vqa question kinds (explained: the word)")
    ap.add_argument("--steps", type=int, default=4, help="deletion / insertion steps")
    ap.add_argument("--batch-size", type=int, default=4, help="samples per explain call")
    ap.add_argument("--methods", default=None, help="comma-separated variants instead of METHODS")
    ap.add_argument("--out", default="out/explain_eval", help="folder for comparison.md / .csv / .json")
    ap.add_argument("--no-results", action="store_true", help="do not write benchmarks/RESULTS.md")
    args = ap.parse_args()

    import torch

    from vlm_tools.assets.default_model import load_default
    from vlm_tools.interpret.evaluation import (
        comparison_markdown,
        eval_items,
        parse_method_specs,
        run_explain_eval,
        split_variants,
        write_comparison,
    )

    wanted = split_variants(args.methods) if args.methods else list(METHODS)
    variants = registered_variants(wanted)
    if not variants:
        raise SystemExit("no registered method to run")
    specs = parse_method_specs(variants)
    t0 = time.perf_counter()
    model, processor = load_default(verbose=False)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()] if args.kinds else None
    items = eval_items("quick", args.limit, photos_limit=args.photos_limit, kinds=kinds)
    result = run_explain_eval(model, processor, items, specs, steps=args.steps, batch_size=args.batch_size,
                              faithfulness_limit=args.faithfulness_limit, on_note=print)
    wall = time.perf_counter() - t0
    result.info.update({"model": "default", "split": "quick", "limit": args.limit, "kinds": kinds,
                        "photos_limit": args.photos_limit, "dtype": "float32", "wall_s": wall,
                        "threads": torch.get_num_threads()})
    Path(args.out).mkdir(parents=True, exist_ok=True)
    write_comparison(result, args.out, title="explain-eval: default model")
    table = comparison_markdown(result)
    print(table)
    print("\n".join(claim_lines(result)))
    print(f"wall time {wall:.0f}s")
    if not args.no_results:
        from _results import write_section

        body = (f"{table}\n" + "\n".join(claim_lines(result))
                + f"\n\nFirst {args.limit} shapes_vqa quick questions of kinds {args.kinds or 'all'}, first "
                  f"{args.photos_limit} photos_yesno items with a box, deletion / insertion on the first "
                  f"{args.faithfulness_limit} of each; answers generated once (greedy) and explained by every method; "
                  f"wall time {wall:.0f} s for the whole run. So few answers give coarse means (a pointing game "
                  f"of 4 answers moves in steps of 0.25): a bigger run is `--limit 100 --faithfulness-limit 20`.\n")
        path = write_section("explain_eval", "Attributions on the default model (explain-eval)", body,
                             dtype="float32")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
