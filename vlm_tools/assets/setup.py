"""`vlm_tools.assets.setup.setup`: build everything the project needs offline, in one call (``vlm-tools setup``)."""

from __future__ import annotations

import time
from pathlib import Path

from vlm_tools.assets import convert, data, default_model

__all__ = ["built_paths", "setup"]


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
    paths = built_paths(force=force, verbose=verbose, verify=verify)
    if verbose:
        width = max(len(name) for name in paths)
        for name, path in paths.items():
            print(f"[vlm_tools] {name:<{width}}  {path}", flush=True)
        print(f"[vlm_tools] cache ready in {time.perf_counter() - start:.1f} s: {convert.cache_home()}", flush=True)
    return convert.cache_home()


def built_paths(force: bool = False, verbose: bool = False, verify: bool = False) -> dict[str, Path]:
    """Build (or verify) the cache and return the path of every part, as `vlm-tools setup` prints them.

    Keys: ``dinov2_hf`` (HF Dinov2Model folder), ``dinov2_timm_weights`` (timm ``vit_small_patch14_dinov2``
    safetensors, for ``registers ... --weights``), ``smollm2`` (LlamaForCausalLM folder), ``default_model`` (the HF
    LLaVA folder), ``shapes_vqa`` and ``photos_yesno`` (local data folders, each with ``images/``).
    """
    parts = convert.ensure_converted(force=force, verbose=verbose, deep=verify)
    folder = default_model.default_model_path(force=force, verbose=verbose, deep=verify)
    local = data.ensure_all(force=force, verbose=verbose, deep=verify)
    return {"dinov2_hf": parts["dinov2_hf"], "dinov2_timm_weights": parts["dinov2_timm"] / "model.safetensors",
            "smollm2": parts["smollm2"], "default_model": folder, **local}
