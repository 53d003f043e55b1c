"""Default model (DINOv2-S + SmolLM2-135M, 64 image tokens): text dominance before/after cls_topk, and accuracy of
zoo_prune / fastv at three budgets on the shapes_vqa quick subset.

1. MDI / AEI per stage (early / middle / late = thirds of the 30 decoder layers), base model and cls_topk at
   ratio 0.75 / 0.90 / 0.95 (16 / 6 / 3 of 64 tokens kept), mean over `--dominance-n` quick questions
   (greedy, `--dominance-tokens` generated tokens each), as in "When Language Overrules".
2. Accuracy (normalised first word vs the answer) of the unpruned model, zoo_prune (zeroth-order and jacobian)
   and fastv (K=2) keeping 32 / 16 / 8 of the 64 image tokens, on the first `--limit` quick questions
   (all 500 by default).

    python benchmarks/zoo_fastv_default_model.py [--limit 500] [--dominance-n 20] [--json out/default.json]
    python benchmarks/zoo_fastv_default_model.py --untrained --limit 32 --dominance-n 4   # pipeline smoke test

`--untrained` assembles the same towers with a random projector and no LoRA (for checking the pipeline only; its
numbers say nothing about pruning quality).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

KEEPS = (32, 16, 8)
RATIOS = (0.75, 0.90, 0.95)


def _load(untrained: bool):
    if untrained:
        from vlm_tools.assets.default_model import assemble_untrained

        return assemble_untrained(verbose=False)
    from vlm_tools.assets.default_model import load_default

    return load_default(verbose=False)


def answers(runner, processor, items, batch_size: int = 16) -> list[str]:
    """Greedy answers (normalised first word) through `runner` (a model or a WrappedModel)."""
    from PIL import Image

    from vlm_tools.loading import format_prompt
    from vlm_tools.assets.vqa_eval import normalize_answer

    tok = processor.tokenizer
    old, tok.padding_side = tok.padding_side, "left"
    out = []
    try:
        for i in range(0, len(items), batch_size):
            chunk = items[i:i + batch_size]
            batch = processor(images=[Image.open(it["image"]).convert("RGB") for it in chunk],
                              text=[format_prompt(processor, it["question"]) for it in chunk],
                              return_tensors="pt", padding=True)
            with torch.inference_mode():
                seq = runner.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
            texts = tok.batch_decode(seq[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
            out.extend(normalize_answer(t) for t in texts)
    finally:
        tok.padding_side = old
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=500, help="quick questions used for accuracy")
    ap.add_argument("--dominance-n", type=int, default=20, help="questions averaged for MDI / AEI")
    ap.add_argument("--dominance-tokens", type=int, default=4, help="tokens generated per dominance run")
    ap.add_argument("--untrained", action="store_true", help="random projector (pipeline smoke test only)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from PIL import Image

    import vlm_tools
    from vlm_tools.assets.data import load_shapes_vqa
    from vlm_tools.loading import format_prompt
    from vlm_tools.analysis import dominance

    t0 = time.perf_counter()
    model, processor = _load(args.untrained)
    items = load_shapes_vqa("quick")
    res: dict = {"untrained": args.untrained, "dominance": {}, "accuracy": {}}

    # -- 1. text dominance ----------------------------------------------------------------------------------
    runs = [("base", None, {})] + [(f"cls_topk r={r}", "cls_topk", {"ratio": r}) for r in RATIOS]
    for label, method, cfg in runs:
        per = {"early": [], "middle": [], "late": []}
        for it in items[:args.dominance_n]:
            img = Image.open(it["image"]).convert("RGB")
            rep = dominance(model, processor, img, format_prompt(processor, it["question"]), method,
                            max_new_tokens=args.dominance_tokens, **cfg)
            for name, st in rep.stages.items():
                per[name].append((st.mdi, st.aei_text))
        res["dominance"][label] = {name: {"mdi": statistics.mean(v[0] for v in vals),
                                          "aei_text": statistics.mean(v[1] for v in vals)}
                                   for name, vals in per.items()}
        row = res["dominance"][label]
        print(f"{label:<16} " + "  ".join(f"{n}: MDI {row[n]['mdi']:6.2f} AEI {row[n]['aei_text']:5.2f}"
                                          for n in per), flush=True)

    # -- 2. accuracy -----------------------------------------------------------------------------------------
    sub = items[:args.limit]
    refs = [it["answer"].lower() for it in sub]

    def acc(preds):
        return sum(p == r for p, r in zip(preds, refs)) / len(refs)

    res["accuracy"]["none"] = acc(answers(model, processor, sub))
    print(f"{'unpruned':<28} {res['accuracy']['none']:.3f}", flush=True)
    configs = [("zoo_prune", {}), ("zoo_prune", {"estimator": "jacobian"}), ("fastv", {})]
    for name, extra in configs:
        for keep in KEEPS:
            label = f"{name}{'(jacobian)' if extra else ''} keep={keep}"
            with vlm_tools.attached(model, name, keep=keep, **extra) as wrapped:
                res["accuracy"][label] = acc(answers(wrapped, processor, sub))
            print(f"{label:<28} {res['accuracy'][label]:.3f}", flush=True)
    res["questions"] = len(sub)
    res["wall_s"] = time.perf_counter() - t0
    print(f"{len(sub)} questions; wall time {res['wall_s']:.0f}s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
