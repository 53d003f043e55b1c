"""Time of `tam`, `arc` and `msea` (3 scales) per explained answer on the default model, relative to one `generate`.

Usage: PYTHONPATH=. python benchmarks/tam_msea_timing.py [--reps 5] [--threads 2]
Each method run builds a fresh `ExplainContext`, so its clean teacher-forced pass is included in its time.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from PIL import Image

    from vlm_tools._registry import get_explainer
    from vlm_tools.assets.data import load_shapes_vqa
    from vlm_tools.assets.default_model import load_default
    from vlm_tools.interpret.base import ExplainContext, ExplainSample
    from vlm_tools.interpret.forcing import as_wrapped, generate_answers
    from vlm_tools.loading import format_prompt

    model, processor = load_default(verbose=False)
    item = load_shapes_vqa("quick")[0]
    image = Image.open(item["image"]).convert("RGB")
    prompt = format_prompt(processor, item["question"])

    def timed(fn):
        fn()  # warm-up
        ts = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        print(f"  {[round(t, 3) for t in ts]}", flush=True)
        return statistics.median(ts)

    with torch.inference_mode(), as_wrapped(model) as wrapped:
        answer = generate_answers(wrapped, processor, [image], [prompt], max_new_tokens=args.max_new_tokens)[0]
        t_gen = timed(lambda: generate_answers(wrapped, processor, [image], [prompt],
                                               max_new_tokens=args.max_new_tokens))

        def method(name, **cfg):
            info = get_explainer(name)
            explainer = info.cls(info.config_cls(**cfg))

            def run():
                ctx = ExplainContext(wrapped, processor,
                                     [ExplainSample(image, prompt, answer, torch.arange(len(answer)))])
                return explainer.attribute(ctx)
            return run

        rows = {
            "tam": timed(method("tam")),
            "arc": timed(method("arc")),
            "msea (1, 1.5, 2)": timed(method("msea")),
            "tam @1.5 (msea scales=(1.5,))": timed(method("msea", scales=(1.5,))),
            "tam @2 (msea scales=(2,))": timed(method("msea", scales=(2.0,))),
        }
    tam = rows["tam"]
    print(f"cpu capability {torch.backends.cpu.get_cpu_capability()}, threads {torch.get_num_threads()}, "
          f"answer {len(answer)} tokens {processor.tokenizer.decode(answer)!r}, median of {args.reps}")
    print(f"{'generate':34s} {t_gen * 1e3:8.1f} ms  {1.0:5.2f} x generate")
    for name, t in rows.items():
        print(f"{name:34s} {t * 1e3:8.1f} ms  {t / t_gen:5.2f} x generate  {t / tam:5.2f} x tam")
    per_scale = tam + rows["tam @1.5 (msea scales=(1.5,))"] + rows["tam @2 (msea scales=(2,))"]
    print(f"msea / (sum of the three single-scale maps) = {rows['msea (1, 1.5, 2)'] / per_scale:.3f}")


if __name__ == "__main__":
    main()
