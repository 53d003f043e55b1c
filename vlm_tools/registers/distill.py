"""PH-Reg register distillation as a resumable training job (the training loop; checkpoint I/O is `.checkpoint`).

The frozen teacher sees each image in ``n_views`` shift/flip views (:mod:`.tta`); the averaged patch features are the
target of a student with registers (:mod:`.student`). Loss: ``(1 - mean cos) + mse_scale * MSE`` on patch tokens in
fp32. AdamW with PH-Reg's per-epoch exponential decay (`ExponentialDecay`: the official loop writes the rate after
every step with ``epoch + 1``, so it changes once per epoch, from the epoch's second step; floor ``lr_min``).
Devices through ``accelerate`` (bf16 autocast on GPU; several GPUs with ``accelerate launch``). Checkpoints every N
steps hold the trainable parameters, optimizer, scheduler, RNG states (python/numpy/torch) and the stream position;
they are written atomically, and ``resume`` continues bit-exactly.

The output folder belongs to one job: a new job refuses a folder that holds a previous one unless it resumes it or
is told to overwrite it; temporaries a killed job left there are removed when the next one starts. With
``handle_signals`` (the CLI), SIGTERM / SIGINT end the job after the current step with a checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from vlm_tools.core.adapters import get_tower
from vlm_tools.core.hooks import HookHandle
from vlm_tools.core.io import write_json_atomic

from . import checkpoint as ck
from . import data, tta
from .backbones import BACKBONE_SHORTCUTS, load_backbone
from .clip_recipe import NACLIP_STD, RECIPES, attach_naclip_teacher, dense_projection, resolve_recipe
from .student import DEFAULT_UNLOCK, RegisterStudent, StudentConfig, build_student, save_student

__all__ = [
    "STUDENT_DIR",
    "DistillConfig",
    "DistillSummary",
    "ExponentialDecay",
    "distill_loss",
    "run_distillation",
]

STUDENT_DIR = "student"
# Settings that shape the training trajectory: a checkpoint only resumes a job that agrees on all of them.
_TRAJECTORY_KEYS = ("backbone", "weights", "model_kwargs", "image_size", "batch_size", "lr", "lr_min",
                    "weight_decay", "epochs", "num_registers", "n_views", "shift_frac", "unlock",
                    "unlock_last_blocks", "target_block", "mse_scale", "seed", "mixed_precision", "recipe",
                    "naclip_std")


@dataclass
class DistillConfig:
    """Settings of a distillation job (CLI flags map one to one).

    Attributes:
        backbone: ``timm:<model name>``, ``hf:<local folder>`` (HF ``Dinov2Model`` / ``CLIPVisionModel``, or the
            vision tower of a LLaVA / LLaVA-NeXT checkpoint folder), or a name of `.backbones.BACKBONE_SHORTCUTS`
            (the DINOv2-S of the default model's cache).
        out: Output folder (checkpoints, log, exported student).
        images: Image folder (any tree of jpg/png); exclusive with ``dataset``.
        dataset: Local dataset: a ``.txt`` list of images or a ``datasets.save_to_disk`` folder.
        weights: timm weights file or folder (hubs are not used); ignored for ``hf:``.
        model_kwargs: Extra ``timm.create_model`` keyword arguments.
        image_size: Training crop side (default: the model's native size); a multiple of the patch size. timm
            backbones are built for it (``img_size``).
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
        recipe: ``auto`` (PH-Reg's CLIP recipe for CLIP towers distilled at their final output, the plain recipe
            otherwise), ``clip`` or ``plain`` (see `.clip_recipe`).
        naclip_std: Std (in patches) of the CLIP recipe teacher's Gaussian window (NACLIP's default 5).
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
    recipe: str = "auto"
    naclip_std: float = NACLIP_STD

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
            (self.backbone in BACKBONE_SHORTCUTS
             or (self.backbone.startswith(("timm:", "hf:")) and len(self.backbone.split(":", 1)[1]) > 0),
             f"backbone must be 'timm:<name>', 'hf:<folder>' or one of {sorted(BACKBONE_SHORTCUTS)}, "
             f"got {self.backbone!r}"),
            (self.image_size is None or self.image_size >= 1, "image_size must be >= 1"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        if (self.images is None) == (self.dataset is None):
            raise ValueError("give exactly one of images (a folder) or dataset")
        if self.recipe not in ("auto", *RECIPES):
            raise ValueError(f"recipe must be auto, {', '.join(RECIPES)}; got {self.recipe!r}")
        if self.recipe == "clip" and self.target_block is not None:
            raise ValueError("the CLIP recipe distils the final output (it replaces the last block); "
                             f"target_block={self.target_block} needs recipe 'plain'")
        if not self.naclip_std > 0:
            raise ValueError(f"naclip_std must be positive, got {self.naclip_std}")
        self.student_config()  # validates registers/unlock/target settings

    def student_config(self, recipe: str | None = None) -> StudentConfig:
        """The :class:`StudentConfig` of this job (``recipe``: the resolved recipe; default: the configured one,
        ``auto`` read as ``plain``)."""
        recipe = recipe or ("plain" if self.recipe == "auto" else self.recipe)
        return StudentConfig(num_registers=self.num_registers, unlock=self.unlock,
                             unlock_last_blocks=self.unlock_last_blocks, target_block=self.target_block,
                             init_seed=self.seed, recipe=recipe)

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
        stopped_by: The signal (``"SIGTERM"``, ``"SIGINT"``) that ended the run early, after a checkpoint.
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
    stopped_by: str | None = None


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
    """LR multiplier of PH-Reg's schedule (``DINOv2_full/distill_main.py``), as a `LambdaLR` lambda of the step.

    The official loop writes ``lr0 * (lr_min / lr0) ** ((epoch + 1) / epochs)`` (floor ``lr_min``) into the
    optimizer after every step of epoch ``epoch``. The value changes once per epoch and is first used by the
    epoch's second step, so optimizer step ``t`` (0-based, ``S`` steps per epoch) runs at
    ``max(lr_min, lr0 * r ** (ceil(t / S) / epochs))`` with ``r = lr_min / lr0``: ``lr0`` for the very first step
    only, and ``lr_min`` from the second step of the last epoch on.

    ``S`` is the job's steps per epoch, ``ceil(num_images / batch_size)`` (the job's image stream has no
    ``drop_last``; the official loader's is ``num_images // batch_size``).
    """

    lr0: float
    lr_min: float
    epochs: int
    steps_per_epoch: int

    def __post_init__(self) -> None:
        if self.steps_per_epoch < 1 or self.epochs < 1:
            raise ValueError(f"epochs and steps_per_epoch must be >= 1, got {self.epochs}, {self.steps_per_epoch}")

    def __call__(self, step: int) -> float:
        epoch = -(-step // self.steps_per_epoch)  # ceil(step / S)
        lr = self.lr0 * (self.lr_min / self.lr0) ** (min(epoch, self.epochs) / self.epochs)
        return max(self.lr_min, lr) / self.lr0


# ------------------------------------------------------------------------------------------------------------ job


def _mixed_precision(cfg: DistillConfig) -> str:
    if cfg.mixed_precision != "auto":
        return cfg.mixed_precision
    return "bf16" if torch.cuda.is_available() and not cfg.cpu else "no"


def _time_teacher_forward(feature_fn: Callable[[torch.Tensor], torch.Tensor], batch: torch.Tensor, autocast,
                          device: torch.device) -> float:
    def run() -> None:
        with torch.no_grad(), autocast():
            feature_fn(batch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    run()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


class _StopRequest:
    """Signal handler that records the first SIGTERM / SIGINT (the job stops after the current step); a second
    SIGINT raises `KeyboardInterrupt` at once."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __call__(self, signum: int, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    @property
    def name(self) -> str | None:
        return None if self.signum is None else signal.Signals(self.signum).name


@contextlib.contextmanager
def _stop_on_signals(enabled: bool) -> Iterator[_StopRequest]:
    """Install `_StopRequest` for SIGTERM and SIGINT for the block (main thread only), restoring the old handlers."""
    stop = _StopRequest()
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _prepare_out(cfg: DistillConfig, resume, overwrite: bool) -> Path:
    """Check the output folder before any work: writable, and not a previous job unless resuming / overwriting."""
    out = ck.check_writable_dir(cfg.out)
    if resume and overwrite:
        raise ValueError("give resume or overwrite, not both")
    if not resume:
        found = ck.existing_job_outputs(out)
        if found and not overwrite:
            raise ck.OutputExistsError(f"--out {out} already holds a distillation job ({', '.join(found)}); pass "
                                       "--resume to continue it or --overwrite to start it again")
    return out


def run_distillation(cfg: DistillConfig, *, teacher: nn.Module | None = None,
                     resume: bool | str | os.PathLike | None = None, overwrite: bool = False, progress: bool = True,
                     handle_signals: bool = False,
                     step_callback: Callable[[int, float], None] | None = None) -> DistillSummary:
    """Run (or resume) a distillation job.

    Args:
        cfg: The job settings.
        teacher: An already-built teacher (default: `.backbones.load_backbone` of ``cfg``). It is put in eval mode
            and moved to the job's device; its parameters are never changed (the student is a copy).
        resume: ``True`` resumes from the latest checkpoint in ``cfg.out``; a path resumes from that file.
        overwrite: Start a new job in an ``out`` folder that holds a previous one (its checkpoints, log and export
            are deleted first). Without it (and without ``resume``) such a folder is refused.
        progress: Show a tqdm progress bar (main process only).
        handle_signals: Catch SIGTERM / SIGINT for the run (main thread only): the job stops after the current step,
            writes a checkpoint and returns with ``stopped_by`` set (the CLI turns on this).
        step_callback: Called as ``step_callback(step, loss)`` after every step (and after its checkpoint).

    Returns:
        The :class:`DistillSummary`.

    Raises:
        CheckpointError: If resuming from a missing/corrupt/incompatible checkpoint.
        OutputExistsError: If ``out`` holds a previous job and neither ``resume`` nor ``overwrite`` is given.
        ValueError: If ``out`` is not a writable folder.
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    out = _prepare_out(cfg, resume, overwrite)
    ckpt = None
    if resume:
        path = ck.latest_checkpoint(out) if resume is True else Path(resume)
        if path is None:
            raise ck.CheckpointError(f"--resume: no checkpoint under {out / ck.CHECKPOINT_DIR}")
        ckpt = ck.load_checkpoint(path)

    random.seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    torch.manual_seed(cfg.seed)
    acc = Accelerator(mixed_precision=_mixed_precision(cfg), cpu=cfg.cpu)
    main = acc.is_main_process

    if teacher is None:
        teacher = load_backbone(cfg.backbone, cfg.weights, cfg.model_kwargs, cfg.image_size)
    teacher.eval()
    recipe = resolve_recipe(cfg.recipe, teacher, cfg.target_block)
    student = build_student(teacher, cfg.student_config(recipe))  # before the teacher gets the recipe's hooks
    spec = student.base_spec
    teacher_tower = get_tower(teacher)
    size = cfg.image_size or spec.image_size
    gh, gw = teacher_tower.grid(size, size)
    source = data.open_source(cfg.images, cfg.dataset)
    n_images = len(source)
    steps_per_epoch = math.ceil(n_images / cfg.batch_size)
    total = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * steps_per_epoch
    job = {k: getattr(cfg, k) for k in _TRAJECTORY_KEYS}
    job["unlock"] = list(cfg.unlock)
    job["image_size"] = size
    job["mixed_precision"] = _mixed_precision(cfg)
    job["recipe"] = recipe
    if recipe != "clip":
        job["naclip_std"] = None
    job["images_fingerprint"] = hashlib.sha256("\n".join(source.fingerprint()).encode()).hexdigest()
    job["num_images"] = n_images
    job["num_processes"] = acc.num_processes
    job = json.loads(json.dumps(job, sort_keys=True))

    trainable = student.freeze_for_training()
    names = list(student.trainable_named_parameters())
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, ExponentialDecay(cfg.lr, cfg.lr_min, cfg.epochs, steps_per_epoch))
    teacher.to(acc.device)
    student.train()
    student, optimizer = acc.prepare(student, optimizer)
    raw_student: RegisterStudent = acc.unwrap_model(student)

    start = 0
    if ckpt is not None:
        diff = sorted(k for k in set(job) | set(ckpt["job"]) if job.get(k) != ckpt["job"].get(k))
        if diff:
            raise ck.CheckpointError(f"checkpoint {ckpt['path']} is from a different job: settings differ on {diff}")
        start = ckpt["step"]
        if ckpt["items_consumed"] != start * cfg.batch_size:
            raise ck.CheckpointError(f"checkpoint {ckpt['path']}: stream position {ckpt['items_consumed']} does not "
                                     f"match step {start} x batch {cfg.batch_size}")
        ck.restore_trainable(ckpt, raw_student.trainable_named_parameters())
        ck.restore_optimizer(ckpt, optimizer, names)
        scheduler.load_state_dict(ckpt["scheduler"])
        ck.set_rng_state(ckpt["rng"])

    log = ck.TrainLog(out / "train_log.jsonl")
    if main:
        ck.clean_stale_temporaries(out)
        if overwrite and not resume:
            ck.clear_job_outputs(out)
        write_json_atomic(out / "job.json", cfg.to_json(), indent=2)
        log.open(start)
    stream = data.StepBatches(source, size, spec.mean, spec.std, cfg.batch_size, cfg.seed, start, total,
                              rank=acc.process_index, world=acc.num_processes)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, shuffle=False, num_workers=cfg.num_workers,
                                         generator=torch.Generator())
    fill = spec.white()

    projection = dense_projection(teacher) if recipe == "clip" else None

    def teacher_fn(x: torch.Tensor) -> torch.Tensor:
        feats = teacher_tower.patch_tokens(x, cfg.target_block)
        return feats if projection is None else projection(feats)

    def save(done: int) -> Path:
        path = ck.save_checkpoint(
            out / ck.CHECKPOINT_DIR / f"step_{done:08d}.pt", step=done, items_consumed=done * cfg.batch_size,
            trainable=raw_student.trainable_named_parameters(), optimizer=optimizer, scheduler=scheduler, job=job)
        ck.prune_checkpoints(out / ck.CHECKPOINT_DIR, cfg.keep_checkpoints)
        return path

    teacher_s = float("nan")
    times: list[float] = []
    loss_value = float("nan")
    last_ckpt: Path | None = None
    saved_at = start
    bar = tqdm(total=total, initial=start, disable=not (progress and main), desc="distill", dynamic_ncols=True)
    teacher_hooks = HookHandle("registers.teacher")
    if recipe == "clip":  # NACLIP's last block on the teacher instance, for this job only
        attach_naclip_teacher(teacher, teacher_hooks, cfg.naclip_std)
    with _stop_on_signals(handle_signals) as stop:
        try:
            batches = iter(loader)
            for step in range(start, total):
                try:
                    pixels, items = next(batches)
                except Exception:
                    if stop.signum is not None:  # Ctrl-C reached the loader workers too
                        break
                    raise
                t0 = time.perf_counter()
                pixels = pixels.to(acc.device)
                if math.isnan(teacher_s):
                    teacher_s = _time_teacher_forward(teacher_fn, pixels, acc.autocast, acc.device)
                    t0 = time.perf_counter()
                plans = [tta.sample_plan(gh, gw, cfg.n_views, cfg.shift_frac, data.item_seed(cfg.seed, 2, k))
                         for k in items.tolist()]
                with torch.no_grad(), acc.autocast():
                    target, _ = tta.tta_features(teacher_fn, pixels, plans, spec.patch_size, fill, cfg.teacher_chunk)
                with acc.autocast():
                    pred = student(pixels)
                loss, cos_term, mse = distill_loss(pred, target, cfg.mse_scale)
                lr_used = optimizer.param_groups[0]["lr"]
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
                    rec = {"step": done, "loss": loss_value, "cos": float(cos_term.detach()),
                           "mse": float(mse.detach()), "lr": lr_used, "seconds": times[-1]}
                    log.write(rec)
                    bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr_used:.2e}")
                    bar.update(1)
                stopping = stop.signum is not None
                if acc.num_processes > 1:  # every process stops at the same step
                    flag = torch.tensor(float(stopping), device=acc.device)
                    stopping = bool(acc.reduce(flag, "sum") > 0)
                if done % cfg.checkpoint_every == 0 or done == total or stopping:
                    acc.wait_for_everyone()
                    if main:
                        last_ckpt = save(done)
                    saved_at = done
                    acc.wait_for_everyone()
                if step_callback is not None:
                    step_callback(done, loss_value)
                if stopping:
                    break
            if stop.signum is not None and saved_at != start + len(times) and main:
                last_ckpt = save(start + len(times))  # stopped while fetching a batch
        finally:
            teacher_hooks.remove()
            bar.close()
            log.close()

    steps_done = start + len(times)
    sec = float(np.mean(times[1:] if len(times) > 1 else times)) if times else float("nan")
    summary = DistillSummary(
        steps=steps_done, start_step=start, final_loss=loss_value, seconds_per_step=sec,
        images_per_second=cfg.batch_size / sec if times else float("nan"), teacher_forward_seconds=teacher_s,
        step_over_teacher_forward=sec / teacher_s if times else float("nan"), student_dir=None,
        checkpoint=str(last_ckpt) if last_ckpt else None, stopped_by=stop.name)
    if main and steps_done == total:
        raw_student.eval()
        teacher_info = ({"kind": "naclip", "gaussian_std": cfg.naclip_std, "last_block": "key-key attention + "
                         "Gaussian window, no residual / MLP", "projection": projection is not None}
                        if recipe == "clip" else {"kind": "plain"})
        student_dir = save_student(raw_student, out / STUDENT_DIR, extra={
            "job": cfg.to_json(), "steps": steps_done, "recipe": recipe, "teacher": teacher_info})
        summary.student_dir = str(student_dir)
    if main:
        write_json_atomic(out / "summary.json", dataclasses.asdict(summary), indent=2)
    acc.wait_for_everyone()
    return summary
