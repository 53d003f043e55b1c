"""Local lmms-eval tasks and offline data checks.

Local tasks: a task YAML with `dataset_path: parquet` (or json/csv) and `dataset_kwargs.data_files` relative to the
YAML (lmms-eval 0.7.3 resolves such paths against the YAML's folder), images stored in the parquet file as an HF
`Image` column. The functions below are referenced from task YAMLs as `!function
vlm_tools.integrations.local_tasks.<name>`. `write_photo_task` builds a small yes/no photo task from the images that
ship with scikit-image (no download), in both output types (`generate_until` and `loglikelihood`).

Offline checks: `check_task_data` finds each task's Hugging Face datasets (group members and the extra dataset that
`gqa` loads in `process_docs` included) and, when one is neither cached nor downloadable, raises `TaskDataError`
naming the dataset and the command that caches it, instead of lmms-eval's minute of retries and a `RetryError`.
"""

from __future__ import annotations

import io
import os
import socket
import string
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from vlm_tools.core import io as atomic

__all__ = [
    "EXTRA_DATASETS",
    "LOCAL_BUILDERS",
    "PHOTO_DOCS",
    "DatasetRef",
    "TaskDataError",
    "check_task_data",
    "doc_to_text",
    "doc_to_visual",
    "hub_reachable",
    "is_cached",
    "process_generation",
    "process_loglikelihood",
    "task_datasets",
    "task_yaml_paths",
    "write_photo_task",
]

#: Datasets a built-in task loads besides its `dataset_path` (gqa's `process_docs` loads the images separately).
EXTRA_DATASETS: dict[str, tuple[tuple[str, str | None], ...]] = {
    "gqa": (("lmms-lab-encoder/GQA", "testdev_balanced_images"),),
}
#: `dataset_path` values that read local files (their `data_files` resolve against the YAML's folder).
LOCAL_BUILDERS = frozenset({"csv", "json", "parquet", "text", "pandas", "arrow", "imagefolder"})


# -- task functions (referenced from YAML) ---------------------------------------------------------------------
def doc_to_visual(doc: dict) -> list:
    """The document's image(s) as RGB PIL images (`image` column: PIL images or file paths, one or a list)."""
    from PIL import Image

    images = doc["image"] if isinstance(doc["image"], list) else [doc["image"]]
    return [(Image.open(im) if isinstance(im, str) else im).convert("RGB") for im in images]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    """`pre_prompt + question + post_prompt` (prompt pieces from the task's `lmms_eval_specific_kwargs`)."""
    kw = lmms_eval_specific_kwargs or {}
    return f"{kw.get('pre_prompt', '')}{doc['question']}{kw.get('post_prompt', '')}"


def first_word(text: str) -> str:
    """The first word, lower-cased, without surrounding punctuation (the project's short-answer VQA rule)."""
    words = text.strip().split()
    return words[0].strip(string.punctuation).lower() if words else ""


def process_generation(doc: dict, results: list[str]) -> dict[str, float]:
    """`exact_match`: the first word of the answer equals the (one-word) target, case and punctuation ignored."""
    return {"exact_match": float(first_word(results[0]) == str(doc["answer"]).strip().lower())}


def process_loglikelihood(doc: dict, results: list[tuple[float, bool]]) -> dict[str, float]:
    """`greedy_match`: greedy decoding yields the answer; `answer_logprob`: its summed log-probability."""
    logprob, greedy = results[0]
    return {"greedy_match": float(greedy), "answer_logprob": float(logprob)}


# -- a small local photo task ----------------------------------------------------------------------------------
#: (scikit-image picture, question, answer): eight bundled photos, four yes and four no answers.
PHOTO_DOCS: tuple[tuple[str, str, str], ...] = (
    ("chelsea", "is there a cat in the image ?", "yes"),
    ("astronaut", "is there a cat in the image ?", "no"),
    ("coffee", "is there a cup in the image ?", "yes"),
    ("rocket", "is there a rocket in the image ?", "yes"),
    ("camera", "is there a dog in the image ?", "no"),
    ("horse", "is there a horse in the image ?", "yes"),
    ("coins", "is there a cat in the image ?", "no"),
    ("moon", "is there a dog in the image ?", "no"),
)

_TASK_YAML = """\
# Written by vlm_tools.integrations.local_tasks.write_photo_task: {description}.
task: {name}
dataset_path: parquet
dataset_kwargs:
  data_files:
    test: {data_file}
test_split: test
output_type: {output_type}
doc_to_visual: !function vlm_tools.integrations.local_tasks.doc_to_visual
doc_to_text: !function vlm_tools.integrations.local_tasks.doc_to_text
doc_to_target: answer
{extra}process_results: !function vlm_tools.integrations.local_tasks.{process}
metric_list:
{metrics}lmms_eval_specific_kwargs:
  default:
    pre_prompt: ""
    post_prompt: "{post_prompt}"
metadata:
  version: 1.0
  description: {description}
"""


def _photo(name: str, size: int):
    import numpy as np
    import skimage.data
    from PIL import Image

    arr = getattr(skimage.data, name)()
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    img = Image.fromarray(arr).convert("RGB")
    img.thumbnail((size, size))
    return img


def write_photo_task(task_dir: str | Path, prefix: str = "vlmt_photos", n_docs: int = 8,
                     image_size: int = 96) -> dict[str, str]:
    """Write a small yes/no photo task (scikit-image pictures) and its two task YAMLs into `task_dir`.

    Args:
        task_dir: output folder; gets `{prefix}.parquet`, `{prefix}_gen.yaml` and `{prefix}_ll.yaml`.
        prefix: task name prefix (keep it unique: built-in lmms-eval names win over include-path tasks).
        n_docs: documents (at most `len(PHOTO_DOCS)`).
        image_size: longest image side in pixels.

    Returns:
        Task name per output type: `{"generate_until": "{prefix}_gen", "loglikelihood": "{prefix}_ll"}`.
    """
    import datasets

    if not 1 <= n_docs <= len(PHOTO_DOCS):
        raise ValueError(f"n_docs must lie in 1..{len(PHOTO_DOCS)}, got {n_docs}")
    task_dir = Path(task_dir)
    docs = PHOTO_DOCS[:n_docs]
    table = datasets.Dataset.from_dict(
        {"id": list(range(n_docs)), "image": [_photo(p, image_size) for p, _, _ in docs],
         "picture": [p for p, _, _ in docs], "question": [q for _, q, _ in docs], "answer": [a for _, _, a in docs]},
        features=datasets.Features({"id": datasets.Value("int64"), "image": datasets.Image(),
                                    "picture": datasets.Value("string"), "question": datasets.Value("string"),
                                    "answer": datasets.Value("string")}))
    data_file = f"{prefix}.parquet"
    buf = io.BytesIO()
    table.to_parquet(buf)
    atomic.write_bytes_atomic(task_dir / data_file, buf.getvalue())
    names = {"generate_until": f"{prefix}_gen", "loglikelihood": f"{prefix}_ll"}
    variants = {
        "generate_until": {
            "extra": "generation_kwargs:\n  max_new_tokens: 4\n  do_sample: false\n  until: [\"\\n\"]\n",
            "process": "process_generation", "post_prompt": " answer yes or no .",
            "metrics": "  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n",
            "description": "yes/no questions about scikit-image photos, answered by generation"},
        "loglikelihood": {
            "extra": "", "process": "process_loglikelihood", "post_prompt": " answer yes or no .",
            "metrics": ("  - metric: greedy_match\n    aggregation: mean\n    higher_is_better: true\n"
                        "  - metric: answer_logprob\n    aggregation: mean\n    higher_is_better: true\n"),
            "description": "yes/no questions about scikit-image photos, scored by the answer's log-likelihood"},
    }
    for output_type, name in names.items():
        text = _TASK_YAML.format(name=name, data_file=data_file, output_type=output_type, **variants[output_type])
        atomic.write_text_atomic(task_dir / f"{name}.yaml", text)
    return names


# -- offline data checks ---------------------------------------------------------------------------------------
class TaskDataError(RuntimeError):
    """A task's data is missing: not cached and not downloadable here (the message says how to get it)."""


@dataclass(frozen=True)
class DatasetRef:
    """One dataset a task loads.

    Attributes:
        task: the task that loads it.
        path: `dataset_path` (hub id, local builder name or folder).
        name: `dataset_name` (the hub config), or None.
        needs_token: the task YAML sets `dataset_kwargs.token: true` (a Hugging Face token must exist).
        data_files: local data files (local builders), already resolved against the YAML's folder.
    """

    task: str
    path: str
    name: str | None = None
    needs_token: bool = False
    data_files: tuple[str, ...] = ()

    @property
    def is_local(self) -> bool:
        return self.path in LOCAL_BUILDERS or os.path.isabs(self.path) or os.path.exists(self.path)


def _flatten_files(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [f for v in value.values() for f in _flatten_files(v)]
    if isinstance(value, (list, tuple)):
        return [f for v in value for f in _flatten_files(v)]
    return []


def task_datasets(task_manager: Any, task: str) -> list[DatasetRef]:
    """The datasets `task` (a task, group or tag of the TaskManager's index) loads."""
    from lmms_eval import utils

    index = task_manager.task_index
    if task not in index:
        raise KeyError(task)
    entry = index[task]
    if entry["type"] == "tag":
        return [ref for sub in entry["task"] for ref in task_datasets(task_manager, sub)]
    config = utils.load_yaml_config(entry["yaml_path"], mode="simple") if entry["yaml_path"] != -1 else {}
    if entry["type"] == "group" or isinstance(config.get("task"), list):
        refs = []
        members = config.get("task", []) if entry["yaml_path"] != -1 else entry.get("task", [])
        for sub in members if isinstance(members, list) else []:
            if isinstance(sub, str) and sub in index:
                refs.extend(task_datasets(task_manager, sub))
            elif isinstance(sub, dict) and sub.get("dataset_path"):
                refs.append(_ref(sub.get("task", task), sub))
        return refs
    refs = [_ref(task, config)] if config.get("dataset_path") else []
    refs += [DatasetRef(task, p, n, needs_token=True) for p, n in EXTRA_DATASETS.get(task, ())]
    return refs


def task_yaml_paths(task_manager: Any, task: str) -> list[str]:
    """The YAML files that define `task` (a task, group or tag of the TaskManager's index) and its members."""
    from lmms_eval import utils

    index = task_manager.task_index
    if task not in index:
        raise KeyError(task)
    entry = index[task]
    paths = [entry["yaml_path"]] if entry["yaml_path"] != -1 else []
    if entry["type"] == "tag":
        members = list(entry["task"])
    elif entry["type"] == "group" and entry["yaml_path"] != -1:
        members = utils.load_yaml_config(entry["yaml_path"], mode="simple").get("task", [])
        members = [m for m in members if isinstance(m, str)] if isinstance(members, list) else []
    else:
        members = []
    for sub in members:
        if sub in index and sub != task:
            paths.extend(p for p in task_yaml_paths(task_manager, sub) if p not in paths)
    return paths


def _ref(task: str, config: dict) -> DatasetRef:
    kwargs = config.get("dataset_kwargs") or {}
    return DatasetRef(task=task, path=str(config["dataset_path"]), name=config.get("dataset_name"),
                      needs_token=bool(kwargs.get("token")), data_files=tuple(_flatten_files(kwargs.get("data_files"))))


def dataset_cache_dirs() -> list[Path]:
    """Where lmms-eval/datasets look for prepared datasets (LMMS_EVAL_DATASETS_CACHE, HF_DATASETS_CACHE, HF_HOME)."""
    home = Path(os.path.expanduser(os.environ.get("HF_HOME", "~/.cache/huggingface")))
    dirs = [os.environ.get("LMMS_EVAL_DATASETS_CACHE"), os.environ.get("HF_DATASETS_CACHE"), str(home / "datasets")]
    return list(dict.fromkeys(Path(os.path.expanduser(d)) for d in dirs if d))


def hub_cache_dir() -> Path:
    """The huggingface_hub download cache (HF_HUB_CACHE, else HF_HOME/hub)."""
    home = os.path.expanduser(os.environ.get("HF_HOME", "~/.cache/huggingface"))
    return Path(os.path.expanduser(os.environ.get("HF_HUB_CACHE", os.path.join(home, "hub"))))


def is_cached(ref: DatasetRef) -> bool:
    """Whether a hub dataset is in the datasets cache (prepared Arrow files) or the hub download cache."""
    from datasets.naming import camelcase_to_snakecase

    parts = ref.path.split("/")
    parts[-1] = camelcase_to_snakecase(parts[-1])
    rel = "___".join(parts)
    for root in dataset_cache_dirs():
        base = root / rel
        if ref.name:
            if (base / ref.name).is_dir() and any((base / ref.name).iterdir()):
                return True
        elif base.is_dir() and any(base.iterdir()):
            return True
    snapshots = hub_cache_dir() / f"datasets--{ref.path.replace('/', '--')}" / "snapshots"
    return snapshots.is_dir() and any(snapshots.iterdir())


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def hub_reachable(timeout: float = 3.0) -> bool:
    """False in offline mode (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) or when the Hub host cannot be reached."""
    if _truthy("HF_HUB_OFFLINE") or _truthy("HF_DATASETS_OFFLINE"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", port), timeout=timeout):
            return True
    except OSError:
        return False


def _have_token() -> bool:
    try:
        from huggingface_hub import get_token
    except ImportError:
        return bool(os.environ.get("HF_TOKEN"))
    return get_token() is not None


def check_task_data(task_manager: Any, tasks: Iterable[str], reachable: bool | None = None) -> list[DatasetRef]:
    """Fail early, with instructions, when a task's data cannot be loaded here.

    Local tasks: their data files must exist. Hub datasets: cached, or the Hub reachable (plus a token when the
    YAML asks for one).

    Args:
        task_manager: an lmms-eval `TaskManager` whose index holds the tasks.
        tasks: task, group or tag names.
        reachable: whether the Hub can be reached (None: test it once, only if something is not cached).

    Returns:
        The hub datasets that must be downloaded (empty when everything is local or cached).

    Raises:
        TaskDataError: names every missing dataset and the commands that cache it.
    """
    problems, to_download = [], []
    names = list(tasks)
    for task in names:
        for ref in task_datasets(task_manager, task):
            if ref.is_local:
                missing = [f for f in ref.data_files if not os.path.exists(f) and "*" not in f]
                if missing:
                    problems.append(f"task {task!r} reads {', '.join(missing)}, which does not exist (relative "
                                    f"data_files resolve against the task YAML's folder)")
                continue
            if not is_cached(ref):
                to_download.append(ref)
    if to_download:
        if reachable is None:
            reachable = hub_reachable()
        if not reachable:
            why = ("offline mode is on (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)"
                   if _truthy("HF_HUB_OFFLINE") or _truthy("HF_DATASETS_OFFLINE") else
                   "the Hugging Face Hub cannot be reached from this machine")
            caches = ", ".join(str(d) for d in dataset_cache_dirs())
            for ref in to_download:
                cfg = f" (config {ref.name})" if ref.name else ""
                problems.append(f"task {ref.task!r} needs the Hugging Face dataset {ref.path}{cfg}, which is not in "
                                f"the local cache ({caches}; hub cache {hub_cache_dir()}) and {why}")
            task_list = ",".join(dict.fromkeys(r.task for r in to_download))
            problems.append(
                "cache it on a machine with internet access, then copy the cache here:\n"
                + ("    hf auth login    # the task YAMLs set dataset_kwargs.token: true\n"
                   if any(r.needs_token for r in to_download) else "")
                + f"    vlm-tools eval --cache-data --tasks {task_list}\n"
                "    # copy $HF_HOME (default ~/.cache/huggingface) to this machine, or set HF_HOME/HF_DATASETS_CACHE "
                "to the copy;\n    # then run with HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1")
        elif any(r.needs_token for r in to_download) and not _have_token():
            tasks_ = ", ".join(dict.fromkeys(r.task for r in to_download if r.needs_token))
            problems.append(f"task(s) {tasks_} download with dataset_kwargs.token: true but no Hugging Face token is "
                            "set: run `hf auth login` or export HF_TOKEN=...")
    if problems:
        raise TaskDataError("task data is not available:\n  - " + "\n  - ".join(problems))
    return to_download
