"""Integrations with evaluation harnesses (lmms-eval). Nothing here is imported by `import vlm_tools`.

- `lmms_manifest`: the `lmms_eval.models` entry point (imports only `lmms_eval.models.registry_v2`).
- `lmms_eval`: the lmms-eval model class `VlmToolsModel` (`--model vlm_tools`), loaded lazily by lmms-eval.
- `model_args`: parsing and validation of `--model_args` (no heavy imports; fails before any model loads).
- `local_tasks`: local task helpers (data-relative task class, a small photo task generator, offline data checks).
- `grid` / `eval_cli`: the `vlm-tools eval` grid runner and its comparison table.
- `tasks_path()`: the folder of the project's lmms-eval tasks, for `lmms-eval --include_path`.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["tasks_path"]

#: The package's view of the task folder: `lmms_eval_tasks` links to the repository's `eval_configs/tasks`; an
#: installed wheel holds a copy of its YAML files (package data).
_PACKAGE_TASKS = Path(__file__).resolve().parent / "lmms_eval_tasks"


def tasks_path() -> Path:
    """The folder of the project's lmms-eval tasks (`shapes_vqa`, `shapes_vqa_1000`, `photos_yesno`,
    `photos_yesno_ll`): pass it to `lmms-eval --include_path` (`vlm-tools eval --print-tasks-path` prints it).

    In a source checkout this is `<repo>/eval_configs/tasks`; in an installed package, the copy shipped inside it.

    Raises:
        FileNotFoundError: neither exists (a package built without its task YAMLs).
    """
    for path in (_PACKAGE_TASKS, Path(__file__).resolve().parents[2] / "eval_configs" / "tasks"):
        if path.is_dir() and any(path.rglob("*.yaml")):
            return path.resolve()
    raise FileNotFoundError(f"the lmms-eval task folder is missing ({_PACKAGE_TASKS}); reinstall vlm_tools, or use "
                            f"<repo>/eval_configs/tasks from a source checkout")
