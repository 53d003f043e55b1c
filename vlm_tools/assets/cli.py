"""`vlm-tools setup`: convert the real weights, assemble the default model and materialise the local benchmarks."""

from __future__ import annotations

import argparse


def _cmd_setup(args: argparse.Namespace) -> int:
    from vlm_tools.assets.convert import MissingWeightsPackageError
    from vlm_tools.assets.setup import setup

    try:
        home = setup(force=args.force, verbose=not args.quiet)
    except MissingWeightsPackageError as err:
        print(f"vlm-tools setup: {err}")
        return 2
    print(home)
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``setup`` sub-command to the ``vlm-tools`` parser."""
    p = subparsers.add_parser(
        "setup",
        help="build the offline cache: DINOv2-S + SmolLM2 conversions, the default VLM, shapes_vqa and photos_yesno",
        description="Build (or verify) everything in $VLM_TOOLS_HOME (default ~/.cache/vlm_tools). Idempotent: a "
        "second run checks the cached files' sizes against their manifests and returns quickly.",
    )
    p.add_argument("--force", action="store_true", help="rebuild every cached folder")
    p.add_argument("--quiet", action="store_true", help="print only the cache path")
    p.set_defaults(func=_cmd_setup)
