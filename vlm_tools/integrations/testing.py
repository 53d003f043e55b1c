"""Offline fixtures for evaluation tests: a tiny saved LLaVA checkpoint and the local photo tasks."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

__all__ = ["EvalFixture", "build_eval_fixture"]


@dataclass(frozen=True)
class EvalFixture:
    """Paths of a tiny checkpoint (`pretrained=`) and a task folder (`--include_path`) with two 8-document tasks."""

    checkpoint: Path
    task_dir: Path
    gen_task: str
    ll_task: str


def build_eval_fixture(root: str | Path, kind: str = "llava", prefix: str = "vlmt_test_photos") -> EvalFixture:
    """Create (or reuse) a tiny random LLaVA checkpoint and the photo tasks under `root`.

    Idempotent: existing files are reused, so several test modules can share one folder.

    Args:
        root: folder for `tiny_<kind>/` and `tasks/`.
        kind: "llava" or "llava_next".
        prefix: task name prefix (`{prefix}_gen`, `{prefix}_ll`).
    """
    from vlm_tools.integrations.local_tasks import write_photo_task

    root = Path(root)
    ckpt = root / f"tiny_{kind}"
    if not (ckpt / "config.json").is_file():
        from vlm_tools.core.models import build_tiny_llava

        model, processor = build_tiny_llava(kind)
        tmp = root / f".tiny_{kind}.tmp{os.getpid()}"
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        if ckpt.exists():
            shutil.rmtree(ckpt)
        os.replace(tmp, ckpt)
    task_dir = root / "tasks"
    names = {"generate_until": f"{prefix}_gen", "loglikelihood": f"{prefix}_ll"}
    if not all((task_dir / f"{n}.yaml").is_file() for n in names.values()):
        names = write_photo_task(task_dir, prefix=prefix)
    return EvalFixture(checkpoint=ckpt, task_dir=task_dir, gen_task=names["generate_until"],
                       ll_task=names["loglikelihood"])
