"""Image sources and the deterministic, resumable batch stream of the distillation job.

The stream is a pure function of ``(seed, step)``: item ``k`` of the stream is image ``perm_e[k % n]`` of epoch
``e = k // n`` (``perm_e`` a seeded permutation), cropped with a generator seeded by ``(seed, k)``. A job that restarts
at step ``s`` therefore sees exactly the batches an uninterrupted job would, without replaying anything.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

__all__ = ["IMAGE_EXTENSIONS", "ImageSource", "StepBatches", "item_seed", "list_images", "open_source", "preprocess"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


def list_images(root: str | os.PathLike) -> list[Path]:
    """All ``.jpg``/``.jpeg``/``.png`` files under ``root`` (any depth, case-insensitive), sorted by relative path.

    Raises:
        FileNotFoundError: If ``root`` is not a directory.
        ValueError: If it holds no images.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    files = sorted((p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS),
                   key=lambda p: p.relative_to(root).as_posix())
    if not files:
        raise ValueError(f"no {'/'.join(IMAGE_EXTENSIONS)} images under {root}")
    return files


class ImageSource:
    """Random access to RGB images from a folder tree, a list file, or a local HF dataset (``save_to_disk``).

    Args:
        paths: Image files (folder or list-file sources).
        hf_dataset: A ``datasets.Dataset`` (HF sources).
        image_column: Column holding the images (HF sources).
        description: Where the images come from (for messages and fingerprints).
    """

    def __init__(self, paths: Sequence[Path] | None = None, hf_dataset=None, image_column: str | None = None,
                 description: str = "") -> None:
        if (paths is None) == (hf_dataset is None):
            raise ValueError("give exactly one of paths or hf_dataset")
        self.paths = list(paths) if paths is not None else None
        self.hf_dataset = hf_dataset
        self.image_column = image_column
        self.description = description

    def __len__(self) -> int:
        return len(self.paths) if self.paths is not None else len(self.hf_dataset)

    def name(self, index: int) -> str:
        """A human-readable name of image ``index``."""
        if self.paths is not None:
            return str(self.paths[index])
        return f"{self.description}[{index}]"

    def fingerprint(self) -> list[str]:
        """Identity of the item list (file names, or dataset description and size)."""
        if self.paths is not None:
            return [p.name for p in self.paths]
        return [self.description, str(len(self))]

    def load(self, index: int):
        """Image ``index`` as an RGB ``PIL.Image``.

        Raises:
            ValueError: If the file cannot be decoded (names the file).
        """
        from PIL import Image

        try:
            if self.paths is not None:
                with Image.open(self.paths[index]) as im:
                    return im.convert("RGB")
            item = self.hf_dataset[int(index)][self.image_column]
            if isinstance(item, dict) and "path" in item:
                with Image.open(item["path"]) as im:
                    return im.convert("RGB")
            return item.convert("RGB")
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read image {self.name(index)}: {e}") from e


def open_source(images: str | os.PathLike | None = None, dataset: str | os.PathLike | None = None) -> ImageSource:
    """Open an image folder tree, or a local dataset: a ``.txt`` list of image paths (relative to the list file) or a
    directory written by ``datasets.Dataset.save_to_disk`` (needs the optional ``datasets`` package).

    Raises:
        ValueError: If neither or both are given, or the source is empty / of an unknown kind.
    """
    if (images is None) == (dataset is None):
        raise ValueError("give exactly one of an image folder (--images) or a local dataset (--dataset)")
    if images is not None:
        return ImageSource(paths=list_images(images), description=str(images))
    ds = Path(dataset)
    if ds.is_file() and ds.suffix.lower() in (".txt", ".lst"):
        lines = [ln.strip() for ln in ds.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
        paths = [(ds.parent / ln) if not os.path.isabs(ln) else Path(ln) for ln in lines]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{ds}: {len(missing)} listed image(s) not found, e.g. {missing[0]}")
        if not paths:
            raise ValueError(f"{ds} lists no images")
        return ImageSource(paths=paths, description=str(ds))
    if ds.is_dir() and ((ds / "dataset_info.json").is_file() or (ds / "state.json").is_file()):
        try:
            import datasets
        except ImportError as e:
            raise ImportError(f"{ds} is a saved HF dataset; reading it needs the 'datasets' package") from e
        hf = datasets.load_from_disk(str(ds))
        if isinstance(hf, datasets.DatasetDict):
            split = "train" if "train" in hf else next(iter(hf))
            hf = hf[split]
        cols = [c for c, f in hf.features.items() if type(f).__name__ == "Image"]
        if not cols:
            raise ValueError(f"{ds}: the dataset has no Image column (columns: {list(hf.features)})")
        if len(hf) == 0:
            raise ValueError(f"{ds}: the dataset is empty")
        return ImageSource(hf_dataset=hf, image_column=cols[0], description=str(ds))
    raise ValueError(f"unknown dataset {ds}: expected a .txt list of image paths or a datasets.save_to_disk folder")


def preprocess(image, size: int, mean: Sequence[float], std: Sequence[float],
               rng: np.random.Generator | None = None) -> torch.Tensor:
    """Resize the short side to ``size`` (bicubic), crop ``size x size`` (random if ``rng`` else centred), normalise.

    Returns:
        ``(3, size, size)`` float32 tensor.
    """
    from PIL import Image

    w, h = image.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((nw, nh), Image.Resampling.BICUBIC)
    if rng is None:
        left, top = (nw - size) // 2, (nh - size) // 2
    else:
        left, top = int(rng.integers(0, nw - size + 1)), int(rng.integers(0, nh - size + 1))
    image = image.crop((left, top, left + size, top + size))
    arr = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (arr - m) / s


def item_seed(seed: int, purpose: int, item: int) -> int:
    """A 63-bit seed derived from ``(seed, purpose, item)`` (independent streams per purpose)."""
    return int(np.random.SeedSequence([int(seed), int(purpose), int(item)]).generate_state(2, np.uint64)[0] >> 1)


class StepBatches(torch.utils.data.Dataset):
    """Map-style dataset whose item ``j`` is the batch of step ``start_step + j`` for one process.

    Args:
        source: The images.
        size: Crop side in pixels.
        mean: Normalisation mean.
        std: Normalisation std.
        global_batch: Images per step over all processes.
        seed: Stream seed.
        start_step: First step.
        end_step: One past the last step.
        rank: This process's index.
        world: Number of processes (``global_batch`` must be divisible by it).
    """

    def __init__(self, source: ImageSource, size: int, mean: Sequence[float], std: Sequence[float],
                 global_batch: int, seed: int, start_step: int, end_step: int, rank: int = 0, world: int = 1) -> None:
        if global_batch % world:
            raise ValueError(f"batch size {global_batch} is not divisible by the {world} processes")
        self.source, self.size, self.mean, self.std = source, size, tuple(mean), tuple(std)
        self.global_batch, self.seed = global_batch, seed
        self.start_step, self.end_step, self.rank, self.world = start_step, end_step, rank, world
        self._perm_cache: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return max(0, self.end_step - self.start_step)

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perm_cache:
            self._perm_cache = {epoch: np.random.default_rng([self.seed, 0, epoch]).permutation(len(self.source))}
        return self._perm_cache[epoch]

    def items_of_step(self, step: int) -> list[int]:
        """Stream positions this process handles at ``step``."""
        per = self.global_batch // self.world
        first = step * self.global_batch + self.rank * per
        return list(range(first, first + per))

    def image_index(self, item: int) -> int:
        """Source index of stream position ``item``."""
        n = len(self.source)
        return int(self._perm(item // n)[item % n])

    def __getitem__(self, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        step = self.start_step + j
        items = self.items_of_step(step)
        imgs = [preprocess(self.source.load(self.image_index(k)), self.size, self.mean, self.std,
                           np.random.default_rng(item_seed(self.seed, 1, k))) for k in items]
        return torch.stack(imgs), torch.tensor(items, dtype=torch.long)
