"""Local benchmark data, fully offline: ``shapes_vqa`` (easy-vqa test with shape masks) and ``photos_yesno``.

* ``shapes_vqa``: the easy-vqa test split (``easy-vqa==1.0``, MIT; 9,673 questions on 1,000 synthetic 64 x 64
  images of one coloured shape on a plain background). Each image's shape mask is derived from its pixels: pixels
  closer in RGB to the shape colour (the most common non-background colour) than to the background colour (the
  most common colour). Fixed subsets: ``quick`` (500 questions, ``eval_configs/data/shapes_vqa/quick_ids.json``)
  and ``eval1000`` (the default model's 1,000-question evaluation subset; its first 500 are ``quick``).
* ``photos_yesno``: 42 hand-written yes/no questions (21 yes, 21 no) about real photos shipped with scikit-image,
  scikit-learn and matplotlib, with the bounding box of the object asked about when present
  (``eval_configs/data/photos_yesno/questions.json``; sources and licenses in its README.md).

Images and masks are materialised into the cache (``$VLM_TOOLS_HOME/data``) by :func:`ensure_shapes_vqa` /
:func:`ensure_photos_yesno` (``vlm-tools setup`` calls them); the loaders build the cache on first use.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vlm_tools.assets import convert
from vlm_tools.core.io import image_png, write_bytes_atomic, write_text_atomic

DATA_DIR = Path(__file__).resolve().parents[2] / "eval_configs" / "data"
SHAPES_SPLITS = ("quick", "eval1000", "full")
SHAPE_MASK_RULE = "nearest of background (mode) / shape colour (mode of colours > 48 away), v1"


def _config_file(*parts: str) -> Path:
    path = DATA_DIR.joinpath(*parts)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: the benchmark definitions live in the repository's eval_configs/data folder "
            "(install vlm_tools from a checkout, e.g. `pip install -e .`)"
        )
    return path


def shapes_vqa_ids(split: str = "quick") -> list[int]:
    """Question indices (in ``easy_vqa.get_test_questions()`` order) of a fixed subset.

    Args:
        split: ``"quick"`` (500), ``"eval1000"`` (1,000) or ``"full"`` (all 9,673).
    """
    if split == "full":
        import easy_vqa

        return list(range(len(easy_vqa.get_test_questions()[0])))
    files = {"quick": "quick_ids.json", "eval1000": "eval1000_ids.json"}
    if split not in files:
        raise ValueError(f"unknown shapes_vqa split {split!r}; choose one of {SHAPES_SPLITS}")
    return [int(i) for i in json.loads(_config_file("shapes_vqa", files[split]).read_text())["ids"]]


def shape_mask(rgb: Any) -> Any:
    """Boolean mask of the single shape in an easy-vqa image.

    Args:
        rgb: ``[H, W, 3]`` uint8 array.

    Returns:
        ``[H, W]`` bool array: pixels closer to the shape colour than to the background colour.
    """
    import numpy as np

    pixels = rgb.reshape(-1, 3).astype(np.int32)
    colours, counts = np.unique(pixels, axis=0, return_counts=True)
    order = np.argsort(-counts, kind="stable")
    background = colours[order[0]]
    far = np.abs(colours[order] - background).max(axis=1) > 48
    if not far.any():
        return np.zeros(rgb.shape[:2], dtype=bool)
    shape_colour = colours[order][far][0]
    d_bg = ((pixels - background) ** 2).sum(axis=1)
    d_fg = ((pixels - shape_colour) ** 2).sum(axis=1)
    return (d_fg < d_bg).reshape(rgb.shape[:2])


def _build_shapes(tmp: Path) -> dict[str, Any]:
    import easy_vqa
    import numpy as np
    from PIL import Image

    from vlm_tools.assets.vqa_eval import answer_kind

    texts, answers, image_ids = easy_vqa.get_test_questions()
    paths = easy_vqa.get_test_image_paths()
    mask_pixels = {}
    for image_id, src in sorted(paths.items()):
        write_bytes_atomic(tmp / "images" / f"{image_id}.png", Path(src).read_bytes())
        mask = shape_mask(np.asarray(Image.open(src).convert("RGB")))
        write_bytes_atomic(tmp / "masks" / f"{image_id}.png", image_png(Image.fromarray(mask.astype(np.uint8) * 255)))
        mask_pixels[image_id] = int(mask.sum())
    lines = []
    for qid, (text, answer, image_id) in enumerate(zip(texts, answers, image_ids, strict=True)):
        row = {
            "id": qid,
            "image_id": image_id,
            "image": f"images/{image_id}.png",
            "mask": f"masks/{image_id}.png",
            "question": text,
            "answer": answer,
            "kind": answer_kind(answer),
            "mask_pixels": mask_pixels[image_id],
        }
        lines.append(json.dumps(row) + "\n")
    write_text_atomic(tmp / "questions.jsonl", "".join(lines))
    return {"package": "easy-vqa==1.0", "split": "test", "license": "MIT", "questions": len(texts)}


def ensure_shapes_vqa(force: bool = False, verbose: bool = True, deep: bool = False) -> Path:
    """Materialise ``shapes_vqa`` (images, masks, ``questions.jsonl``) in the cache; returns its folder."""
    return convert.build_folder(
        convert.cache_home() / "data" / "shapes_vqa",
        _build_shapes,
        force=force,
        deep=deep,
        verbose=verbose,
        what="shapes_vqa",
        expect_source={"mask_rule": SHAPE_MASK_RULE},
    )


def load_shapes_vqa(split: str = "quick", with_arrays: bool = False) -> list[dict[str, Any]]:
    """The ``shapes_vqa`` items of a split.

    Args:
        split: ``"quick"`` (500 fixed questions), ``"eval1000"`` or ``"full"`` (9,673).
        with_arrays: also load ``mask`` as a ``[64, 64]`` bool array instead of a path.

    Returns:
        dicts with ``id`` (question index), ``image`` (PNG path), ``question``, ``answer``, ``mask`` (PNG path, or
        array), ``kind`` (``shape``/``color``/``yesno``), ``image_id``.
    """
    folder = ensure_shapes_vqa()
    ids = shapes_vqa_ids(split)
    rows = [json.loads(line) for line in (folder / "questions.jsonl").read_text().splitlines() if line]
    items = []
    for qid in ids:
        row = dict(rows[qid])
        row["image"] = str(folder / row["image"])
        row["mask"] = str(folder / row["mask"])
        if with_arrays:
            import numpy as np
            from PIL import Image

            row["mask"] = np.asarray(Image.open(row["mask"])) > 127
        items.append(row)
    return items


# ------------------------------------------------------------------------------------------------ photos
def _photo_array(loader: str) -> Any:
    """Load a photo from the package named in ``loader`` (``module.function`` or ``module.function:file``)."""
    import numpy as np
    from PIL import Image

    target, _, filename = loader.partition(":")
    if target.startswith("skimage.data."):
        import skimage.data

        image = getattr(skimage.data, target.removeprefix("skimage.data."))()
    elif target == "sklearn.datasets.load_sample_images":
        from sklearn.datasets import load_sample_images

        bunch = load_sample_images()
        image = next(img for name, img in zip(bunch.filenames, bunch.images, strict=True) if name.endswith(filename))
    elif target == "matplotlib.cbook.get_sample_data":
        from matplotlib import cbook

        with cbook.get_sample_data(filename) as handle:
            image = np.asarray(Image.open(handle).convert("RGB"))
    else:
        raise ValueError(f"unknown photo loader {loader!r}")
    image = np.asarray(image)
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    return image


def _photos_spec() -> dict[str, Any]:
    return json.loads(_config_file("photos_yesno", "questions.json").read_text())


def _build_photos(tmp: Path) -> dict[str, Any]:
    import numpy as np
    from PIL import Image

    spec = _photos_spec()
    for name, meta in spec["photos"].items():
        image = Image.fromarray(_photo_array(meta["loader"])).convert("RGB")
        if list(image.size) != list(meta["size"]):
            raise ValueError(f"photo {name}: size {image.size} differs from the recorded {meta['size']}")
        write_bytes_atomic(tmp / "images" / f"{name}.png", image_png(image))
    for item in spec["questions"]:
        if item["bbox"]:
            width, height = spec["photos"][item["photo"]]["size"]
            mask = np.zeros((height, width), dtype=np.uint8)
            x0, y0, x1, y1 = item["bbox"]
            mask[y0:y1, x0:x1] = 255
            write_bytes_atomic(tmp / "masks" / f"{item['id']}.png", image_png(Image.fromarray(mask)))
    return {"questions": len(spec["questions"]), "photos": sorted(spec["photos"])}


def ensure_photos_yesno(force: bool = False, verbose: bool = True, deep: bool = False) -> Path:
    """Materialise the ``photos_yesno`` photos (PNG) and box masks in the cache; returns its folder."""
    spec_digest = convert.sha256_file(_config_file("photos_yesno", "questions.json"))
    return convert.build_folder(
        convert.cache_home() / "data" / "photos_yesno",
        _build_photos,
        force=force,
        deep=deep,
        verbose=verbose,
        what="photos_yesno",
        expect_source={"questions_sha256": spec_digest},
    )


def photos_yesno(with_arrays: bool = False) -> list[dict[str, Any]]:
    """The ``photos_yesno`` items.

    Args:
        with_arrays: load ``mask`` as an ``[H, W]`` bool array (the box) instead of a path.

    Returns:
        dicts with ``id``, ``image`` (PNG path), ``question``, ``answer`` (``yes``/``no``), ``mask`` (box-mask PNG
        path or array; ``None`` when the answer is no), ``bbox`` (``[x0, y0, x1, y1]`` pixels, exclusive end, or
        ``None``), ``kind`` (``"yesno"``), ``photo``, ``source``, ``license``, ``credit``.
    """
    folder = ensure_photos_yesno()
    spec = _photos_spec()
    items = []
    for item in spec["questions"]:
        meta = spec["photos"][item["photo"]]
        mask: Any = str(folder / "masks" / f"{item['id']}.png") if item["bbox"] else None
        if with_arrays and mask is not None:
            import numpy as np
            from PIL import Image

            mask = np.asarray(Image.open(mask)) > 127
        items.append(
            {
                "id": item["id"],
                "image": str(folder / "images" / f"{item['photo']}.png"),
                "question": item["question"],
                "answer": item["answer"],
                "mask": mask,
                "bbox": item["bbox"],
                "kind": "yesno",
                "photo": item["photo"],
                "source": meta["source"],
                "license": meta["license"],
                "credit": meta["credit"],
            }
        )
    return items


def ensure_all(force: bool = False, verbose: bool = True, deep: bool = False) -> dict[str, Path]:
    """Materialise every local benchmark; returns ``{"shapes_vqa": ..., "photos_yesno": ...}``."""
    return {
        "shapes_vqa": ensure_shapes_vqa(force=force, verbose=verbose, deep=deep),
        "photos_yesno": ensure_photos_yesno(force=force, verbose=verbose, deep=deep),
    }
