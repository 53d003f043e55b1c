"""``vlm-tools registers`` commands: ``distill`` (the PH-Reg job), ``report`` (artifact metrics), ``find-neurons``
(test-time registers) and ``probe`` (dense linear probe).

``register_cli(subparsers)`` adds the ``registers`` command group to the main CLI; ``main(argv)`` runs it stand-alone
(``python -m vlm_tools.registers.cli distill ...``). Every command checks its ``--out`` folder before loading
anything; bad input ends with a one-line ``error: ...`` and exit code 2. A distillation stopped by SIGTERM / SIGINT
writes a checkpoint first and exits with 128 + the signal number.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["build_parser", "main", "register_cli"]


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every option's default (`None` defaults read "(default: None)", i.e. unset)."""


def _json_dict(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object, e.g. '{\"dynamic_img_size\": true}'")
    return value


def _groups(text: str) -> tuple[str, ...]:
    return tuple(g.strip() for g in text.split(",") if g.strip())


def _add_backbone_args(p: argparse.ArgumentParser) -> None:
    from .backbones import BACKBONE_SHORTCUTS

    shortcuts = "; ".join(f"{k}: {v}" for k, v in BACKBONE_SHORTCUTS.items())
    p.add_argument("--backbone", required=True,
                   help="timm:<model name>, hf:<local folder> of a Dinov2/CLIP vision model or of a LLaVA (its "
                        f"tower), or a shortcut ({shortcuts})")
    p.add_argument("--weights", help="timm weights file or folder (model hubs are not used)")
    p.add_argument("--model-kwargs", type=_json_dict, default={}, help="extra timm.create_model arguments as JSON")
    p.add_argument("--image-size", type=int,
                   help="input side in pixels (default: the model's native size); timm backbones are built for it")


def _add_distill(sub) -> None:
    from .student import DEFAULT_UNLOCK

    p = sub.add_parser("distill", help="distil registers into a ViT (PH-Reg)", formatter_class=_Formatter,
                       description="Distil N register tokens into a ViT against its shift/flip TTA-denoised "
                                   "features. Checkpoints are atomic; --resume continues exactly; SIGTERM/SIGINT "
                                   "write a checkpoint before exiting.")
    _add_backbone_args(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", help="image folder (any tree of jpg/png)")
    src.add_argument("--dataset", help="local dataset: a .txt list of images or a datasets.save_to_disk folder")
    p.add_argument("--out", required=True, help="output folder (checkpoints/, student/, train_log.jsonl)")
    p.add_argument("--batch-size", type=int, default=8, help="images per optimizer step")
    p.add_argument("--lr", type=float, default=1e-4, help="initial learning rate")
    p.add_argument("--lr-min", type=float, default=5e-6, help="final learning rate (floor)")
    p.add_argument("--weight-decay", type=float, default=1e-2, help="AdamW weight decay")
    p.add_argument("--epochs", type=int, default=100, help="schedule length in epochs")
    p.add_argument("--max-steps", type=int, help="stop after this many steps in total (schedule unchanged)")
    p.add_argument("--registers", type=int, default=16, help="register tokens to add")
    p.add_argument("--views", type=int, default=10, help="TTA views of the teacher")
    p.add_argument("--shift-frac", type=float, default=0.15, help="largest TTA shift, as a fraction of the grid")
    p.add_argument("--unlock", type=_groups, default=",".join(DEFAULT_UNLOCK), help="comma-separated trainable groups")
    p.add_argument("--unlock-last-blocks", type=int, default=1, help="blocks the last_block group unlocks")
    p.add_argument("--target-block", type=int, help="distil this block's output (default: final normalised output)")
    p.add_argument("--mse-scale", type=float, default=1.0, help="weight of the MSE term of the loss")
    p.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints")
    p.add_argument("--keep-checkpoints", type=int, default=2, help="how many recent checkpoints to keep")
    p.add_argument("--seed", type=int, default=0, help="seed of data order, crops, TTA plans and register init")
    p.add_argument("--mixed-precision", choices=("auto", "no", "bf16", "fp16"), default="auto",
                   help="auto: bf16 on GPU, none on CPU")
    p.add_argument("--cpu", action="store_true", help="run on CPU even if a GPU is present")
    p.add_argument("--num-workers", type=int, default=2, help="data-loading worker processes")
    p.add_argument("--teacher-chunk", type=int, help="teacher views per forward call (default: all at once)")
    p.add_argument("--recipe", choices=("auto", "plain", "clip"), default="auto",
                   help="auto: PH-Reg's CLIP recipe (NACLIP teacher, value-path last block) for CLIP towers distilled "
                        "at their final output, the plain recipe otherwise")
    p.add_argument("--naclip-std", type=float, default=5.0, help="Gaussian window std of the CLIP recipe's teacher")
    run = p.add_mutually_exclusive_group()
    run.add_argument("--resume", nargs="?", const=True, default=None,
                     help="resume from the latest checkpoint in --out, or from the given checkpoint file")
    run.add_argument("--overwrite", action="store_true",
                     help="start again in an --out that holds a previous job (deletes its checkpoints, log, export)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(registers_func=_run_distill)


def _add_report(sub) -> None:
    p = sub.add_parser("report", help="artifact metrics of a ViT (and its distilled student) on an image folder",
                       formatter_class=_Formatter,
                       description="Norm-outlier rate, max/median norm, CLS attention sink and TTA residual; "
                                   "teacher vs student side by side with PNG norm maps and report.json.")
    _add_backbone_args(p)
    p.add_argument("--images", required=True, help="image folder (any tree of jpg/png)")
    p.add_argument("--student", help="exported student folder (from `registers distill`), shown next to the base")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--block", type=int, default=-1, help="block whose output norms are measured")
    p.add_argument("--sink-block", type=int, default=-1, help="block of the CLS attention row")
    p.add_argument("--rule", choices=("mad", "ratio", "fixed"), default="mad", help="outlier rule")
    p.add_argument("--k", type=float, default=5.0, help="parameter of the mad/ratio rule")
    p.add_argument("--threshold", type=float, help="norm threshold (implies --rule fixed)")
    p.add_argument("--tta-views", type=int, default=10, help="views of the TTA residual (0 skips it)")
    p.add_argument("--max-images", type=int, default=16, help="images measured (sorted order)")
    p.add_argument("--seed", type=int, default=0, help="TTA seed")
    p.add_argument("--no-maps", action="store_true", help="skip the PNG norm maps")
    p.set_defaults(registers_func=_run_report)


def _add_find_neurons(sub) -> None:
    p = sub.add_parser("find-neurons", help="find the register neurons of a ViT (test-time registers, no training)",
                       formatter_class=_Formatter,
                       description="Rank the MLP neurons whose activations concentrate on the high-norm outlier "
                                   "tokens (Jiang et al. 2025) and write the neuron list as JSON, for the "
                                   "test_time_registers modifier or registers.attach_test_time_registers.")
    _add_backbone_args(p)
    p.add_argument("--images", required=True, help="image folder (any tree of jpg/png)")
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--threshold", type=float,
                   help="outlier norm threshold tau (the authors: 30 for CLIP-B/16 at block -1, 150 for DINOv2-L at "
                        "block -2); without it, --rule decides per image")
    p.add_argument("--rule", choices=("ratio", "mad"), help="per-image robust outlier rule when no --threshold")
    p.add_argument("--k", type=float, default=3.0, help="parameter of --rule (ratio: norm > k x median)")
    p.add_argument("--detect-block", type=int, default=-1, help="block whose output norms define the outliers")
    p.add_argument("--top-k", type=int, default=10, help="neurons kept over all blocks")
    p.add_argument("--highest-layer", type=int, help="keep blocks <= this (default: all)")
    p.add_argument("--lowest-layer", type=int, default=0, help="keep blocks >= this")
    p.add_argument("--no-sparsity-filter", action="store_true", help="score without the authors' sparsity filter")
    p.add_argument("--max-images", type=int, default=100, help="images used (sorted order)")
    p.add_argument("--batch-size", type=int, default=8, help="images per forward")
    p.set_defaults(registers_func=_run_find_neurons)


def _add_probe(sub) -> None:
    p = sub.add_parser("probe", help="linear probe of dense features on shape masks (teacher / student / test-time "
                                     "registers)", formatter_class=_Formatter,
                       description="Train per-patch linear classifiers (foreground vs background, and the shape "
                                   "class) on frozen patch features of easy-vqa training images and report mIoU on "
                                   "held-out shapes_vqa images, with the norm-outlier rate and attention-sink score "
                                   "of each model; writes probe.json.")
    _add_backbone_args(p)
    p.add_argument("--student", help="exported student folder (from `registers distill`) to probe next to the base")
    p.add_argument("--neurons", help="register-neuron JSON (from `registers find-neurons`): probe test-time registers")
    p.add_argument("--num-registers", type=int, default=1, help="test-time registers appended with --neurons")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--train-images", type=int, default=300, help="easy-vqa training images the probe is fitted on")
    p.add_argument("--test-images", type=int, default=150, help="held-out shapes_vqa images")
    p.add_argument("--artifact-block", type=int, default=-1, help="block of the norm-outlier measure")
    p.add_argument("--outlier-k", type=float, default=3.0, help="outlier rule: norm > k x median")
    p.add_argument("--batch-size", type=int, default=16, help="images per forward")
    p.set_defaults(registers_func=_run_probe)


def register_cli(subparsers) -> argparse.ArgumentParser:
    """Add the ``registers`` command group (``distill``, ``report``, ``find-neurons``) to an argparse subparsers
    object.

    The chosen command runs through ``args.func(args)``, which returns an exit code (2 with a one-line message on
    bad input).

    Returns:
        The ``registers`` parser.
    """
    p = subparsers.add_parser("registers", help="post-hoc registers for ViTs: distillation and artifact metrics")
    sub = p.add_subparsers(dest="registers_command", metavar="{distill,report,find-neurons,probe}")
    sub.required = True
    _add_distill(sub)
    _add_report(sub)
    _add_find_neurons(sub)
    _add_probe(sub)
    p.set_defaults(func=_dispatch)
    return p


def _dispatch(args: argparse.Namespace) -> int:
    """Run the chosen command; bad input (missing files, invalid settings, corrupt checkpoints) prints one line."""
    from .checkpoint import CheckpointError, OutputExistsError
    from .student import StudentFormatError

    try:
        return int(args.registers_func(args) or 0)
    except (ValueError, FileNotFoundError, TypeError, CheckpointError, StudentFormatError, OutputExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _check_out(path: str) -> Path:
    from .checkpoint import check_writable_dir

    return check_writable_dir(path)


def _run_distill(args: argparse.Namespace) -> int:
    import signal

    from .distill import DistillConfig, run_distillation

    _check_out(args.out)
    cfg = DistillConfig(
        backbone=args.backbone, out=args.out, images=args.images, dataset=args.dataset, weights=args.weights,
        model_kwargs=args.model_kwargs, image_size=args.image_size, batch_size=args.batch_size, lr=args.lr,
        lr_min=args.lr_min, weight_decay=args.weight_decay, epochs=args.epochs, max_steps=args.max_steps,
        num_registers=args.registers, n_views=args.views, shift_frac=args.shift_frac, unlock=args.unlock,
        unlock_last_blocks=args.unlock_last_blocks, target_block=args.target_block, mse_scale=args.mse_scale,
        checkpoint_every=args.checkpoint_every, keep_checkpoints=args.keep_checkpoints, seed=args.seed,
        mixed_precision=args.mixed_precision, cpu=args.cpu, num_workers=args.num_workers,
        teacher_chunk=args.teacher_chunk, recipe=args.recipe, naclip_std=args.naclip_std)
    resume = args.resume if args.resume in (None, True) else Path(args.resume)
    summary = run_distillation(cfg, resume=resume, overwrite=args.overwrite, progress=not args.no_progress,
                               handle_signals=True)
    print(json.dumps(dict(summary.__dict__), indent=2))
    if summary.stopped_by is not None:
        print(f"stopped by {summary.stopped_by} after step {summary.steps}; checkpoint {summary.checkpoint}; "
              "continue with --resume", file=sys.stderr)
        return 128 + int(signal.Signals[summary.stopped_by])
    return 0


def _run_report(args: argparse.Namespace) -> int:
    from .artifacts import artifact_report
    from .backbones import load_backbone
    from .data import list_images
    from .student import load_student, read_student_export

    out = _check_out(args.out)
    list_images(args.images)  # fail fast on a bad folder, before loading any model
    if args.student:
        read_student_export(args.student)  # and on a bad export
    base = load_backbone(args.backbone, args.weights, args.model_kwargs, args.image_size)
    models = {"base": base}
    if args.student:
        models["student"] = load_student(args.student, base)
    rule = "fixed" if args.threshold is not None else args.rule
    report = artifact_report(models, args.images, out, image_size=args.image_size, block=args.block,
                             sink_block=args.sink_block, rule=rule, k=args.k, threshold=args.threshold,
                             tta_views=args.tta_views, seed=args.seed, max_images=args.max_images,
                             maps=not args.no_maps)
    print(json.dumps(report["models"], indent=2))
    print(f"wrote {out / 'report.json'}")
    return 0


def _run_find_neurons(args: argparse.Namespace) -> int:
    import torch

    from vlm_tools.core.adapters import get_tower

    from .backbones import load_backbone
    from .data import ImageSource, list_images, preprocess
    from .test_time import find_register_neurons

    out = Path(args.out)
    _check_out(str(out.parent))
    if args.threshold is None and args.rule is None:
        raise ValueError("give --threshold (a norm) or --rule ratio|mad (per image)")
    files = list_images(args.images)[: args.max_images]
    vit = load_backbone(args.backbone, args.weights, args.model_kwargs, args.image_size)
    spec = get_tower(vit).spec
    size = args.image_size or spec.image_size
    source = ImageSource(paths=files, description=str(args.images))
    batches = [torch.stack([preprocess(source.load(i), size, spec.mean, spec.std)
                            for i in range(s, min(s + args.batch_size, len(files)))])
               for s in range(0, len(files), args.batch_size)]
    found = find_register_neurons(vit, batches, threshold=args.threshold,
                                  rule="fixed" if args.threshold is not None else args.rule, k=args.k,
                                  detect_block=args.detect_block, top_k=args.top_k, highest_layer=args.highest_layer,
                                  lowest_layer=args.lowest_layer, sparsity_filter=not args.no_sparsity_filter)
    found.settings["backbone"] = args.backbone
    found.settings["image_size"] = size
    found.save(out)
    print(json.dumps({"layers": found.to_json()["layers"], "settings": found.settings}, indent=2))
    print(f"wrote {out}")
    return 0


def _run_probe(args: argparse.Namespace) -> int:
    from vlm_tools.core.io import write_json_atomic

    from .backbones import load_backbone
    from .probe import run_probe
    from .student import load_student, read_student_export
    from .test_time import RegisterNeurons

    out = _check_out(args.out)
    if args.student:
        read_student_export(args.student)
    if args.neurons:
        RegisterNeurons.load(args.neurons)
    base = load_backbone(args.backbone, args.weights, args.model_kwargs, args.image_size)
    student = load_student(args.student, base) if args.student else None
    neurons = RegisterNeurons.load(args.neurons) if args.neurons else None
    result = run_probe(base, student=student, neurons=neurons, num_registers=args.num_registers,
                       image_size=args.image_size, n_train=args.train_images, n_test=args.test_images,
                       artifact_block=args.artifact_block, outlier_k=args.outlier_k, batch_size=args.batch_size)
    result["settings"]["backbone"] = args.backbone
    write_json_atomic(out / "probe.json", result, indent=2)
    for name, r in result["models"].items():
        print(f"{name}: fg/bg mIoU {r['fg_bg']['miou']:.3f}, shape mIoU {r['shape']['miou']:.3f}, outlier rate "
              f"{r['outlier_rate']:.4f}, sink {r['sink_score']:.3f}")
    print(f"wrote {out / 'probe.json'}")
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
