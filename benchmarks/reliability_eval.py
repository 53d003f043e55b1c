"""Grounding reliability on the default model: AUROC / AP for wrong and guessed answers, reliability per budget.

Runs `vlm_tools.interpret.reliability_eval.evaluate` (the `vlm-tools reliability-eval` verb) on a subset sized for a
2-core CPU and writes the `reliability` section of RESULTS.md (and the full JSON next to it under out/).

    python benchmarks/reliability_eval.py --n-shapes 24 --n-photos 20 --n-guess 12 --threads 1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import write_section


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-shapes", type=int, default=24)
    ap.add_argument("--n-photos", type=int, default=20)
    ap.add_argument("--n-guess", type=int, default=12)
    ap.add_argument("--budgets", default="none,16,8,4")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default="out/reliability_eval")
    args = ap.parse_args(argv)

    import torch

    from vlm_tools.assets.default_model import load_default
    from vlm_tools.core.io import write_json_atomic
    from vlm_tools.interpret.reliability_eval import evaluate, render_markdown

    if args.threads:
        torch.set_num_threads(args.threads)
    budgets = tuple(None if b.strip() == "none" else int(b) for b in args.budgets.split(","))
    model, processor = load_default(verbose=False)
    report = evaluate(model, processor, n_shapes=args.n_shapes, n_photos=args.n_photos, n_guess=args.n_guess,
                      budgets=budgets, batch_size=args.batch_size)
    out = Path(args.out)
    write_json_atomic(out / "reliability_eval.json", report, indent=1)
    body = render_markdown(report)
    import os

    load = os.getloadavg()[0]
    body += ("\n\nSubset sized for a shared 2-core CPU: every figure above comes from "
             f"{len(report['items'])} answered questions, so AUROC / AP carry wide intervals (load average "
             f"{load:.1f} when the run ended: other jobs shared the cores, so the wall time overstates the cost).")
    body += ("\n\nA blank or noise image is contrasted with a real mismatched image and with the masked image, so "
             "a guess whose probability the blank image itself raised keeps a positive margin: the score measures "
             "whether the given image moved the answer, not whether the image holds it.")
    write_section("reliability", "Grounding reliability (clean / masked / mismatched passes)", body, dtype="float32")
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
