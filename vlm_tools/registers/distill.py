"""PH-Reg register distillation as a resumable training job.

The frozen teacher sees each image in ``n_views`` shift/flip views (:mod:`.tta`); the averaged patch features are the
target of a student with registers (:mod:`.student`). Loss: ``(1 - mean cos) + mse_scale * MSE`` on patch tokens in
fp32. AdamW; per-epoch exponential decay ``lr0 * (lr_min / lr0) ** (epoch / epochs)`` (PH-Reg's schedule, applied
after each epoch, floor ``lr_min``). Devices through ``accelerate`` (bf16 autocast on GPU; several GPUs with
``accelerate launch``). Checkpoints every N steps hold the trainable parameters, optimizer, scheduler, RNG states
(python/numpy/torch) and the stream position; they are written atomically, and ``resume`` continues bit-exactly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import random
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vlm_tools.core.io import write_bytes_atomic, write_text_atomic

from . import backbones, data, tta
from .student import DEFAULT_UNLOCK, RegisterStudent, StudentConfig, build_student, save_student

__all__ = [
    "CHECKPOINT_DIR",
    "STUDENT_DIR",
    "CheckpointError",
    "DistillConfig",
    "DistillSummary",
    "ExponentialDecay",
    "distill_loss",
    "latest_checkpoint",
    "load_backbone",
    "load_checkpoint",
    "run_distillation",
    "save_checkpoint",
    "student_from_checkpoint",
]

CHECKPOINT_DIR = "checkpoints"
STUDENT_DIR = "student"
_CKPT_FORMAT = "vlm_tools.registers.checkpoint/1"
_CKPT_RE = re.compile(r"^step_(\d+)\.pt$")
# Settings that shape the training trajectory: a checkpoint only resumes a job that agrees on all of them.
_TRAJECTORY_KEYS = ("backbone", "weights", "model_kwargs", "image_size", "batch_size", "lr", "lr_min",
                    "weight_decay", "epochs", "num_registers", "n_views", "shift_frac", "unlock",
                    "unlock_last_blocks", "target_block", "mse_scale", "seed", "mixed_precision")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, corrupt or from an incompatible job; the message names the file."""


@dataclass
class DistillConfig:
    """Settings of a distillation job (CLI flags map one to one).

    Attributes:
        backbone: ``timm:<model name>`` or ``hf:<local folder>`` (HF ``Dinov2Model`` / ``CLIPVisionModel``, or the
            vision tower of a LLaVA / LLaVA-NeXT checkpoint folder).
        out: Output folder (checkpoints, log, exported student).
        images: Image folder (any tree of jpg/png); exclusive with ``dataset``.
        dataset: Local dataset: a ``.txt`` list of images or a ``datasets.save_to_disk`` folder.
        weights: timm weights file or folder (hubs are not used); ignored for ``hf:``.
        model_kwargs: Extra ``timm.create_model`` keyword arguments.
        image_size: Training crop side (default: the model's native size); a multiple of the patch size.
        batch_size: Images per optimizer step over all processes.
        lr: Initial learning rate.
        lr_min: Final learning rate (floor).
        weight_decay: AdamW weight decay.
        epochs: Schedule length in epochs (an epoch = one pass over the images).
        max_steps: Stop after this many steps in total (default: ``epochs`` worth); the schedule is unchanged.
        num_registers: Registers to add.
        n_views: TTA views of the teacher.
        shift_frac: Maximum TTA shift as a fraction of the grid.
        unlock: Trainable groups (see :data:`.student.UNLOCK_GROUPS`).
        unlock_last_blocks: Blocks unlocked by ``last_block``.
        target_block: Distil this block's output instead of the final normalised output.
        mse_scale: Weight of the MSE term.
        checkpoint_every: Write a checkpoint every this many steps (and at the end).
        keep_checkpoints: How many recent checkpoints to keep.
        seed: Seed of everything random (data order, crops, TTA plans, register init).
        mixed_precision: ``auto`` (bf16 on GPU, none on CPU), ``no``, ``bf16`` or ``fp16``.
        cpu: Force CPU even when a GPU is present.
        num_workers: Data-loading worker processes.
        teacher_chunk: Teacher views per forward call (``None``: all views of a batch at once).
    """

    backbone: str
    out: str
    images: str | None = None
    dataset: str | None = None
    weights: str | None = None
    model_kwargs: dict = field(default_factory=dict)
    image_size: int | None = None
    batch_size: int = 8
    lr: float = 1e-4
    lr_min: float = 5e-6
    weight_decay: float = 1e-2
    epochs: int = 100
    max_steps: int | None = None
    num_registers: int = 16
    n_views: int = 10
    shift_frac: float = 0.15
    unlock: tuple[str, ...] = DEFAULT_UNLOCK
    unlock_last_blocks: int = 1
    target_block: int | None = None
    mse_scale: float = 1.0
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    seed: int = 0
    mixed_precision: str = "auto"
    cpu: bool = False
    num_workers: int = 0
    teacher_chunk: int | None = None

    def __post_init__(self) -> None:
        self.unlock = tuple(self.unlock)
        checks = [
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.lr > 0 and self.lr_min > 0, "lr and lr_min must be positive"),
            (self.lr_min <= self.lr, "lr_min must not exceed lr"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (self.epochs >= 1, "epochs must be >= 1"),
            (self.max_steps is None or self.max_steps >= 1, "max_steps must be >= 1"),
            (self.n_views >= 1, "n_views must be >= 1"),
            (self.checkpoint_every >= 1, "checkpoint_every must be >= 1"),
            (self.keep_checkpoints >= 1, "keep_checkpoints must be >= 1"),
            (self.mse_scale >= 0, "mse_scale must be >= 0"),
            (self.num_workers >= 0, "num_workers must be >= 0"),
            (self.teacher_chunk is None or self.teacher_chunk >= 1, "teacher_chunk must be >= 1"),
            (self.mixed_precision in ("auto", "no", "bf16", "fp16"), "mixed_precision must be auto/no/bf16/fp16"),
            (self.backbone.startswith(("timm:", "hf:")) and len(self.backbone.split(":", 1)[1]) > 0,
             f"backbone must be 'timm:<name>' or 'hf:<folder>', got {self.backbone!r}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        if (self.images is None) == (self.dataset is None):
            raise ValueError("give exactly one of images (a folder) or dataset")
        self.student_config()  # validates registers/unlock/target settings

    def student_config(self) -> StudentConfig:
        """The :class:`StudentConfig` of this job."""
        return StudentConfig(num_registers=self.num_registers, unlock=self.unlock,
                             unlock_last_blocks=self.unlock_last_blocks, target_block=self.target_block,
                             init_seed=self.seed)

    def to_json(self) -> dict:
        """JSON-serialisable dict."""
        d = dataclasses.asdict(self)
        d["unlock"] = list(self.unlock)
        return d


@dataclass
class DistillSummary:
    """What a job did (also written to ``<out>/summary.json``).

    Attributes:
        steps: Steps completed in total.
        start_step: Step the run started from (non-zero when resumed).
        final_loss: Loss of the last step of this run (``nan`` when no step ran).
        seconds_per_step: Mean wall time per step of this run, the first step excluded when there are several.
        images_per_second: ``batch_size / seconds_per_step``.
        teacher_forward_seconds: One teacher forward on one per-process batch (no TTA), for reference.
        step_over_teacher_forward: ``seconds_per_step / teacher_forward_seconds``.
        student_dir: Export folder, when the run reached the last step.
        checkpoint: The last checkpoint written.
    """

    steps: int
    start_step: int
    final_loss: float
    seconds_per_step: float
    images_per_second: float
    teacher_forward_seconds: float
    step_over_teacher_forward: float
    student_dir: str | None
    checkpoint: str | None


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, mse_scale: float = 1.0,
                 eps: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PH-Reg loss on patch tokens, in fp32: ``(1 - mean_i cos(t_i, s_i)) + mse_scale * MSE(t, s)``.

    The cosine is written out (L2 normalisation with ``eps``), as in the reference, not ``F.cosine_similarity``.

    Args:
        student: ``(B, N, D)`` student patch tokens.
        teacher: ``(B, N, D)`` target patch tokens.
        mse_scale: Weight of the MSE term.
        eps: Norm floor of the normalisation.

    Returns:
        ``(loss, 1 - mean cos, mse)``.
    """
    if student.shape != teacher.shape:
        raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} shapes differ")
    s, t = student.float(), teacher.float()
    sn = s / s.norm(dim=-1, keepdim=True).clamp_min(eps)
    tn = t / t.norm(dim=-1, keepdim=True).clamp_min(eps)
    cos_term = 1.0 - (sn * tn).sum(-1).mean()
    mse = ((s - t) ** 2).mean()
    return cos_term + mse_scale * mse, cos_term, mse


@dataclass
class ExponentialDecay:
    """LR multiplier of the reference schedule: ``max(lr_min, lr0 * (lr_min / lr0) ** (epoch / epochs)) / lr0``.

    ``epoch = (step * batch_size) // num_images`` counts completed passes, so the LR changes after each epoch.
    """

    lr0: float
    lr_min: float
    epochs: int
    batch_size: int
    num_images: int

    def __call__(self, step: int) -> float:
        epoch = (step * self.batch_size) // self.num_images
        lr = self.lr0 * (self.lr_min / self.lr0) ** (min(epoch, self.epochs) / self.epochs)
        return max(self.lr_min, lr) / self.lr0


def _timm_weights_file(path: Path) -> Path:
    if path.is_file():
        return path
    if path.is_dir():
        for name in ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors",
                     "open_clip_pytorch_model.bin"):
            if (path / name).is_file():
                return path / name
        cands = sorted(list(path.glob("*.safetensors")) + list(path.glob("*.pth")) + list(path.glob("*.bin")))
        if len(cands) == 1:
            return cands[0]
        raise FileNotFoundError(f"no single weights file in {path} (found {[c.name for c in cands]})")
    raise FileNotFoundError(f"weights not found: {path}")


def load_backbone(backbone: str, weights: str | None = None, model_kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """Load a teacher ViT from local files (model hubs are never contacted for weights).

    Args:
        backbone: ``timm:<name>`` (``timm.create_model``; random init unless ``weights``) or ``hf:<folder>``
            (``Dinov2Model`` / ``CLIPVisionModel`` ``from_pretrained`` of a local folder, or the vision tower
            of a local LLaVA / LLaVA-NeXT checkpoint).
        weights: timm only: a weights file, or a folder holding one (``model.safetensors``, ``pytorch_model.bin``).
        model_kwargs: timm only: extra ``create_model`` arguments (e.g. ``img_size``, ``dynamic_img_size``).

    Returns:
        The model in eval mode.

    Raises:
        ValueError: For an unknown prefix or HF model type.
    """
    kind, _, name = backbone.partition(":")
    if kind == "timm":
        import timm

        if not timm.is_model(name):
            raise ValueError(f"unknown timm model {name!r} (see timm.list_models())")
        kwargs = dict(model_kwargs or {})
        if weights is not None:
            kwargs["pretrained"] = True
            kwargs["pretrained_cfg_overlay"] = {"file": str(_timm_weights_file(Path(weights)))}
        else:
            kwargs.setdefault("pretrained", False)
        return timm.create_model(name, **kwargs).eval()
    if kind == "hf":
        from transformers import AutoConfig, CLIPVisionModel, Dinov2Model

        if weights is not None or model_kwargs:
            raise ValueError("--weights/--model-kwargs apply to timm backbones; an hf: folder holds its own")
        folder = Path(name)
        if not folder.is_dir():
            raise FileNotFoundError(f"HF model folder not found: {folder}")
        cfg = AutoConfig.from_pretrained(str(folder))
        if cfg.model_type == "dinov2":
            return Dinov2Model.from_pretrained(str(folder)).eval()
        if cfg.model_type in ("clip_vision_model", "clip"):
            return CLIPVisionModel.from_pretrained(str(folder)).eval()
        if cfg.model_type in ("llava", "llava_next"):
            return _load_llava_tower(folder, cfg)
        raise ValueError(f"unsupported HF model type {cfg.model_type!r} in {folder}; supported: dinov2, "
                         "clip_vision_model, clip, and the vision tower of llava / llava_next")
    raise ValueError(f"backbone must start with 'timm:' or 'hf:', got {backbone!r}")


def _load_llava_tower(folder: Path, cfg: Any) -> nn.Module:
    """The vision tower of a local LLaVA / LLaVA-NeXT checkpoint, in fp32.

    The whole model is loaded through transformers (so its checkpoint key conversions apply) in the checkpoint's own
    dtype, and everything but the tower is released: this needs the memory of the full checkpoint once.
    """
    from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    if cfg.vision_config.model_type not in ("dinov2", "clip_vision_model"):
        raise ValueError(f"{folder}: unsupported vision tower {cfg.vision_config.model_type!r}; supported: dinov2, "
                         "clip_vision_model")
    cls = LlavaForConditionalGeneration if cfg.model_type == "llava" else LlavaNextForConditionalGeneration
    full = cls.from_pretrained(str(folder), dtype="auto")
    tower = full.model.vision_tower
    del full
    return tower.float().eval()


# ----------------------------------------------------------------------------------------------------- checkpoints


def _atomic_torch_save(obj: Any, path: Path) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    write_bytes_atomic(path, buf.getvalue())


def _rng_state() -> dict:
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


def _set_rng_state(state: Mapping[str, Any]) -> None:
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
        path: Target file.
        step: Optimizer steps completed.
        items_consumed: Stream position (images consumed over all processes).
        trainable: The student's trainable tensors by name.
        optimizer: The optimizer.
        scheduler: The LR scheduler.
        job: The job settings (checked on resume).

    Returns:
        The path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    obj = {
        "format": _CKPT_FORMAT,
        "step": int(step),
        "items_consumed": int(items_consumed),
        "trainable": {k: v.detach().to("cpu").clone() for k, v in trainable.items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": _rng_state(),
        "job": json.dumps(dict(job), sort_keys=True),
    }
    _atomic_torch_save(obj, path)
    return path


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read and validate a checkpoint.

    Raises:
        CheckpointError: If it is missing, truncated/corrupt or not a checkpoint of this job format (names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated/garbled files
        raise CheckpointError(f"corrupt or unreadable checkpoint {path}: {type(e).__name__}: {e}") from e
    required = ("format", "step", "items_consumed", "trainable", "optimizer", "scheduler", "rng", "job")
    if not isinstance(obj, dict) or obj.get("format") != _CKPT_FORMAT or any(k not in obj for k in required):
        raise CheckpointError(f"{path} is not a {_CKPT_FORMAT} checkpoint")
    obj["job"] = json.loads(obj["job"])
    obj["path"] = str(path)
    return obj


def student_from_checkpoint(path: str | os.PathLike, base_model: nn.Module) -> RegisterStudent:
    """Rebuild the student of a checkpoint on a copy of ``base_model`` (the job's teacher), in eval mode.

    Raises:
        CheckpointError: If the checkpoint is unreadable or does not fit ``base_model`` (names the file).
    """
    ckpt = load_checkpoint(path)
    job = ckpt["job"]
    cfg = StudentConfig(num_registers=job["num_registers"], unlock=tuple(job["unlock"]),
                        unlock_last_blocks=job["unlock_last_blocks"], target_block=job["target_block"],
                        init_seed=job["seed"])
    student = build_student(base_model, cfg)
    params = student.trainable_named_parameters()
    if set(params) != set(ckpt["trainable"]):
        raise CheckpointError(f"checkpoint {ckpt['path']} holds parameters {sorted(ckpt['trainable'])}, "
                              f"expected {sorted(params)}")
    with torch.no_grad():
        for k, p in params.items():
            t = ckpt["trainable"][k]
            if t.shape != p.shape:
                raise CheckpointError(f"checkpoint {ckpt['path']}: {k} has shape {tuple(t.shape)}, "
                                      f"expected {tuple(p.shape)}")
            p.copy_(t.to(device=p.device, dtype=p.dtype))
    return student.eval()


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The checkpoint with the highest step under ``<out_dir>/checkpoints`` (temp files ignored), or ``None``."""
    folder = Path(out_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _CKPT_RE.match(p.name))]
    return max(found)[1] if found else None


def _prune_checkpoints(folder: Path, keep: int) -> None:
    found = sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := _CKPT_RE.match(p.name)))
    for _, p in found[:-keep]:
        p.unlink(missing_ok=True)


def _trim_log(log_path: Path, step: int) -> None:
    if not log_path.is_file():
        return
    kept = []
    for ln in log_path.read_text().splitlines():
        try:
            rec = json.loads(ln)
        except ValueError:  # a line cut short by a kill
            continue
        if isinstance(rec, dict) and rec.get("step", 0) <= step:
            kept.append(ln)
    write_text_atomic(log_path, "".join(ln + "\n" for ln in kept))


# ------------------------------------------------------------------------------------------------------------ job


def _mixed_precision(cfg: DistillConfig) -> str:
    if cfg.mixed_precision != "auto":
        return cfg.mixed_precision
    return "bf16" if torch.cuda.is_available() and not cfg.cpu else "no"


def _time_teacher_forward(teacher: nn.Module, batch: torch.Tensor, autocast, device: torch.device) -> float:
    def run() -> None:
        with torch.no_grad(), autocast():
            backbones.patch_tokens(teacher, batch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    run()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def run_distillation(cfg: DistillConfig, *, teacher: nn.Module | None = None,
                     resume: bool | str | os.PathLike | None = None, progress: bool = True,
                     step_callback: Callable[[int, float], None] | None = None) -> DistillSummary:
    """Run (or resume) a distillation job.

    Args:
        cfg: The job settings.
        teacher: An already-built teacher (default: :func:`load_backbone` of ``cfg``). It is put in eval mode and
            moved to the job's device; its parameters are never changed (the student is a copy).
        resume: ``True`` resumes from the latest checkpoint in ``cfg.out``; a path resumes from that file.
        progress: Show a tqdm progress bar (main process only).
        step_callback: Called as ``step_callback(step, loss)`` after every step (and after its checkpoint).

    Returns:
        The :class:`DistillSummary`.

    Raises:
        CheckpointError: If resuming from a missing/corrupt/incompatible checkpoint.
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    out = Path(cfg.out)
    ckpt = None
    if resume:
        path = latest_checkpoint(out) if resume is True else Path(resume)
        if path is None:
            raise CheckpointError(f"--resume: no checkpoint under {out / CHECKPOINT_DIR}")
        ckpt = load_checkpoint(path)

    random.seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    torch.manual_seed(cfg.seed)
    acc = Accelerator(mixed_precision=_mixed_precision(cfg), cpu=cfg.cpu)
    main = acc.is_main_process

    if teacher is None:
        teacher = load_backbone(cfg.backbone, cfg.weights, cfg.model_kwargs)
    teacher.eval()
    student = build_student(teacher, cfg.student_config())
    spec = student.base_spec
    size = cfg.image_size or spec.image_size
    gh, gw = backbones.grid_shape(spec, size, size)
    source = data.open_source(cfg.images, cfg.dataset)
    n_images = len(source)
    steps_per_epoch = math.ceil(n_images / cfg.batch_size)
    total = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * steps_per_epoch
    job = {k: getattr(cfg, k) for k in _TRAJECTORY_KEYS}
    job["unlock"] = list(cfg.unlock)
    job["image_size"] = size
    job["mixed_precision"] = _mixed_precision(cfg)
    job["images_fingerprint"] = hashlib.sha256("\n".join(source.fingerprint()).encode()).hexdigest()
    job["num_images"] = n_images
    job["num_processes"] = acc.num_processes
    job = json.loads(json.dumps(job, sort_keys=True))

    trainable = student.freeze_for_training()
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, ExponentialDecay(cfg.lr, cfg.lr_min, cfg.epochs, cfg.batch_size, n_images))
    teacher.to(acc.device)
    student.train()
    student, optimizer = acc.prepare(student, optimizer)
    raw_student: RegisterStudent = acc.unwrap_model(student)

    start = 0
    if ckpt is not None:
        diff = sorted(k for k in set(job) | set(ckpt["job"]) if job.get(k) != ckpt["job"].get(k))
        if diff:
            raise CheckpointError(f"checkpoint {ckpt['path']} is from a different job: settings differ on {diff}")
        params = raw_student.trainable_named_parameters()
        if set(params) != set(ckpt["trainable"]):
            raise CheckpointError(f"checkpoint {ckpt['path']} holds parameters {sorted(ckpt['trainable'])}, "
                                  f"expected {sorted(params)}")
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(ckpt["trainable"][k].to(device=p.device, dtype=p.dtype))
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        start = ckpt["step"]
        if ckpt["items_consumed"] != start * cfg.batch_size:
            raise CheckpointError(f"checkpoint {ckpt['path']}: stream position {ckpt['items_consumed']} does not "
                                  f"match step {start} x batch {cfg.batch_size}")
        _set_rng_state(ckpt["rng"])

    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "job.json").write_text(json.dumps(cfg.to_json(), indent=2) + "\n")
        _trim_log(out / "train_log.jsonl", start)
    stream = data.StepBatches(source, size, spec.mean, spec.std, cfg.batch_size, cfg.seed, start, total,
                              rank=acc.process_index, world=acc.num_processes)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, shuffle=False, num_workers=cfg.num_workers,
                                         generator=torch.Generator())
    fill = spec.white()

    def teacher_fn(x: torch.Tensor) -> torch.Tensor:
        return backbones.patch_tokens(teacher, x, cfg.target_block)

    teacher_s = float("nan")
    times: list[float] = []
    loss_value = float("nan")
    last_ckpt: Path | None = None
    bar = tqdm(total=total, initial=start, disable=not (progress and main), desc="distill", dynamic_ncols=True)
    log = None
    try:
        if main:
            log = open(out / "train_log.jsonl", "a")  # noqa: SIM115 (closed in finally)
        for step, (pixels, items) in zip(range(start, total), loader):
            t0 = time.perf_counter()
            pixels = pixels.to(acc.device)
            if math.isnan(teacher_s):
                teacher_s = _time_teacher_forward(teacher, pixels, acc.autocast, acc.device)
                t0 = time.perf_counter()
            plans = [tta.sample_plan(gh, gw, cfg.n_views, cfg.shift_frac, data.item_seed(cfg.seed, 2, k))
                     for k in items.tolist()]
            with torch.no_grad(), acc.autocast():
                target, _ = tta.tta_features(teacher_fn, pixels, plans, spec.patch_size, fill, cfg.teacher_chunk)
            with acc.autocast():
                pred = student(pixels)
            loss, cos_term, mse = distill_loss(pred, target, cfg.mse_scale)
            optimizer.zero_grad(set_to_none=True)
            acc.backward(loss)
            optimizer.step()
            scheduler.step()
            done = step + 1
            loss_value = float(acc.reduce(loss.detach(), "mean") if acc.num_processes > 1 else loss.detach())
            if acc.device.type == "cuda":
                torch.cuda.synchronize(acc.device)
            times.append(time.perf_counter() - t0)
            if main:
                rec = {"step": done, "loss": loss_value, "cos": float(cos_term.detach()), "mse": float(mse.detach()),
                       "lr": scheduler.get_last_lr()[0], "seconds": times[-1]}
                log.write(json.dumps(rec) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{rec['lr']:.2e}")
                bar.update(1)
            if done % cfg.checkpoint_every == 0 or done == total:
                acc.wait_for_everyone()
                if main:
                    last_ckpt = save_checkpoint(
                        out / CHECKPOINT_DIR / f"step_{done:08d}.pt", step=done, items_consumed=done * cfg.batch_size,
                        trainable=raw_student.trainable_named_parameters(), optimizer=optimizer, scheduler=scheduler,
                        job=job)
                    _prune_checkpoints(out / CHECKPOINT_DIR, cfg.keep_checkpoints)
                acc.wait_for_everyone()
            if step_callback is not None:
                step_callback(done, loss_value)
    finally:
        bar.close()
        if log is not None:
            log.close()

    steps_done = start + len(times)
    student_dir = None
    sec = float(np.mean(times[1:] if len(times) > 1 else times)) if times else float("nan")
    summary = DistillSummary(
        steps=steps_done, start_step=start, final_loss=loss_value, seconds_per_step=sec,
        images_per_second=cfg.batch_size / sec if times else float("nan"), teacher_forward_seconds=teacher_s,
        step_over_teacher_forward=sec / teacher_s if times else float("nan"), student_dir=None,
        checkpoint=str(last_ckpt) if last_ckpt else None)
    if main and steps_done == total:
        raw_student.eval()
        student_dir = save_student(raw_student, out / STUDENT_DIR, extra={"job": cfg.to_json(), "steps": steps_done})
        summary.student_dir = str(student_dir)
    if main:
        (out / "summary.json").write_text(json.dumps(dataclasses.asdict(summary), indent=2) + "\n")
    acc.wait_for_everyone()
    return summary
