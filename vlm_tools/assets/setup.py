"""`vlm_tools.assets.setup.setup`: build everything the project needs offline, in one call (``vlm-tools setup``)."""

from __future__ import annotations

import time
from pathlib import Path

from vlm_tools.assets import convert, data, default_model

__all__ = ["setup"]


def setup(force: bool = False, verbose: bool = True) -> Path:
    """Build everything the project needs offline: converted towers, the default model, local benchmark data.

    Idempotent: a second call verifies file sizes against the manifests and returns quickly.

    Args:
        force: rebuild every cached folder.
        verbose: print progress to stderr.

    Returns:
        the cache root.
    """
    start = time.perf_counter()
    convert.ensure_converted(force=force, verbose=verbose)
    folder = default_model.default_model_path(force=force, verbose=verbose)
    data.ensure_all(force=force, verbose=verbose)
    if verbose:
        print(f"[vlm_tools] default model: {folder}", flush=True)
        print(f"[vlm_tools] cache ready in {time.perf_counter() - start:.1f} s: {convert.cache_home()}", flush=True)
    return convert.cache_home()
