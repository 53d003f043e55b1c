"""`vlm_tools.assets.setup.setup`: build everything the project needs offline, in one call (``vlm-tools setup``)."""

from __future__ import annotations

import time
from pathlib import Path

from vlm_tools.assets import convert, data, default_model

__all__ = ["setup"]


def setup(force: bool = False, verbose: bool = True, verify: bool = False) -> Path:
    """Build everything the project needs offline: converted towers, the default model, local benchmark data.

    Idempotent: a second call checks the files against the manifests (sizes, and hashes verified once per file) and
    returns quickly.

    Args:
        force: rebuild every cached folder.
        verbose: print progress to stderr.
        verify: re-read every cached byte to verify its sha256 (rebuilding what differs).

    Returns:
        the cache root.
    """
    start = time.perf_counter()
    convert.ensure_converted(force=force, verbose=verbose, deep=verify)
    folder = default_model.default_model_path(force=force, verbose=verbose, deep=verify)
    data.ensure_all(force=force, verbose=verbose, deep=verify)
    if verbose:
        print(f"[vlm_tools] default model: {folder}", flush=True)
        print(f"[vlm_tools] cache ready in {time.perf_counter() - start:.1f} s: {convert.cache_home()}", flush=True)
    return convert.cache_home()
