"""`vlm-tools setup`: convert the real weights, assemble the default model and materialise the local benchmarks."""

from __future__ import annotations

import argparse
import sys


def _cmd_setup(args: argparse.Namespace) -> int:
    from vlm_tools.assets.convert import MissingWeightsPackageError, cache_home
    from vlm_tools.assets.setup import setup
    from vlm_tools.core.io import ensure_writable_dir
    from vlm_tools.errors import OutputDirError

    try:
        ensure_writable_dir(cache_home())
        home = setup(force=args.force, verbose=not args.quiet, verify=args.verify)
    except (MissingWeightsPackageError, OutputDirError) as err:
        print(f"vlm-tools setup: {err}", file=sys.stderr)
        return 2
    print(home)
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``setup`` sub-command to the ``vlm-tools`` parser."""
    p = subparsers.add_parser(
        "setup",
        help="build the offline cache: DINOv2-S + SmolLM2 conversions, the default VLM, shapes_vqa and photos_yesno",
        description="Build (or verify) everything in $VLM_TOOLS_HOME (default ~/.cache/vlm_tools). Idempotent: a "
        "second run checks the cached files against their manifests (sizes and sha256; a file's hash is computed "
        "once and cached by its size, mtime, ctime and inode) and returns quickly. A missing or changed file is "
        "rebuilt with a message naming it.",
    )
    p.add_argument("--force", action="store_true", help="rebuild every cached folder")
    p.add_argument("--verify", action="store_true",
                   help="re-read every cached byte and compare its sha256 with the manifest (damage below the file "
                   "system, which leaves a file's stat unchanged); rebuild what differs")
    p.add_argument("--quiet", action="store_true", help="print only the cache path")
    p.set_defaults(func=_cmd_setup)
