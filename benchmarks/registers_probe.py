"""Downstream evidence for registers (issue 14.4): a dense linear probe on frozen patch features.

For two backbones, three feature extractors are probed on the same data (`vlm_tools.registers.probe`: per-patch
logistic regression fitted on easy-vqa training images, scored on held-out `shapes_vqa` images; foreground vs
background and background / circle / rectangle / triangle), with each one's norm-outlier rate (`norm > 3 x median`,
per image), max/median norm and attention-sink score (max head-mean CLS->patch attention, last block):

* the teacher (the frozen ViT);
* a PH-Reg student distilled from it here, briefly (the steps and minutes are in the table);
* test-time registers on the teacher (neurons found on the training images; no training).

Backbones: the default model's DINOv2-S/14 (its VLM tower, 112 px, 8 x 8 patches) and the planted-artifact ViT of
`benchmarks/registers_planted.py` (random-init timm `test_vit`, 64 px, position-locked outliers at 3 cells).

Run (CPU, one thread; 34 minutes measured on the shared 2-core machine at load average ~9, of which 10.4 min is the
DINOv2-S distillation):

    python benchmarks/registers_probe.py --out out/registers_probe
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

PLANTED_KW = {"img_size": 64, "patch_size": 8, "embed_dim": 64, "depth": 4, "num_heads": 2, "num_classes": 0}
CELLS = [9, 30, 45]


def write_images(data, folder: Path, mean, std) -> Path:
    """The probe's (normalised) training images as PNGs: the unlabeled distillation set."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    m, s = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    for i, x in enumerate(data.train):
        arr = ((x * s + m).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        Image.fromarray(arr).save(folder / f"{i:04d}.png")
    return folder


def distil(teacher, backbone, weights, model_kwargs, images, out, args, **kw):
    from vlm_tools.registers import distill

    cfg = distill.DistillConfig(backbone=backbone, weights=weights, model_kwargs=model_kwargs or {},
                                images=str(images), out=str(out), batch_size=8, n_views=10, num_workers=0,
                                checkpoint_every=10_000, seed=args.seed, **kw)
    t0 = time.perf_counter()
    summary = distill.run_distillation(cfg, teacher=teacher, progress=False, overwrite=True)
    return summary, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="out/registers_probe")
    ap.add_argument("--train-images", type=int, default=300)
    ap.add_argument("--test-images", type=int, default=150)
    ap.add_argument("--dinov2-steps", type=int, default=40)
    ap.add_argument("--planted-steps", type=int, default=150)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

    import timm
    from safetensors.torch import save_file

    from vlm_tools.core.adapters import get_tower
    from vlm_tools.core.io import write_json_atomic
    from vlm_tools.registers import find_register_neurons, load_backbone, load_student, synthetic
    from vlm_tools.registers.probe import load_shape_probe_data, run_probe

    out = Path(args.out)
    rows, results = [], {}

    # -- DINOv2-S: the default model's vision tower at 112 px -------------------------------------------------
    base = load_backbone("default")
    spec = get_tower(base).spec
    data = load_shape_probe_data(args.train_images, args.test_images, spec.image_size, spec.patch_size, spec.mean,
                                 spec.std)
    images = write_images(data, out / "dinov2_train_images", spec.mean, spec.std)
    summary, secs = distil(base, "default", None, None, images, out / "dinov2_run", args, max_steps=args.dinov2_steps,
                           epochs=100, lr=1e-4, num_registers=16)
    student = load_student(out / "dinov2_run" / "student", base)
    t0 = time.perf_counter()
    with torch.no_grad():
        norms = get_tower(base).tokens(data.train[:100], -2).norm(dim=-1)
    tau = float(norms.flatten().quantile(0.99))
    neurons = find_register_neurons(base, [data.train[i:i + 20] for i in range(0, 100, 20)], threshold=tau,
                                    detect_block=-2, top_k=10, highest_layer=8)
    find_s = time.perf_counter() - t0
    res = run_probe(base, student=student, neurons=neurons, n_train=args.train_images, n_test=args.test_images,
                    artifact_block=-2)
    res["distill"] = {"steps": summary.steps, "minutes": secs / 60, "batch": 8, "views": 10, "lr": 1e-4,
                      "registers": 16, "loss_final": summary.final_loss}
    res["test_time_registers"] = {"tau": tau, "rule": "tau = 99th percentile of block -2 token norms",
                                  "layers": {int(k): v for k, v in neurons.layers.items()}, "seconds": find_s}
    results["dinov2_s"] = res
    rows.append(("DINOv2-S (default model tower, 112 px)", res, secs, find_s))

    # -- the planted-artifact ViT --------------------------------------------------------------------------
    torch.manual_seed(args.seed)
    vit = timm.create_model("test_vit", pretrained=False, **PLANTED_KW).eval()
    pspec = get_tower(vit).spec
    pdata = load_shape_probe_data(args.train_images, args.test_images, 64, 8, pspec.mean, pspec.std)
    synthetic.plant_position_outliers(vit, pdata.train[:64], cells=CELLS, block=1, trigger_scale=1.5, gain=20.0)
    weights = out / "planted_vit.safetensors"
    weights.parent.mkdir(parents=True, exist_ok=True)
    save_file(vit.state_dict(), str(weights))
    pimages = write_images(pdata, out / "planted_train_images", pspec.mean, pspec.std)
    psummary, psecs = distil(vit, "timm:test_vit", str(weights), PLANTED_KW, pimages, out / "planted_run", args,
                             max_steps=args.planted_steps, epochs=100, lr=3e-3, lr_min=1e-4, num_registers=16)
    pstudent = load_student(out / "planted_run" / "student", vit)
    t0 = time.perf_counter()
    with torch.no_grad():
        pn = get_tower(vit).tokens(pdata.train[:100], -1).norm(dim=-1)
    ptau = 5 * float(pn[:, 1:].median())
    pneurons = find_register_neurons(vit, pdata.train[:100], threshold=ptau, detect_block=-1, top_k=1)
    pfind_s = time.perf_counter() - t0
    pres = run_probe(vit, student=pstudent, neurons=pneurons, n_train=args.train_images, n_test=args.test_images,
                     artifact_block=-1)
    pres["distill"] = {"steps": psummary.steps, "minutes": psecs / 60, "batch": 8, "views": 10, "lr": 3e-3,
                       "registers": 16, "loss_final": psummary.final_loss}
    pres["test_time_registers"] = {"tau": ptau, "rule": "tau = 5 x median patch norm at block -1",
                                   "layers": {int(k): v for k, v in pneurons.layers.items()}, "seconds": pfind_s}
    results["planted_vit"] = pres
    rows.append(("planted-artifact ViT (64 px)", pres, psecs, pfind_s))
    write_json_atomic(out / "results.json", results, indent=2)

    names = {"teacher": "teacher", "ph_reg_student": "PH-Reg student", "test_time_registers": "test-time registers"}
    lines = ["| backbone | features | fg/bg mIoU | shape mIoU | IoU bg / circle / rectangle / triangle | outlier "
             "rate | max/median | sink score | cost |", "|---|---|---|---|---|---|---|---|---|"]
    for label, res, secs, find_s in rows:
        for key, r in res["models"].items():
            cost = {"teacher": "0", "ph_reg_student": f"{secs / 60:.1f} min training ({res['distill']['steps']} "
                                                      "steps)",
                    "test_time_registers": f"0 training ({find_s:.0f} s to find the neurons)"}[key]
            iou = " / ".join(f"{v:.3f}" for v in r["shape"]["iou"])
            lines.append(f"| {label} | {names[key]} | {r['fg_bg']['miou']:.3f} | {r['shape']['miou']:.3f} | {iou} "
                         f"| {100 * r['outlier_rate']:.2f} % | {r['max_over_median']:.2f} | {r['sink_score']:.3f} "
                         f"| {cost} |")
    d, p = results["dinov2_s"], results["planted_vit"]
    body = "\n".join(lines) + f"""

Probe: {args.train_images} easy-vqa training images ({d['settings']['train_patches']} patches at 112 px,
{p['settings']['train_patches']} at 64 px), {args.test_images} held-out shapes_vqa images; standardised
multinomial logistic regression per task (scikit-learn). Outlier rate: patches with norm > 3 x the image's median at
block {d['settings']['artifact_block']} (DINOv2-S) / {p['settings']['artifact_block']} (planted), pre-final-norm.

Distillation (CPU, one thread): batch 8, 10 TTA views, 16 registers, PH-Reg's unlocked groups, on the probe's own
training images (no labels); DINOv2-S {d['distill']['steps']} steps at lr 1e-4 ({d['distill']['minutes']:.1f} min),
planted {p['distill']['steps']} steps at lr 3e-3 ({p['distill']['minutes']:.1f} min). Test-time registers: one zero
token; DINOv2-S neurons {d['test_time_registers']['layers']} ({d['test_time_registers']['rule']}, top 10, blocks
<= 8, detect block -2); planted neurons {p['test_time_registers']['layers']} ({p['test_time_registers']['rule']},
top 1).
"""
    print(body)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _results import write_section

    write_section("registers-probe", "Registers: dense linear probe on shape masks (issue 14.4)", body, dtype="fp32")
    print(json.dumps({k: {m: (v["fg_bg"]["miou"], v["shape"]["miou"]) for m, v in r["models"].items()}
                      for k, r in results.items()}))


if __name__ == "__main__":
    main()
