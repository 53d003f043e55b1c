"""Backbone access for register distillation: family detection, token layout and feature read-out.

Three ViT families are supported, each read through its own public modules (no copied forward code):

* ``timm``: :class:`timm.models.vision_transformer.VisionTransformer` (``blocks``, ``norm``, ``pos_embed``,
  ``patch_embed``; CLS and native register tokens are counted by ``num_prefix_tokens``).
* ``hf_dinov2``: :class:`transformers.Dinov2Model` (``embeddings``, ``encoder.layer``, ``layernorm``).
* ``hf_clip``: :class:`transformers.CLIPVisionModel` (``embeddings``, ``pre_layrnorm``, ``encoder.layers``,
  ``post_layernorm``).

Token layout. Every supported model puts its prefix tokens (CLS, and for timm any native registers) first and the
``grid_h * grid_w`` patch tokens next, in row-major order. Registers added by hooks (:mod:`.student`) go at the END of
the sequence, so the patch tokens are always ``tokens[:, num_prefix : num_prefix + grid_h * grid_w]``.

Block convention. ``block=i`` means the output of block ``i`` (negative indices count from the end), i.e. the
pre-final-norm residual stream; ``block=None`` means the model's final, normalised token sequence.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SUPPORTED_FAMILIES",
    "BackboneSpec",
    "describe",
    "forward_tokens",
    "get_attention",
    "get_blocks",
    "grid_shape",
    "patch_tokens",
    "resolve_block",
    "unlock_param_names",
]

SUPPORTED_FAMILIES = ("timm VisionTransformer", "transformers Dinov2Model", "transformers CLIPVisionModel")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class BackboneSpec:
    """Static facts about a supported ViT, read from the instance and its config.

    Attributes:
        family: ``"timm"``, ``"hf_dinov2"`` or ``"hf_clip"``.
        embed_dim: Token width.
        depth: Number of transformer blocks.
        num_heads: Attention heads per block.
        patch_size: Patch side in pixels (square patches).
        image_size: Native input side in pixels.
        num_prefix_tokens: Tokens before the patch tokens (CLS plus timm native registers).
        num_native_registers: timm ``reg_token`` count (0 for the HF families).
        mean: Per-channel normalisation mean of the model's preprocessing.
        std: Per-channel normalisation std of the model's preprocessing.
    """

    family: str
    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int
    image_size: int
    num_prefix_tokens: int
    num_native_registers: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def white(self) -> tuple[float, float, float]:
        """White (pixel value 1.0) in this model's normalised units, per channel."""
        return tuple((1.0 - m) / s for m, s in zip(self.mean, self.std))  # type: ignore[return-value]

    def to_json(self) -> dict:
        """A JSON-serialisable dict of the fields."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


def _is_timm_vit(model: nn.Module) -> bool:
    if not type(model).__module__.startswith("timm."):
        return False
    from timm.models.vision_transformer import VisionTransformer

    return isinstance(model, VisionTransformer)


def _hf_family(model: nn.Module) -> str | None:
    if not type(model).__module__.startswith("transformers."):
        return None
    from transformers import CLIPVisionModel, Dinov2Model

    if isinstance(model, Dinov2Model):
        return "hf_dinov2"
    if isinstance(model, CLIPVisionModel):
        return "hf_clip"
    return None


def family_of(model: nn.Module) -> str:
    """The backbone family name of ``model``.

    Raises:
        TypeError: If the model is not one of :data:`SUPPORTED_FAMILIES`.
    """
    if _is_timm_vit(model):
        return "timm"
    fam = _hf_family(model)
    if fam is None:
        raise TypeError(
            f"unsupported backbone {type(model).__module__}.{type(model).__name__}; supported: "
            + ", ".join(SUPPORTED_FAMILIES)
        )
    return fam


def _pair_to_int(value, what: str) -> int:
    if isinstance(value, (tuple, list)):
        if len(set(value)) != 1:
            raise ValueError(f"non-square {what} {tuple(value)} is not supported")
        return int(value[0])
    return int(value)


def describe(model: nn.Module) -> BackboneSpec:
    """Read the :class:`BackboneSpec` of a supported ViT instance.

    Args:
        model: A timm ``VisionTransformer``, HF ``Dinov2Model`` or HF ``CLIPVisionModel``.

    Returns:
        The spec. For timm models the mean/std come from ``pretrained_cfg`` (ImageNet defaults when absent).

    Raises:
        TypeError: For unsupported models.
    """
    fam = family_of(model)
    if fam == "timm":
        cfg = getattr(model, "pretrained_cfg", None) or {}
        mean = tuple(float(v) for v in cfg.get("mean", IMAGENET_MEAN))
        std = tuple(float(v) for v in cfg.get("std", IMAGENET_STD))
        first = model.blocks[0]
        return BackboneSpec(
            family=fam,
            embed_dim=int(model.embed_dim),
            depth=len(model.blocks),
            num_heads=int(first.attn.num_heads),
            patch_size=_pair_to_int(model.patch_embed.patch_size, "patch size"),
            image_size=_pair_to_int(model.patch_embed.img_size, "image size"),
            num_prefix_tokens=int(model.num_prefix_tokens),
            num_native_registers=int(getattr(model, "num_reg_tokens", 0)),
            mean=mean,  # type: ignore[arg-type]
            std=std,  # type: ignore[arg-type]
        )
    cfg = model.config
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if fam == "hf_dinov2" else (CLIP_MEAN, CLIP_STD)
    return BackboneSpec(
        family=fam,
        embed_dim=int(cfg.hidden_size),
        depth=int(cfg.num_hidden_layers),
        num_heads=int(cfg.num_attention_heads),
        patch_size=_pair_to_int(cfg.patch_size, "patch size"),
        image_size=_pair_to_int(cfg.image_size, "image size"),
        num_prefix_tokens=1,
        num_native_registers=0,
        mean=mean,
        std=std,
    )


def get_blocks(model: nn.Module) -> Sequence[nn.Module]:
    """The transformer blocks of a supported ViT, in order."""
    fam = family_of(model)
    if fam == "timm":
        return list(model.blocks)
    if fam == "hf_dinov2":
        return list(model.encoder.layer)
    return list(model.encoder.layers)


def get_attention(block: nn.Module, family: str) -> nn.Module:
    """The self-attention module of one block (its input is the attention input, after any pre-norm)."""
    if family == "timm":
        return block.attn
    if family == "hf_dinov2":
        return block.attention
    return block.self_attn


def resolve_block(block: int, depth: int) -> int:
    """Normalise a possibly negative block index.

    Raises:
        IndexError: If it is out of range.
    """
    idx = block + depth if block < 0 else block
    if not 0 <= idx < depth:
        raise IndexError(f"block index {block} out of range for a model with {depth} blocks")
    return idx


def grid_shape(spec: BackboneSpec, height: int, width: int) -> tuple[int, int]:
    """Patch-grid shape for an input of ``height x width`` pixels.

    Raises:
        ValueError: If a side is not a multiple of the patch size.
    """
    p = spec.patch_size
    if height % p or width % p:
        raise ValueError(f"input {height}x{width} is not a multiple of the patch size {p}")
    return height // p, width // p


def _hf_call(model: nn.Module, spec: BackboneSpec, pixel_values: torch.Tensor):
    kwargs = {}
    if spec.family == "hf_clip" and tuple(pixel_values.shape[-2:]) != (spec.image_size, spec.image_size):
        kwargs["interpolate_pos_encoding"] = True
    return model(pixel_values=pixel_values, return_dict=True, **kwargs)


def _final_tokens(model: nn.Module, spec: BackboneSpec, pixel_values: torch.Tensor) -> torch.Tensor:
    if spec.family == "timm":
        return model.forward_features(pixel_values)
    out = _hf_call(model, spec, pixel_values)
    if spec.family == "hf_dinov2":
        return out.last_hidden_state
    # CLIPVisionModel returns the pre-norm sequence; apply its post-LN to every token (as OpenAI CLIP's ln_post).
    return model.post_layernorm(out.last_hidden_state)


def _capture_output(store: dict, module: nn.Module, args, output) -> None:
    store["tokens"] = output[0] if isinstance(output, tuple) else output


def forward_tokens(model: nn.Module, pixel_values: torch.Tensor, block: int | None = None) -> torch.Tensor:
    """Run ``model`` and return its full token sequence at ``block``.

    Args:
        model: A supported ViT (registers attached by hooks are included at the end of block outputs).
        pixel_values: ``(B, 3, H, W)`` normalised images.
        block: Block index whose output (pre-final-norm residual stream) is returned; ``None`` for the final
            normalised sequence.

    Returns:
        ``(B, T, D)`` tokens.
    """
    spec = describe(model)
    if block is None:
        return _final_tokens(model, spec, pixel_values)
    blocks = get_blocks(model)
    target = blocks[resolve_block(block, len(blocks))]
    store: dict = {}
    handle = None
    try:
        handle = target.register_forward_hook(functools.partial(_capture_output, store))
        if spec.family == "timm":
            model.forward_features(pixel_values)
        else:
            _hf_call(model, spec, pixel_values)
    finally:
        if handle is not None:
            handle.remove()
    if "tokens" not in store:
        raise RuntimeError(f"block {block} did not run during the forward pass")
    return store["tokens"]


def patch_tokens(model: nn.Module, pixel_values: torch.Tensor, block: int | None = None) -> torch.Tensor:
    """Patch tokens ``(B, grid_h * grid_w, D)`` of ``model`` at ``block`` (see :func:`forward_tokens`)."""
    spec = describe(model)
    gh, gw = grid_shape(spec, pixel_values.shape[-2], pixel_values.shape[-1])
    tokens = forward_tokens(model, pixel_values, block)
    start = spec.num_prefix_tokens
    if tokens.shape[1] < start + gh * gw:
        raise RuntimeError(f"expected at least {start + gh * gw} tokens, got {tokens.shape[1]}")
    return tokens[:, start : start + gh * gw]


def unlock_param_names(model: nn.Module, groups: Sequence[str], last_blocks: int, up_to_block: int | None) -> list[str]:
    """Names (as in ``model.named_parameters()``) of the parameters in the requested groups.

    Args:
        model: A supported ViT.
        groups: Any of ``"pos_embed"``, ``"patch_embed"``, ``"last_block"``; ``"registers"`` is handled by the
            student and ignored here.
        last_blocks: How many blocks ending at ``up_to_block`` the ``"last_block"`` group unlocks.
        up_to_block: The last block that feeds the distillation target (``None``: the final block).

    Returns:
        Sorted parameter names.
    """
    fam = family_of(model)
    depth = len(get_blocks(model))
    end = depth - 1 if up_to_block is None else resolve_block(up_to_block, depth)
    prefixes: list[str] = []
    if "pos_embed" in groups:
        prefixes.append({"timm": "pos_embed", "hf_dinov2": "embeddings.position_embeddings",
                         "hf_clip": "embeddings.position_embedding."}[fam])
    if "patch_embed" in groups:
        prefixes.append({"timm": "patch_embed.", "hf_dinov2": "embeddings.patch_embeddings.",
                         "hf_clip": "embeddings.patch_embedding."}[fam])
    if "last_block" in groups:
        stem = {"timm": "blocks", "hf_dinov2": "encoder.layer", "hf_clip": "encoder.layers"}[fam]
        for i in range(max(0, end - last_blocks + 1), end + 1):
            prefixes.append(f"{stem}.{i}.")
    names = [n for n, _ in model.named_parameters() if any(n == p or n.startswith(p) for p in prefixes)]
    return sorted(names)
