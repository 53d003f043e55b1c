"""Checkpoint and output-folder I/O of the distillation job.

A checkpoint (`<out>/checkpoints/step_<8 digits>.pt`, written atomically through `vlm_tools.core.io`) holds the
trainable tensors, the optimizer and scheduler states, the RNG states (python / numpy / torch / cuda), the stream
position and the job's trajectory settings. Everything read back is checked before it is used: its structure, the
type of every entry, and every tensor's shape against the student and optimizer it is restored into, so a crafted or
mismatched file fails with a `CheckpointError` naming the file and the entry instead of broadcasting silently.

Also here: the latest / prune / stale-temporary bookkeeping of the checkpoint folder, the training log (append-only
JSON lines, trimmed back to the resumed step), and the output-folder checks of a job (writable; not silently reused).
"""

from __future__ import annotations

import io
import json
import os
import random
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vlm_tools.core.io import write_bytes_atomic, write_text_atomic

from .student import RegisterStudent, StudentConfig, build_student

__all__ = [
    "CHECKPOINT_DIR",
    "JOB_FILES",
    "CheckpointError",
    "OutputExistsError",
    "TrainLog",
    "check_writable_dir",
    "clean_stale_temporaries",
    "clear_job_outputs",
    "existing_job_outputs",
    "latest_checkpoint",
    "load_checkpoint",
    "prune_checkpoints",
    "restore_optimizer",
    "restore_trainable",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
    "student_from_checkpoint",
]

CHECKPOINT_DIR = "checkpoints"
CKPT_FORMAT = "vlm_tools.registers.checkpoint/1"
_CKPT_RE = re.compile(r"^step_(\d+)\.pt$")
# temporaries of `write_bytes_atomic` (".<name>.<random>.tmp") and of `replace_dir_atomic` (".<name>.tmp-<random>")
_STALE_FILE_RE = re.compile(r"^\.step_\d+\.pt\..+\.tmp$")
#: What a job writes into its output folder (an `--out` holding any of them is a previous job).
JOB_FILES = ("checkpoints", "student", "train_log.jsonl", "job.json", "summary.json")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, corrupt or from an incompatible job; the message names the file."""


class OutputExistsError(FileExistsError):
    """The output folder already holds a job and neither resume nor overwrite was asked for."""


# ------------------------------------------------------------------------------------------------- output folder


def check_writable_dir(path: str | os.PathLike, what: str = "--out") -> Path:
    """Create `path` (and parents) and check a file can be created in it, before any work is done.

    Raises:
        ValueError: naming the folder and the OS error (read-only file system, a file in the way, no permission).
    """
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-check-", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ValueError(f"{what} {folder} is not a writable folder: {e.strerror or e}") from e
    return folder


def existing_job_outputs(out: str | os.PathLike) -> list[str]:
    """The names of `JOB_FILES` present in `out` (empty for a new or empty folder)."""
    folder = Path(out)
    return [name for name in JOB_FILES if (folder / name).exists()]


def clear_job_outputs(out: str | os.PathLike) -> list[str]:
    """Delete what a previous job wrote into `out` (only `JOB_FILES`; anything else is left); returns the names."""
    folder = Path(out)
    removed = []
    for name in JOB_FILES:
        p = folder / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
        else:
            continue
        removed.append(name)
    return removed


def clean_stale_temporaries(out: str | os.PathLike) -> list[Path]:
    """Remove temporaries a killed job left in `out`: partial checkpoints (`checkpoints/.step_*.pt.*.tmp`) and
    unfinished export folders (`.student.tmp-*`, `.student.old-*`). Returns what was removed.

    Only call it when no other job writes into `out` (a job owns its output folder).
    """
    folder = Path(out)
    removed: list[Path] = []
    ck = folder / CHECKPOINT_DIR
    if ck.is_dir():
        for p in ck.iterdir():
            if p.is_file() and _STALE_FILE_RE.match(p.name):
                p.unlink(missing_ok=True)
                removed.append(p)
    if folder.is_dir():
        for p in folder.iterdir():
            if p.is_dir() and re.match(r"^\.student\.(tmp|old)-", p.name):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


# -------------------------------------------------------------------------------------------------- checkpoints


def rng_state() -> dict:
    """The python / numpy / torch (and cuda) RNG states, in a `torch.load(weights_only=True)`-safe form."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what `rng_state` returned."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | os.PathLike, *, step: int, items_consumed: int, trainable: Mapping[str, torch.Tensor],
                    optimizer: torch.optim.Optimizer, scheduler: Any, job: Mapping[str, Any]) -> Path:
    """Write a checkpoint atomically (temp file in the same folder, fsync, rename).

    Args:
        path: target file.
        step: optimizer steps completed.
        items_consumed: stream position (images consumed over all processes).
        trainable: the student's trainable tensors by name.
        optimizer: the optimizer.
        scheduler: the LR scheduler.
        job: the job's trajectory settings (checked on resume).

    Returns:
        The path.
    """
    obj = {
        "format": CKPT_FORMAT,
        "step": int(step),
        "items_consumed": int(items_consumed),
        "trainable": {k: v.detach().to("cpu").clone() for k, v in trainable.items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng_state(),
        "job": json.dumps(dict(job), sort_keys=True),
    }
    buf = io.BytesIO()
    torch.save(obj, buf)
    return write_bytes_atomic(path, buf.getvalue())


def _fail(path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"checkpoint {path}: {what}")


def _check_structure(obj: Any, path: Path) -> None:
    required = ("format", "step", "items_consumed", "trainable", "optimizer", "scheduler", "rng", "job")
    if not isinstance(obj, dict) or obj.get("format") != CKPT_FORMAT or any(k not in obj for k in required):
        raise CheckpointError(f"{path} is not a {CKPT_FORMAT} checkpoint")
    for key in ("step", "items_consumed"):
        if isinstance(obj[key], bool) or not isinstance(obj[key], int) or obj[key] < 0:
            raise _fail(path, f"entry {key!r} must be a non-negative int, got {obj[key]!r}")
    if not isinstance(obj["trainable"], dict) or not obj["trainable"]:
        raise _fail(path, "entry 'trainable' must be a non-empty dict of tensors")
    for name, t in obj["trainable"].items():
        if not isinstance(name, str) or not torch.is_tensor(t) or not t.is_floating_point():
            raise _fail(path, f"trainable entry {name!r} is a {type(t).__name__}, expected a floating-point tensor")
    opt = obj["optimizer"]
    if not isinstance(opt, dict) or not isinstance(opt.get("state"), dict) or not isinstance(opt.get("param_groups"),
                                                                                                 list):
        raise _fail(path, "entry 'optimizer' is not an optimizer state dict (state, param_groups)")
    for idx, st in opt["state"].items():
        if not isinstance(st, dict) or not all(torch.is_tensor(v) or isinstance(v, (int, float)) for v in st.values()):
            raise _fail(path, f"optimizer state of parameter {idx!r} is not a dict of tensors")
    if not isinstance(obj["scheduler"], dict):
        raise _fail(path, "entry 'scheduler' is not a scheduler state dict")
    rng = obj["rng"]
    if not (isinstance(rng, dict) and all(k in rng for k in ("python", "numpy", "torch"))
            and torch.is_tensor(rng["torch"]) and isinstance(rng["numpy"], dict)
            and torch.is_tensor(rng["numpy"].get("keys"))):
        raise _fail(path, "entry 'rng' is not an RNG state (python, numpy, torch)")
    if not isinstance(obj["job"], str):
        raise _fail(path, "entry 'job' is not the job's JSON text")


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint and check its structure and entry types (shapes are checked by `restore_trainable` /
    `restore_optimizer` against what they restore into).

    Raises:
        CheckpointError: if it is missing, truncated/corrupt, not a checkpoint of this format, or an entry has the
            wrong type (names the file and the entry).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated/garbled files
        raise CheckpointError(f"corrupt or unreadable checkpoint {path}: {type(e).__name__}: {e}") from e
    _check_structure(obj, path)
    try:
        job = json.loads(obj["job"])
    except ValueError as e:
        raise _fail(path, f"entry 'job' is not valid JSON: {e}") from e
    if not isinstance(job, dict):
        raise _fail(path, "entry 'job' is not a JSON object")
    obj["job"] = job
    obj["path"] = str(path)
    return obj


def restore_trainable(ckpt: Mapping[str, Any], params: Mapping[str, nn.Parameter]) -> None:
    """Copy a checkpoint's trainable tensors into `params`, after checking every name and shape (nothing is copied
    when any entry is wrong).

    Raises:
        CheckpointError: names the file and the entry.
    """
    path = ckpt.get("path", "?")
    saved = ckpt["trainable"]
    if set(params) != set(saved):
        raise CheckpointError(f"checkpoint {path} holds parameters {sorted(saved)}, expected {sorted(params)}")
    for k, p in params.items():
        if tuple(saved[k].shape) != tuple(p.shape):
            raise CheckpointError(f"checkpoint {path}: entry {k!r} has shape {tuple(saved[k].shape)}, expected "
                                  f"{tuple(p.shape)}")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(saved[k].to(device=p.device, dtype=p.dtype))


def restore_optimizer(ckpt: Mapping[str, Any], optimizer: torch.optim.Optimizer, names: list[str]) -> None:
    """Load a checkpoint's optimizer state after checking each per-parameter state tensor against its parameter.

    Args:
        ckpt: the checkpoint (`load_checkpoint`).
        optimizer: the job's optimizer (one param group, parameters in the order of `names`).
        names: the trainable parameter names, in the optimizer's order (for messages).

    Raises:
        CheckpointError: names the file and the entry.
    """
    path = ckpt.get("path", "?")
    state = ckpt["optimizer"]
    params = [p for g in optimizer.param_groups for p in g["params"]]
    groups = state["param_groups"]
    n_saved = sum(len(g.get("params", [])) for g in groups if isinstance(g, dict))
    if len(groups) != len(optimizer.param_groups) or n_saved != len(params):
        raise CheckpointError(f"checkpoint {path}: optimizer holds {n_saved} parameters in {len(groups)} group(s), "
                              f"the job has {len(params)} in {len(optimizer.param_groups)}")
    for idx, st in state["state"].items():
        if isinstance(idx, bool) or not isinstance(idx, int) or not 0 <= idx < len(params):
            raise CheckpointError(f"checkpoint {path}: optimizer state for unknown parameter index {idx!r}")
        for key, t in st.items():
            if key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") and tuple(t.shape) != tuple(params[idx].shape):
                raise CheckpointError(f"checkpoint {path}: optimizer entry {key!r} of {names[idx]!r} has shape "
                                      f"{tuple(t.shape)}, expected {tuple(params[idx].shape)}")
    try:
        optimizer.load_state_dict(state)
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {path}: optimizer state does not load: {e}") from e


def student_from_checkpoint(path: str | os.PathLike, base_model: nn.Module) -> RegisterStudent:
    """Rebuild the student of a checkpoint on a copy of `base_model` (the job's teacher), in eval mode.

    Raises:
        CheckpointError: if the checkpoint is unreadable or does not fit `base_model` (names the file and entry).
    """
    ckpt = load_checkpoint(path)
    job = ckpt["job"]
    try:
        cfg = StudentConfig(num_registers=job["num_registers"], unlock=tuple(job["unlock"]),
                            unlock_last_blocks=job["unlock_last_blocks"], target_block=job["target_block"],
                            init_seed=job["seed"], recipe=job.get("recipe", "plain"))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {ckpt['path']}: job settings do not describe a student: {e}") from e
    regs = ckpt["trainable"].get("registers")
    if regs is not None and (regs.ndim != 3 or regs.shape[1] < cfg.num_registers):
        raise CheckpointError(f"checkpoint {ckpt['path']}: entry 'registers' has shape {tuple(regs.shape)}, which "
                              f"does not hold num_registers={cfg.num_registers}")
    student = build_student(base_model, cfg)
    restore_trainable(ckpt, student.trainable_named_parameters())
    return student.eval()


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The checkpoint with the highest step under `<out_dir>/checkpoints` (temp files ignored), or None."""
    folder = Path(out_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _CKPT_RE.match(p.name))]
    return max(found)[1] if found else None


def prune_checkpoints(folder: str | os.PathLike, keep: int) -> None:
    """Delete all but the `keep` newest checkpoints in `folder`."""
    found = sorted((int(m.group(1)), p) for p in Path(folder).iterdir() if (m := _CKPT_RE.match(p.name)))
    for _, p in found[:-keep]:
        p.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------- train log


class TrainLog:
    """The job's `train_log.jsonl`: one JSON record per step, appended and flushed as the job runs.

    The log is the one file of the job that is appended rather than replaced (rewriting it atomically every step
    would cost O(steps) per step). A kill can leave a cut last line; `open(step)` first rewrites the file atomically
    with only the complete records up to `step` (the step a resumed job starts from), so it always matches the
    checkpoint it continues.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._file = None

    def open(self, step: int) -> TrainLog:
        """Trim the log to the records of steps <= `step` and open it for appending."""
        if self.path.is_file():
            kept = []
            for ln in self.path.read_text().splitlines():
                try:
                    rec = json.loads(ln)
                except ValueError:  # a line cut short by a kill
                    continue
                if isinstance(rec, dict) and rec.get("step", 0) <= step:
                    kept.append(ln)
            write_text_atomic(self.path, "".join(ln + "\n" for ln in kept))
        self._file = open(self.path, "a")  # noqa: SIM115 (closed by close())
        return self

    def write(self, record: Mapping[str, Any]) -> None:
        """Append one record and flush it."""
        self._file.write(json.dumps(dict(record)) + "\n")
        self._file.flush()

    def close(self) -> None:
        """Close the file (idempotent)."""
        if self._file is not None:
            self._file.close()
            self._file = None
