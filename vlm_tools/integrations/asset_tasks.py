"""lmms-eval task class for the project's local benchmarks (`shapes_vqa`, `photos_yesno`; see `vlm_tools.assets.data`).

Their images are materialised offline into the vlm_tools cache (`vlm-tools setup`, or on first use), so the documents
do not come from a Hugging Face dataset: a task YAML names this class and the benchmark::

    task: shapes_vqa
    class: !function vlm_tools.integrations.asset_tasks.AssetTask
    dataset_kwargs: {vlm_tools_asset: shapes_vqa, split: quick}

Each document is one row of `load_shapes_vqa(split)` / `photos_yesno()` (image paths; `doc_to_visual` opens them).
This module imports lmms-eval's task API (slow); task YAMLs load it lazily through `!function`.
"""

from __future__ import annotations

from typing import Any

from datasets import Dataset, DatasetDict
from lmms_eval.api.task import ConfigurableTask

__all__ = ["ASSETS", "AssetTask", "asset_rows"]

#: Benchmarks an `AssetTask` can load, with their splits (None: a single split).
ASSETS: dict[str, tuple[str, ...] | None] = {"shapes_vqa": ("quick", "eval1000", "full"), "photos_yesno": None}


def asset_rows(name: str, split: str | None = None) -> list[dict[str, Any]]:
    """The documents of a local benchmark (building its cache folder on first use).

    Raises:
        ValueError: an unknown benchmark or split (names the valid ones).
    """
    from vlm_tools.assets import data

    if name not in ASSETS:
        raise ValueError(f"unknown vlm_tools_asset {name!r}; choose one of {', '.join(ASSETS)}")
    splits = ASSETS[name]
    if splits is None:
        rows = data.photos_yesno()
    else:
        split = split or splits[0]
        if split not in splits:
            raise ValueError(f"unknown {name} split {split!r}; choose one of {', '.join(splits)}")
        rows = data.load_shapes_vqa(split)
    return rows


class AssetTask(ConfigurableTask):
    """A `ConfigurableTask` whose documents come from `vlm_tools.assets.data` instead of `datasets.load_dataset`."""

    def __init__(self, *args: Any, config: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if config is not None:
            config = dict(config)
            config.pop("class", None)
        super().__init__(*args, config=config, **kwargs)

    def download(self, dataset_kwargs: dict[str, Any] | None = None) -> None:
        kwargs = dict(dataset_kwargs or {})
        if "vlm_tools_asset" not in kwargs:
            raise ValueError(f"task {self.config.task!r}: dataset_kwargs.vlm_tools_asset must name one of "
                             f"{', '.join(ASSETS)}")
        rows = asset_rows(kwargs["vlm_tools_asset"], kwargs.get("split"))
        split = self.config.test_split
        self.dataset = DatasetDict({split: Dataset.from_list(rows)})
        if self.config.process_docs is not None:
            self.dataset[split] = self.config.process_docs(self.dataset[split])
        self.dataset_no_image = self.dataset
