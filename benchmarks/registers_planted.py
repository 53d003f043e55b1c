"""Planted-artifact check for register distillation (issue 6).

A tiny random-init timm ViT gets position-locked high-norm tokens (``vlm_tools.registers.synthetic``: a trigger
added to the position embedding of 3 of its 64 cells and one MLP neuron of block 1 rewired to write a vector
20x the median token norm there). The artifact metric (``n > 3 * median`` at a block output) must flag exactly those
cells; a short PH-Reg distillation
(TTA teacher, registers + unlocked groups) must lower the outlier rate on held-out photos. Reports the metric at
several checkpoints, for the default unlocked groups and for a registers + last-block-only ablation, plus step time
relative to one teacher forward.

Run (CPU, about 1-2 minutes; images from scikit-image and matplotlib, nothing downloaded):

    python benchmarks/registers_planted.py --out out/registers_planted
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

TRAIN = ["astronaut", "chelsea", "coffee", "hubble_deep_field", "immunohistochemistry", "retina", "rocket",
         "colorwheel", "camera", "brick", "grass", "gravel", "moon", "clock"]
HELD_OUT = ["grace_hopper", "motorcycle_left", "motorcycle_right", "cell", "coins", "page"]
MODEL_KW = {"img_size": 64, "patch_size": 8, "embed_dim": 64, "depth": 4, "num_heads": 2, "num_classes": 0}
CELLS = [9, 30, 45]


def _image(name: str) -> Image.Image:
    import skimage.data as skd

    if name == "grace_hopper":
        from matplotlib import cbook

        with cbook.get_sample_data("grace_hopper.jpg") as f:
            arr = np.asarray(Image.open(f).convert("RGB"))
    elif name.startswith("motorcycle_"):
        left, right, _ = skd.stereo_motorcycle()
        arr = left if name.endswith("left") else right
    else:
        arr = getattr(skd, name)()
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, -1)
    im = Image.fromarray(np.asarray(arr)[..., :3].astype(np.uint8))
    im.thumbnail((160, 160), Image.Resampling.BICUBIC)
    return im


def write_images(folder: Path, names: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        _image(n).save(folder / f"{n}.png")
    return folder


def measure(model, pixels, block: int, tta_views: int = 10) -> dict:
    """Metrics at a block output: outlier rate by ``n > 3 * median`` (and by the MAD rule, k = 5), max/median..."""
    from vlm_tools.registers import artifacts

    m = artifacts.measure_artifacts(model, pixels, block=block, rule="ratio", k=3.0, tta_views=tta_views)
    s = artifacts.summarize([m])
    s["outlier_rate_mad5"] = float(artifacts.outlier_mask(m.norms, "mad", 5.0).float().mean())
    s["flagged_cells"] = sorted(int(i) for i in torch.nonzero(m.outliers.flatten(1).any(0)).flatten())
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in s.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="out/registers_planted")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 avoids stalls on a shared CPU)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import timm
    from safetensors.torch import save_file

    from vlm_tools.registers import artifact_report, distill, load_student, student_from_checkpoint, synthetic
    from vlm_tools.registers.data import open_source, preprocess

    out = Path(args.out)
    train_dir = write_images(out / "train", TRAIN)
    eval_dir = write_images(out / "held_out", HELD_OUT)
    torch.manual_seed(args.seed)
    model = timm.create_model("test_vit", pretrained=False, **MODEL_KW).eval()
    norm = ((0.5,) * 3, (0.5,) * 3)

    def batch(folder):
        src = open_source(folder)
        return torch.stack([preprocess(src.load(i), 64, *norm) for i in range(len(src))])

    train_px, eval_px = batch(train_dir), batch(eval_dir)
    results: dict = {"command": "python benchmarks/registers_planted.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()), "model": MODEL_KW, "cells": CELLS}
    results["clean"] = {"block1": measure(model, eval_px, 1), "last": measure(model, eval_px, -1)}
    planted = synthetic.plant_position_outliers(model, train_px, cells=CELLS, block=1, trigger_scale=1.5, gain=20.0)
    results["planted"] = {"block1": measure(model, eval_px, 1), "last": measure(model, eval_px, -1),
                          "planted_cells": planted.cells}
    weights = out / "planted_vit.safetensors"
    save_file(model.state_dict(), str(weights))

    variants = {"default_unlock": ("registers", "pos_embed", "patch_embed", "last_block"),
                "registers_last_block": ("registers", "last_block")}
    every = max(1, args.steps // 8)
    for name, unlock in variants.items():
        run_dir = out / name
        cfg = distill.DistillConfig(
            backbone="timm:test_vit", weights=str(weights), model_kwargs=MODEL_KW, images=str(train_dir),
            out=str(run_dir), batch_size=8, n_views=10, num_registers=16, unlock=unlock, epochs=100,
            max_steps=args.steps, lr=args.lr, lr_min=1e-4, checkpoint_every=every, keep_checkpoints=100,
            seed=args.seed, num_workers=0)
        t0 = time.perf_counter()
        summary = distill.run_distillation(cfg, progress=False, overwrite=True)
        wall = time.perf_counter() - t0
        curve = []
        for ck in sorted((run_dir / "checkpoints").glob("step_*.pt")):
            s = student_from_checkpoint(ck, model)
            r = measure(s, eval_px, -1, tta_views=0)
            curve.append({"step": int(ck.stem.split("_")[1]), "outlier_rate": r["outlier_rate"],
                          "max_over_median": r["max_over_median"]})
        student = load_student(run_dir / "student", model)
        log = [json.loads(ln) for ln in (run_dir / "train_log.jsonl").read_text().splitlines()]
        results[name] = {
            "unlock": list(unlock), "block1": measure(student, eval_px, 1), "last": measure(student, eval_px, -1),
            "curve": curve, "loss_first": round(log[0]["loss"], 4), "loss_last": round(log[-1]["loss"], 4),
            "seconds_per_step": round(summary.seconds_per_step, 4),
            "teacher_forward_seconds": round(summary.teacher_forward_seconds, 5),
            "step_over_teacher_forward": round(summary.step_over_teacher_forward, 1), "wall_seconds": round(wall, 1)}
        if name == "default_unlock":
            artifact_report({"planted": model, "student": student}, eval_dir, out / "report", block=-1,
                            rule="ratio", k=3.0, tta_views=10)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
