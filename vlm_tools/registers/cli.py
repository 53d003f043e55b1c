"""``vlm-tools registers`` commands: ``distill`` (the PH-Reg job) and ``report`` (artifact metrics).

``register_cli(subparsers)`` adds the ``registers`` command group to the main CLI; ``main(argv)`` runs it stand-alone
(``python -m vlm_tools.registers.cli distill ...``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["build_parser", "main", "register_cli"]


def _json_dict(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object, e.g. '{\"img_size\": 224}'")
    return value


def _groups(text: str) -> tuple[str, ...]:
    return tuple(g.strip() for g in text.split(",") if g.strip())


def _add_backbone_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backbone", required=True, help="timm:<model name>, or hf:<local folder> of a Dinov2/CLIP vision model or of a LLaVA (its tower)")
    p.add_argument("--weights", help="timm weights file or folder (model hubs are not used)")
    p.add_argument("--model-kwargs", type=_json_dict, default={}, help="extra timm.create_model arguments as JSON")
    p.add_argument("--image-size", type=int, help="input side in pixels (default: the model's native size)")


def _add_distill(sub) -> None:
    from .student import DEFAULT_UNLOCK

    p = sub.add_parser("distill", help="distil registers into a ViT (PH-Reg)",
                       description="Distil N register tokens into a ViT against its shift/flip TTA-denoised "
                                   "features. Checkpoints are atomic; --resume continues exactly.")
    _add_backbone_args(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", help="image folder (any tree of jpg/png)")
    src.add_argument("--dataset", help="local dataset: a .txt list of images or a datasets.save_to_disk folder")
    p.add_argument("--out", required=True, help="output folder (checkpoints/, student/, train_log.jsonl)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--lr-min", type=float, default=5e-6)
    p.add_argument("--weight-decay", type=float, default=1e-2)
    p.add_argument("--epochs", type=int, default=100, help="schedule length in epochs")
    p.add_argument("--max-steps", type=int, help="stop after this many steps in total (schedule unchanged)")
    p.add_argument("--registers", type=int, default=16, help="register tokens to add")
    p.add_argument("--views", type=int, default=10, help="TTA views of the teacher")
    p.add_argument("--shift-frac", type=float, default=0.15)
    p.add_argument("--unlock", type=_groups, default=DEFAULT_UNLOCK,
                   help="comma-separated trainable groups (default: %(default)s)")
    p.add_argument("--unlock-last-blocks", type=int, default=1)
    p.add_argument("--target-block", type=int, help="distil this block's output (default: final normalised output)")
    p.add_argument("--mse-scale", type=float, default=1.0)
    p.add_argument("--checkpoint-every", type=int, default=500)
    p.add_argument("--keep-checkpoints", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mixed-precision", choices=("auto", "no", "bf16", "fp16"), default="auto")
    p.add_argument("--cpu", action="store_true", help="run on CPU even if a GPU is present")
    p.add_argument("--num-workers", type=int, default=2, help="data-loading worker processes")
    p.add_argument("--teacher-chunk", type=int, help="teacher views per forward call (default: all at once)")
    p.add_argument("--resume", nargs="?", const=True, default=None,
                   help="resume from the latest checkpoint in --out, or from the given checkpoint file")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(registers_func=_run_distill)


def _add_report(sub) -> None:
    p = sub.add_parser("report", help="artifact metrics of a ViT (and its distilled student) on an image folder",
                       description="Norm-outlier rate, max/median norm, CLS attention sink and TTA residual; "
                                   "teacher vs student side by side with PNG norm maps and report.json.")
    _add_backbone_args(p)
    p.add_argument("--images", required=True, help="image folder (any tree of jpg/png)")
    p.add_argument("--student", help="exported student folder (from `registers distill`), shown next to the base")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--block", type=int, default=-1, help="block whose output norms are measured (default: last)")
    p.add_argument("--sink-block", type=int, default=-1, help="block of the CLS attention row (default: last)")
    p.add_argument("--rule", choices=("mad", "ratio", "fixed"), default="mad")
    p.add_argument("--k", type=float, default=5.0, help="parameter of the mad/ratio rule")
    p.add_argument("--threshold", type=float, help="norm threshold (implies --rule fixed)")
    p.add_argument("--tta-views", type=int, default=10, help="views of the TTA residual (0 skips it)")
    p.add_argument("--max-images", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-maps", action="store_true", help="skip the PNG norm maps")
    p.set_defaults(registers_func=_run_report)


def register_cli(subparsers) -> argparse.ArgumentParser:
    """Add the ``registers`` command group (``distill``, ``report``) to an argparse subparsers object.

    The chosen command runs through ``args.func(args)``, which returns an exit code (2 with a one-line message on
    bad input).

    Returns:
        The ``registers`` parser.
    """
    p = subparsers.add_parser("registers", help="post-hoc registers for ViTs: distillation and artifact metrics")
    sub = p.add_subparsers(dest="registers_command", metavar="{distill,report}")
    sub.required = True
    _add_distill(sub)
    _add_report(sub)
    p.set_defaults(func=_dispatch)
    return p


def _dispatch(args: argparse.Namespace) -> int:
    """Run the chosen command; bad input (missing files, invalid settings, corrupt checkpoints) prints one line."""
    from .distill import CheckpointError
    from .student import StudentFormatError

    try:
        return int(args.registers_func(args) or 0)
    except (ValueError, FileNotFoundError, TypeError, CheckpointError, StudentFormatError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run_distill(args: argparse.Namespace) -> int:
    from .distill import DistillConfig, run_distillation

    cfg = DistillConfig(
        backbone=args.backbone, out=args.out, images=args.images, dataset=args.dataset, weights=args.weights,
        model_kwargs=args.model_kwargs, image_size=args.image_size, batch_size=args.batch_size, lr=args.lr,
        lr_min=args.lr_min, weight_decay=args.weight_decay, epochs=args.epochs, max_steps=args.max_steps,
        num_registers=args.registers, n_views=args.views, shift_frac=args.shift_frac, unlock=args.unlock,
        unlock_last_blocks=args.unlock_last_blocks, target_block=args.target_block, mse_scale=args.mse_scale,
        checkpoint_every=args.checkpoint_every, keep_checkpoints=args.keep_checkpoints, seed=args.seed,
        mixed_precision=args.mixed_precision, cpu=args.cpu, num_workers=args.num_workers,
        teacher_chunk=args.teacher_chunk)
    resume = args.resume if args.resume in (None, True) else Path(args.resume)
    summary = run_distillation(cfg, resume=resume, progress=not args.no_progress)
    print(json.dumps({k: v for k, v in summary.__dict__.items()}, indent=2))
    return 0


def _run_report(args: argparse.Namespace) -> int:
    from .artifacts import artifact_report
    from .data import list_images
    from .distill import load_backbone
    from .student import load_student

    list_images(args.images)  # fail fast on a bad folder, before loading any model
    base = load_backbone(args.backbone, args.weights, args.model_kwargs)
    models = {"base": base}
    if args.student:
        models["student"] = load_student(args.student, base)
    rule = "fixed" if args.threshold is not None else args.rule
    report = artifact_report(models, args.images, args.out, image_size=args.image_size, block=args.block,
                             sink_block=args.sink_block, rule=rule, k=args.k, threshold=args.threshold,
                             tta_views=args.tta_views, seed=args.seed, max_images=args.max_images,
                             maps=not args.no_maps)
    print(json.dumps(report["models"], indent=2))
    print(f"wrote {Path(args.out) / 'report.json'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """A stand-alone parser whose only command group is ``registers``."""
    parser = argparse.ArgumentParser(prog="vlm-tools")
    register_cli(parser.add_subparsers(dest="command", required=True))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``registers distill|report`` from ``argv`` (``argv`` excludes the program name and the word
    ``registers`` may be omitted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "registers":
        argv = ["registers", *argv]
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
