"""Dense linear probe on frozen patch features: do registers give better dense features? (issue 14.4)

Data: easy-vqa's synthetic 64 x 64 images of one coloured shape (`easy-vqa==1.0`, offline). The probe trains on
easy-vqa *training* images and tests on held-out `shapes_vqa` images (the easy-vqa test split of the local benchmark
data); masks come from `vlm_tools.assets.data.shape_mask` (the rule `shapes_vqa` uses), the shape class from the
images' questions. Each image is resized (bicubic) to the model's input size and normalised; a patch is foreground
when more than half of its pixels are (the mask resized the same way, nearest).

Probe: one linear classifier per task on the patch features (scikit-learn `LogisticRegression`, standardised
features), fitted on every training patch: foreground vs background (2 classes) and background / circle /
rectangle / triangle (4 classes). Reported: per-class IoU on the held-out patches and their mean (mIoU), plus the
norm-outlier rate, max/median norm and attention-sink score of each model on the held-out images
(`artifacts.measure_artifacts`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from vlm_tools.core.adapters import get_tower

from . import artifacts
from .student import vit_of

__all__ = ["SHAPES", "ShapeProbeData", "iou_per_class", "linear_probe", "load_shape_probe_data", "probe_features",
           "probe_models", "run_probe"]

SHAPES = ("circle", "rectangle", "triangle")


@dataclass
class ShapeProbeData:
    """Images and per-patch labels of the shape probe.

    Attributes:
        train: `(N, 3, S, S)` normalised training images (easy-vqa train split).
        train_labels: `(N, gh * gw)` patch labels: 0 background, 1 + `SHAPES` index for foreground patches.
        test: held-out images (`shapes_vqa`, the easy-vqa test split).
        test_labels: their patch labels.
        grid: the patch grid.
    """

    train: torch.Tensor
    train_labels: torch.Tensor
    test: torch.Tensor
    test_labels: torch.Tensor
    grid: tuple[int, int]


def _shape_of_images(texts: Sequence[str], answers: Sequence[str], image_ids: Sequence[int]) -> dict[int, int]:
    """The shape of each image from its questions: a shape answer ("what shape is present?" -> circle), the shape
    named by a colour question ("what color is the circle?"), or a yes/no question about a shape ("is there a
    circle?" -> yes, "is there not a circle?" -> no; negations read as such)."""
    out: dict[int, int] = {}
    for text, answer, image in zip(texts, answers, image_ids):
        image = int(image)
        if image in out:
            continue
        if answer in SHAPES:
            out[image] = SHAPES.index(answer)
            continue
        named = [i for i, s in enumerate(SHAPES) if s in text]
        if len(named) != 1:
            continue
        if "color" in text:
            out[image] = named[0]
        elif answer in ("yes", "no"):
            negated = " not " in f" {text} " or text.startswith("is no ")
            if (answer == "yes") != negated:
                out[image] = named[0]
    return out


def _prepare(paths: Mapping[int, str], shapes: Mapping[int, int], ids: Sequence[int], size: int,
             mean: Sequence[float], std: Sequence[float], patch: int) -> tuple[torch.Tensor, torch.Tensor]:
    from PIL import Image

    from vlm_tools.assets.data import shape_mask

    m = torch.tensor(mean).view(3, 1, 1)
    s = torch.tensor(std).view(3, 1, 1)
    images, labels = [], []
    for i in ids:
        rgb = Image.open(paths[i]).convert("RGB")
        mask = shape_mask(np.asarray(rgb))
        x = torch.from_numpy(np.asarray(rgb.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32))
        images.append((x.permute(2, 0, 1) / 255.0 - m) / s)
        big = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((size, size), Image.Resampling.NEAREST))
        frac = torch.nn.functional.avg_pool2d(torch.from_numpy(big > 127).float()[None, None], patch)[0, 0]
        labels.append(torch.where(frac.flatten() > 0.5, 1 + shapes[i], 0))
    return torch.stack(images), torch.stack(labels).long()


def load_shape_probe_data(n_train: int, n_test: int, size: int, patch: int, mean: Sequence[float],
                          std: Sequence[float]) -> ShapeProbeData:
    """The first `n_train` easy-vqa training images (by id) and the first `n_test` held-out `shapes_vqa` images.

    Raises:
        ValueError: if `size` is not a multiple of `patch` or the counts exceed the splits (4000 / 1000 images).
    """
    import easy_vqa

    from vlm_tools.assets.data import ensure_shapes_vqa

    if size % patch:
        raise ValueError(f"image size {size} is not a multiple of the patch size {patch}")
    train_paths = easy_vqa.get_train_image_paths()
    train_shapes = _shape_of_images(*easy_vqa.get_train_questions())
    test_folder = ensure_shapes_vqa(verbose=False)
    test_paths = {int(p.stem): str(p) for p in (test_folder / "images").glob("*.png")}
    test_shapes = _shape_of_images(*easy_vqa.get_test_questions())
    train_ids = sorted(i for i in train_paths if i in train_shapes)
    test_ids = sorted(i for i in test_paths if i in test_shapes)
    if n_train > len(train_ids) or n_test > len(test_ids) or n_train < 1 or n_test < 1:
        raise ValueError(f"the probe has {len(train_ids)} training and {len(test_ids)} held-out images; asked for "
                         f"{n_train} and {n_test}")
    xtr, ytr = _prepare(train_paths, train_shapes, train_ids[:n_train], size, mean, std, patch)
    xte, yte = _prepare(test_paths, test_shapes, test_ids[:n_test], size, mean, std, patch)
    g = size // patch
    return ShapeProbeData(xtr, ytr, xte, yte, (g, g))


@torch.no_grad()
def probe_features(feature_fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                   batch_size: int = 16) -> torch.Tensor:
    """`(N * patches, D)` fp32 patch features of `feature_fn` (`(b, 3, S, S)` -> `(b, patches, D)`)."""
    out = []
    for i in range(0, images.shape[0], batch_size):
        f = feature_fn(images[i:i + batch_size]).float()
        out.append(f.reshape(-1, f.shape[-1]).cpu())
    return torch.cat(out)


def iou_per_class(pred: np.ndarray, target: np.ndarray, n_classes: int) -> list[float]:
    """IoU of each class over all patches (NaN for a class absent from both)."""
    out = []
    for c in range(n_classes):
        inter = np.logical_and(pred == c, target == c).sum()
        union = np.logical_or(pred == c, target == c).sum()
        out.append(float(inter / union) if union else float("nan"))
    return out


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 n_classes: int, seed: int = 0) -> dict:
    """Fit a standardised multinomial logistic regression on patch features and score the held-out patches.

    Returns:
        `{"iou": [per class], "miou": mean over the classes present, "accuracy": patch accuracy}`.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=1.0, random_state=seed))
    clf.fit(train_x.numpy(), train_y.numpy())
    pred = clf.predict(test_x.numpy())
    target = test_y.numpy()
    ious = iou_per_class(pred, target, n_classes)
    return {"iou": ious, "miou": float(np.nanmean(ious)), "accuracy": float((pred == target).mean())}


def probe_models(models: Mapping[str, tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor]]],
                 data: ShapeProbeData, artifact_block: int = -1, outlier_k: float = 3.0,
                 batch_size: int = 16) -> dict[str, dict]:
    """Probe several feature extractors on the same data.

    Args:
        models: name -> `(model measured for artifacts, patch-feature function)`; the model is a ViT or a
            `RegisterStudent` with any test-time-register hooks already attached.
        data: `load_shape_probe_data`.
        artifact_block: block of the norm-outlier measure (pre-final-norm residual stream).
        outlier_k: the outlier rule `norm > k * median` (per image).
        batch_size: images per forward.

    Returns:
        name -> `{"fg_bg": probe, "shape": probe, "outlier_rate", "max_over_median", "sink_score", "seconds"}`.
    """
    out = {}
    for name, (model, fn) in models.items():
        t0 = time.perf_counter()
        ftr = probe_features(fn, data.train, batch_size)
        fte = probe_features(fn, data.test, batch_size)
        ytr, yte = data.train_labels.flatten(), data.test_labels.flatten()
        fg = linear_probe(ftr, (ytr > 0).long(), fte, (yte > 0).long(), 2)
        shape = linear_probe(ftr, ytr, fte, yte, 1 + len(SHAPES))
        ms = [artifacts.measure_artifacts(model, data.test[i:i + batch_size], block=artifact_block, sink_block=-1,
                                          rule="ratio", k=outlier_k, tta_views=0)
              for i in range(0, data.test.shape[0], batch_size)]
        summary = artifacts.summarize(ms)
        out[name] = {"fg_bg": fg, "shape": shape, "outlier_rate": summary["outlier_rate"],
                     "max_over_median": summary["max_over_median"], "sink_score": summary["sink_score"],
                     "seconds": time.perf_counter() - t0,
                     "tower": get_tower(vit_of(model)).spec.family}
    return out


def run_probe(base: nn.Module, *, student: nn.Module | None = None, neurons=None, num_registers: int = 1,
              image_size: int | None = None, n_train: int = 300, n_test: int = 150, artifact_block: int = -1,
              outlier_k: float = 3.0, batch_size: int = 16) -> dict:
    """Probe the base ViT, optionally a distilled `student` of it and test-time registers (`neurons`) on it.

    Returns:
        `{"settings": ..., "models": {"teacher": ..., "ph_reg_student": ..., "test_time_registers": ...}}`.
    """
    from .test_time import attach_test_time_registers

    tower = get_tower(base)
    spec = tower.spec
    size = image_size or spec.image_size
    data = load_shape_probe_data(n_train, n_test, size, spec.patch_size, spec.mean, spec.std)
    models: dict = {"teacher": (base, lambda x: tower.patch_tokens(x))}
    if student is not None:
        models["ph_reg_student"] = (student, student)
    results = probe_models(models, data, artifact_block, outlier_k, batch_size)
    if neurons is not None:
        with attach_test_time_registers(base, neurons, num_registers=num_registers):
            results.update(probe_models({"test_time_registers": (base, lambda x: tower.patch_tokens(x))}, data,
                                        artifact_block, outlier_k, batch_size))
    settings = {"image_size": size, "grid": list(data.grid), "train_images": n_train, "test_images": n_test,
                "train_patches": int(data.train_labels.numel()), "test_patches": int(data.test_labels.numel()),
                "foreground_fraction_test": float((data.test_labels > 0).float().mean()),
                "artifact_block": artifact_block, "outlier_rule": f"norm > {outlier_k} x median (per image)",
                "classes": ["background", *SHAPES]}
    return {"settings": settings, "models": results}
