"""Adapters: declarative knowledge of the supported model families and ViT towers, and the per-call plan.

Two layers, one system:

* **Tower adapters** (`get_tower`, `TowerAdapter`): a ViT instance of a supported family (timm `VisionTransformer`,
  transformers `Dinov2Model`, transformers `CLIPVisionModel`; a LLaVA vision tower is one of the HF two). Module
  paths (blocks, attention, MLP, norms, embeddings), the token layout (prefix tokens first, then the row-major patch
  grid), static facts (`TowerSpec`), parameter-group prefixes, and reading the token sequence at a block.
* **Model adapters** (`get_adapter`, `ModelAdapter`): HF `LlavaForConditionalGeneration` (LLaVA-1.5 layout) and
  `LlavaNextForConditionalGeneration` (anyres crops, `image_newline`), each with a CLIP or DINOv2 vision tower (one
  CLS prefix token, read through its tower adapter). All counts are read from the model config: grid size, prefix
  tokens, feature layer, number of layers.

Budget rule for several crops (LLaVA-NeXT): `keep` is the number of visual tokens per *image* that reach the LLM,
newline tokens excluded, summed over the base crop and the tiles. It is split evenly across the image's crops;
a crop whose patches partly fall in the unpadded border (removed by HF's anyres unpadding) can only hold its valid
positions, and what it cannot hold goes to the other crops (water-filling). Selection never picks positions that
unpadding would remove. `ratio` removes that fraction of the image's valid patch tokens. All newline tokens of the
anyres layout are kept, so the LLM sees `keep + rows_of_the_stitched_grid` tokens (as in ZOO-Prune).
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from vlm_tools.core.hooks import HookHandle

__all__ = ["ModelAdapter", "LlavaAdapter", "LlavaNextAdapter", "VisionPlan", "get_adapter", "SUPPORTED_FAMILIES",
           "split_budget", "TowerAdapter", "TowerSpec", "get_tower", "SUPPORTED_TOWER_FAMILIES", "IMAGENET_MEAN",
           "IMAGENET_STD", "CLIP_MEAN", "CLIP_STD"]

SUPPORTED_FAMILIES = ("LlavaForConditionalGeneration (llava)", "LlavaNextForConditionalGeneration (llava_next)")
SUPPORTED_TOWERS = ("clip_vision_model", "dinov2")
SUPPORTED_TOWER_FAMILIES = ("timm VisionTransformer", "transformers Dinov2Model", "transformers CLIPVisionModel")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# -- ViT towers --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TowerSpec:
    """Static facts about a supported ViT, read from the instance and its config.

    Attributes:
        family: `"timm"`, `"hf_dinov2"` or `"hf_clip"`.
        embed_dim: token width.
        depth: number of transformer blocks.
        num_heads: attention heads per block.
        patch_size: patch side in pixels (square patches).
        image_size: native input side in pixels.
        num_prefix_tokens: tokens before the patch tokens (CLS plus timm native registers).
        num_native_registers: timm `reg_token` count (0 for the HF families).
        mean: per-channel normalisation mean of the model's preprocessing.
        std: per-channel normalisation std of the model's preprocessing.
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


@dataclass(frozen=True)
class _TowerLayout:
    """Module paths of one tower family (relative to the tower root) and its parameter-group prefixes."""

    blocks: str
    attention: str
    norm1: str
    norm2: str
    mlp: str
    mlp_act: str
    layer_scale2: str | None
    final_norm: str
    pos_embed: str
    patch_embed: str


_LAYOUTS = {
    "timm": _TowerLayout(blocks="blocks", attention="attn", norm1="norm1", norm2="norm2", mlp="mlp", mlp_act="act",
                         layer_scale2="ls2", final_norm="norm", pos_embed="pos_embed", patch_embed="patch_embed."),
    "hf_dinov2": _TowerLayout(blocks="encoder.layer", attention="attention", norm1="norm1", norm2="norm2", mlp="mlp",
                              mlp_act="activation_fn", layer_scale2="layer_scale2", final_norm="layernorm",
                              pos_embed="embeddings.position_embeddings", patch_embed="embeddings.patch_embeddings."),
    "hf_clip": _TowerLayout(blocks="encoder.layers", attention="self_attn", norm1="layer_norm1", norm2="layer_norm2",
                            mlp="mlp", mlp_act="activation_fn", layer_scale2=None, final_norm="post_layernorm",
                            pos_embed="embeddings.position_embedding.", patch_embed="embeddings.patch_embedding."),
}


def _pair_to_int(value, what: str) -> int:
    if isinstance(value, (tuple, list)):
        if len(set(value)) != 1:
            raise ValueError(f"non-square {what} {tuple(value)} is not supported")
        return int(value[0])
    return int(value)


def tower_family(vit: nn.Module) -> str:
    """`"timm"`, `"hf_dinov2"` or `"hf_clip"`; anything else raises a `TypeError` naming the supported towers."""
    module = type(vit).__module__
    if module.startswith("timm."):
        from timm.models.vision_transformer import VisionTransformer

        if isinstance(vit, VisionTransformer):
            return "timm"
    elif module.startswith("transformers."):
        from transformers import CLIPVisionModel, Dinov2Model

        if isinstance(vit, Dinov2Model):
            return "hf_dinov2"
        if isinstance(vit, CLIPVisionModel):
            return "hf_clip"
    raise TypeError(f"unsupported backbone {module}.{type(vit).__name__}; supported: "
                    + ", ".join(SUPPORTED_TOWER_FAMILIES))


def _capture_output(store: dict, module: nn.Module, args, output) -> None:
    store["tokens"] = output[0] if isinstance(output, tuple) else output


class TowerAdapter:
    """Declarative access to one ViT tower instance (see `get_tower`).

    Token layout: every supported tower puts its prefix tokens (CLS, and timm's native registers) first and the
    `grid_h * grid_w` patch tokens next, row-major. Registers added by hooks (`vlm_tools.registers`) go at the END,
    so the patch tokens are always `tokens[:, num_prefix : num_prefix + grid_h * grid_w]`.

    Block convention: `block=i` is the output of block i (negative indices count from the end), the pre-final-norm
    residual stream; `block=None` is the model's final, normalised token sequence.
    """

    def __init__(self, vit: nn.Module) -> None:
        self.vit = vit
        self.family = tower_family(vit)
        self.layout = _LAYOUTS[self.family]
        # transformers <= 4 nested the CLIP tower under `.vision_model`; 5 does not
        self.root = getattr(vit, "vision_model", vit) if self.family == "hf_clip" else vit

    def __repr__(self) -> str:
        return f"TowerAdapter({self.family}, {type(self.vit).__name__})"

    # -- static facts ------------------------------------------------------------------------------------------
    @functools.cached_property
    def spec(self) -> TowerSpec:
        """The tower's `TowerSpec` (timm: mean/std from `pretrained_cfg`, ImageNet defaults when absent)."""
        vit = self.vit
        if self.family == "timm":
            cfg = getattr(vit, "pretrained_cfg", None) or {}
            return TowerSpec(family="timm", embed_dim=int(vit.embed_dim), depth=len(vit.blocks),
                             num_heads=int(vit.blocks[0].attn.num_heads),
                             patch_size=_pair_to_int(vit.patch_embed.patch_size, "patch size"),
                             image_size=_pair_to_int(vit.patch_embed.img_size, "image size"),
                             num_prefix_tokens=int(vit.num_prefix_tokens),
                             num_native_registers=int(getattr(vit, "num_reg_tokens", 0)),
                             mean=tuple(float(v) for v in cfg.get("mean", IMAGENET_MEAN)),
                             std=tuple(float(v) for v in cfg.get("std", IMAGENET_STD)))
        cfg = vit.config
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if self.family == "hf_dinov2" else (CLIP_MEAN, CLIP_STD)
        return TowerSpec(family=self.family, embed_dim=int(cfg.hidden_size), depth=int(cfg.num_hidden_layers),
                         num_heads=int(cfg.num_attention_heads), patch_size=_pair_to_int(cfg.patch_size, "patch size"),
                         image_size=_pair_to_int(cfg.image_size, "image size"), num_prefix_tokens=1,
                         num_native_registers=0, mean=mean, std=std)

    # -- modules -----------------------------------------------------------------------------------------------
    @property
    def blocks(self) -> nn.ModuleList:
        """The transformer blocks, in order."""
        return self.root.get_submodule(self.layout.blocks)

    def resolve_block(self, block: int) -> int:
        """A possibly negative block index as a block number (raises `IndexError` when out of range)."""
        depth = len(self.blocks)
        idx = block + depth if block < 0 else block
        if not 0 <= idx < depth:
            raise IndexError(f"block index {block} out of range for a model with {depth} blocks")
        return idx

    def attention(self, block: int) -> nn.Module:
        """The self-attention module of a block (its input is the block's post-LayerNorm hidden states)."""
        return self.blocks[block].get_submodule(self.layout.attention)

    def norm1(self, block: int) -> nn.Module:
        """The pre-attention norm of a block."""
        return self.blocks[block].get_submodule(self.layout.norm1)

    def norm2(self, block: int) -> nn.Module:
        """The pre-MLP norm of a block."""
        return self.blocks[block].get_submodule(self.layout.norm2)

    def mlp(self, block: int) -> tuple[nn.Linear, nn.Module, nn.Linear]:
        """`(fc1, activation, fc2)` of a block's plain MLP (raises `TypeError` for gated / SwiGLU MLPs)."""
        mlp = self.blocks[block].get_submodule(self.layout.mlp)
        if not (hasattr(mlp, "fc1") and hasattr(mlp, "fc2") and hasattr(mlp, self.layout.mlp_act)):
            raise TypeError(f"{type(mlp).__name__} is not a plain fc1 -> activation -> fc2 MLP")
        return mlp.fc1, getattr(mlp, self.layout.mlp_act), mlp.fc2

    def mlp_scale(self, block: int) -> torch.Tensor | None:
        """The per-channel layer-scale of a block's MLP branch (DINOv2, timm `ls2`), or None."""
        name = self.layout.layer_scale2
        if name is None or not hasattr(self.blocks[block], name):
            return None
        ls = self.blocks[block].get_submodule(name)
        return getattr(ls, "lambda1", getattr(ls, "gamma", None))

    @property
    def embeddings(self) -> nn.Module:
        """HF: the embeddings module (patches + CLS + position embeddings); registers are appended at its output."""
        if self.family == "timm":
            raise TypeError("timm VisionTransformer has no separate embeddings module; it takes native registers")
        return self.root.embeddings

    @property
    def final_norm(self) -> nn.Module:
        """The norm applied to the final token sequence (HF CLIP: `post_layernorm`)."""
        return self.root.get_submodule(self.layout.final_norm)

    def position_rows(self) -> tuple[torch.Tensor, int]:
        """`(rows, offset)`: the position-embedding rows `(T, D)` and the index of the first patch row in them."""
        if self.family == "timm":
            vit = self.vit
            return vit.pos_embed.data[0], 0 if vit.no_embed_class else int(vit.num_prefix_tokens)
        if self.family == "hf_dinov2":
            return self.root.embeddings.position_embeddings.data[0], 1
        return self.root.embeddings.position_embedding.weight.data, 1

    def param_prefixes(self, group: str, blocks: Sequence[int] = ()) -> list[str]:
        """Parameter-name prefixes (as in `vit.named_parameters()`) of a group: `pos_embed`, `patch_embed` or
        `blocks` (the given block numbers)."""
        root = "vision_model." if self.root is not self.vit else ""
        if group == "pos_embed":
            return [root + self.layout.pos_embed]
        if group == "patch_embed":
            return [root + self.layout.patch_embed]
        if group == "blocks":
            return [f"{root}{self.layout.blocks}.{i}." for i in blocks]
        raise ValueError(f"unknown parameter group {group!r}; groups: pos_embed, patch_embed, blocks")

    # -- tokens ------------------------------------------------------------------------------------------------
    def grid(self, height: int, width: int) -> tuple[int, int]:
        """Patch grid of a `height x width` input (raises `ValueError` unless both are multiples of the patch)."""
        p = self.spec.patch_size
        if height % p or width % p:
            raise ValueError(f"input {height}x{width} is not a multiple of the patch size {p}")
        return height // p, width // p

    def _hf_call(self, pixel_values: torch.Tensor):
        kwargs = {}
        size = self.spec.image_size
        if self.family == "hf_clip" and tuple(pixel_values.shape[-2:]) != (size, size):
            kwargs["interpolate_pos_encoding"] = True
        return self.vit(pixel_values=pixel_values, return_dict=True, **kwargs)

    def tokens(self, pixel_values: torch.Tensor, block: int | None = None) -> torch.Tensor:
        """The full token sequence `(B, T, D)` at `block` (registers attached by hooks included at the end).

        Args:
            pixel_values: `(B, 3, H, W)` normalised images.
            block: block whose output (pre-final-norm residual stream) is returned; None for the final normalised
                sequence (HF CLIP: `post_layernorm` applied to every token, as OpenAI CLIP's `ln_post`).
        """
        if block is None:
            if self.family == "timm":
                return self.vit.forward_features(pixel_values)
            out = self._hf_call(pixel_values)
            if self.family == "hf_dinov2":
                return out.last_hidden_state
            return self.final_norm(out.last_hidden_state)
        target = self.blocks[self.resolve_block(block)]
        store: dict = {}
        with HookHandle("tower.tokens") as handle:
            handle.forward_hook(target, functools.partial(_capture_output, store))
            if self.family == "timm":
                self.vit.forward_features(pixel_values)
            else:
                self._hf_call(pixel_values)
        if "tokens" not in store:
            raise RuntimeError(f"block {block} did not run during the forward pass")
        return store["tokens"]

    def patch_tokens(self, pixel_values: torch.Tensor, block: int | None = None) -> torch.Tensor:
        """Patch tokens `(B, grid_h * grid_w, D)` at `block` (see `tokens`)."""
        gh, gw = self.grid(pixel_values.shape[-2], pixel_values.shape[-1])
        tokens = self.tokens(pixel_values, block)
        start = self.spec.num_prefix_tokens
        if tokens.shape[1] < start + gh * gw:
            raise RuntimeError(f"expected at least {start + gh * gw} tokens, got {tokens.shape[1]}")
        return tokens[:, start:start + gh * gw]


def get_tower(vit: nn.Module) -> TowerAdapter:
    """The tower adapter of a supported ViT instance; anything else raises a `TypeError` naming the supported ones."""
    return TowerAdapter(vit)


# -- model families ----------------------------------------------------------------------------------------------

@dataclass
class VisionPlan:
    """Per-call layout of the vision batch: one row per crop (one crop per image for LLaVA-1.5).

    Attributes:
        row_image: image index (over the whole batch) of each vision row.
        image_rows: the vision rows of each image.
        image_sample: the sample (prompt) index of each image.
        n_patches: patches per row (grid height x width).
        grid: patch grid `(height, width)` of one row.
        n_prefix: prefix tokens before the patches in the tower sequence (CLS).
        n_suffix: tokens appended after the patches inside the tower (registers of a modifier), 0 by default.
        valid: `(rows, n_patches)` positions that reach the LLM (all for LLaVA-1.5; unpadded area for NeXT).
        budget: `(rows,)` patches to keep per row (equal to the valid count when nothing is pruned).
        prune: whether a selecting method is active for this call.
    """

    row_image: list[int]
    image_rows: list[list[int]]
    image_sample: list[int]
    n_patches: int
    grid: tuple[int, int]
    n_prefix: int
    valid: torch.Tensor
    budget: torch.Tensor
    prune: bool
    n_suffix: int = 0
    image_sizes: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)

    @property
    def n_rows(self) -> int:
        return len(self.row_image)


def split_budget(total: int, capacity: list[int]) -> list[int]:
    """Split `total` tokens evenly over crops with the given capacities (water-filling; remainder to the first)."""
    if total > sum(capacity):
        raise ValueError(f"budget {total} exceeds the {sum(capacity)} available positions")
    lo, hi = 0, max(capacity, default=0)
    while lo < hi:  # the highest fill level that fits the total
        mid = (lo + hi + 1) // 2
        if sum(min(c, mid) for c in capacity) <= total:
            lo = mid
        else:
            hi = mid - 1
    share = [min(c, lo) for c in capacity]
    left = total - sum(share)
    for i, c in enumerate(capacity):
        if left and share[i] < c:
            share[i] += 1
            left -= 1
    return share


class ModelAdapter(ABC):
    """Module paths and token bookkeeping of one supported model family (instances wrap one model)."""

    family: str = ""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        cfg = model.config
        vcfg = cfg.vision_config
        if vcfg.model_type not in SUPPORTED_TOWERS:
            raise TypeError(f"unsupported vision tower {vcfg.model_type!r} in {type(model).__name__}; supported "
                            f"towers: CLIP ({SUPPORTED_TOWERS[0]}) and DINOv2 ({SUPPORTED_TOWERS[1]})")
        if not isinstance(cfg.vision_feature_layer, int):
            raise ValueError(f"vision_feature_layer={cfg.vision_feature_layer!r}: only a single feature layer (an int)"
                             " is supported")
        self.tower_type = vcfg.model_type
        self.tower = TowerAdapter(self.vision_tower)
        self.n_prefix = 1  # CLIP and DINOv2: one CLS token, no registers
        self.patch_size = vcfg.patch_size
        side = vcfg.image_size // vcfg.patch_size
        # the config's native grid; a call's actual grid comes from its pixel_values (VisionPlan.grid), since
        # towers that interpolate position embeddings (DINOv2) may run at another resolution than the config's
        self.grid = (side, side)
        self.n_patches = side * side
        self.n_layers = vcfg.num_hidden_layers
        self.n_heads = vcfg.num_attention_heads
        self.head_dim = vcfg.hidden_size // vcfg.num_attention_heads
        self.feature_layer = cfg.vision_feature_layer
        # hidden_states has n_layers + 1 entries (embeddings first): entry j is the output of block j - 1
        self.feature_block = cfg.vision_feature_layer % (self.n_layers + 1) - 1
        if self.feature_block < 0:
            raise ValueError("vision_feature_layer selects the embeddings; no attention layer to score with")
        self.select_strategy = cfg.vision_feature_select_strategy
        if self.select_strategy not in ("default", "full"):
            raise ValueError(f"unsupported vision_feature_select_strategy {self.select_strategy!r}")
        self.image_token_id = cfg.image_token_id

    # -- modules ---------------------------------------------------------------------------------------------
    @property
    def vision_tower(self) -> nn.Module:
        return self.model.model.vision_tower

    @property
    def projector(self) -> nn.Module:
        return self.model.model.multi_modal_projector

    @property
    def language_model(self) -> nn.Module:
        return self.model.model.language_model

    @property
    def lm_layers(self) -> nn.ModuleList:
        return self.language_model.layers

    @property
    def vision_layers(self) -> nn.ModuleList:
        return self.tower.blocks

    def vision_attention(self, block: int) -> nn.Module:
        """The attention module of a vision block; its input is the block's post-LayerNorm hidden states."""
        return self.tower.attention(block)

    @property
    def keeps_cls(self) -> bool:
        """Whether the CLS feature is passed to the LLM (`vision_feature_select_strategy == "full"`)."""
        return self.select_strategy == "full"

    # -- per call ---------------------------------------------------------------------------------------------
    @abstractmethod
    def vision_rows(self, pixel_values: torch.Tensor, image_sizes) -> tuple[torch.Tensor, list[int]]:
        """Flatten the pixel input into vision-tower rows; returns `(rows, crops per image)`."""

    @abstractmethod
    def valid_positions(self, image_sizes, crops: list[int], device, n_patches: int) -> torch.Tensor:
        """`(rows, n_patches)` mask of patch positions that reach the LLM."""

    @abstractmethod
    def tokens_per_image(self, plan: VisionPlan) -> list[int]:
        """Number of LLM placeholder tokens per image without pruning (what the processor expanded)."""

    @abstractmethod
    def token_layout(self, plan: VisionPlan, kept: list[torch.Tensor], image: int) -> torch.Tensor:
        """Original patch index of each LLM token of one image as `pack` lays it out (CPU LongTensor).

        `kept` holds the kept original patch indices per vision row. Tokens that are not patches (the CLS feature
        of the "full" strategy, LLaVA-NeXT's `image_newline`) are -1; NeXT patches are `crop * n_patches + patch`.
        """

    @abstractmethod
    def pack(self, projected: list[torch.Tensor], kept: list[torch.Tensor], plan: VisionPlan) -> list[torch.Tensor]:
        """Arrange the projected kept features of each row into the LLM token sequence of each image."""

    @abstractmethod
    def frame_cells(self, image_size: tuple[int, int], grid: tuple[int, int]) -> list[torch.Tensor]:
        """Where the patch tokens of one image sit on the image: the cells of its map frame.

        Args:
            image_size: the original image's `(height, width)` in pixels.
            grid: the patch grid `(rows, cols)` of one crop in the call (`Trace.grid`).

        Returns:
            One or more `(R, C)` LongTensors over the same frame: for each cell, the patch index
            (`crop * n_patches + patch`, the numbering of `SequenceLayout.patch`) of the token covering it. LLaVA-1.5:
            one tensor, the crop's grid. LLaVA-NeXT: the stitched anyres tiles after HF's unpadding (the frame),
            then the base crop's token covering each cell (bilinear-free nearest cover of the same image area).
        """

    def plan(self, pixel_values: torch.Tensor, image_sizes, image_sample: list[int], keep: int | None,
             ratio: float | None, prune: bool) -> tuple[torch.Tensor, VisionPlan]:
        """Vision rows and the per-row budgets for a call (`keep` per image or `ratio` removed)."""
        rows, crops = self.vision_rows(pixel_values, image_sizes)
        grid = (rows.shape[-2] // self.patch_size, rows.shape[-1] // self.patch_size)
        n_patches = grid[0] * grid[1]
        valid = self.valid_positions(image_sizes, crops, rows.device, n_patches)
        row_image, image_rows, start = [], [], 0
        for i, c in enumerate(crops):
            row_image += [i] * c
            image_rows.append(list(range(start, start + c)))
            start += c
        cap = valid.sum(1).tolist()
        budget = list(cap)
        if prune:
            for rws in image_rows:
                total = sum(cap[r] for r in rws)
                if keep is not None:
                    want = min(keep, total)
                else:
                    want = max(1, int(round(total * (1.0 - ratio))))
                for r, b in zip(rws, split_budget(want, [cap[r] for r in rws])):
                    budget[r] = b
        plan = VisionPlan(row_image=row_image, image_rows=image_rows, image_sample=image_sample,
                          n_patches=n_patches, grid=grid, n_prefix=self.n_prefix, valid=valid,
                          budget=torch.tensor(budget, dtype=torch.long), prune=prune,
                          image_sizes=None if image_sizes is None else torch.as_tensor(image_sizes))
        return rows, plan


class LlavaAdapter(ModelAdapter):
    """HF `LlavaForConditionalGeneration`: one 2-D grid per image, CLS dropped or kept per the config."""

    family = "llava"

    def vision_rows(self, pixel_values, image_sizes):
        if pixel_values.dim() != 4:
            raise ValueError(f"LLaVA expects pixel_values of shape (images, 3, H, W), got {tuple(pixel_values.shape)}")
        return pixel_values, [1] * pixel_values.shape[0]

    def valid_positions(self, image_sizes, crops, device, n_patches):
        return torch.ones(sum(crops), n_patches, dtype=torch.bool, device=device)

    def tokens_per_image(self, plan):
        return [plan.n_patches + (1 if self.keeps_cls else 0)] * len(plan.image_rows)

    def token_layout(self, plan, kept, image):
        layout = kept[plan.image_rows[image][0]].cpu().long()
        return torch.cat([torch.tensor([-1]), layout]) if self.keeps_cls else layout

    def pack(self, projected, kept, plan):
        return list(projected)

    def frame_cells(self, image_size, grid):
        return [torch.arange(grid[0] * grid[1]).view(grid[0], grid[1])]


class LlavaNextAdapter(ModelAdapter):
    """HF `LlavaNextForConditionalGeneration`: base crop + anyres tiles, unpadding and `image_newline` tokens.

    Packing reuses the model's own `pack_image_features` on a full grid (pruned positions zero) and on a kept mask,
    so unpadding and newline placement are exactly HF's.
    """

    family = "llava_next"

    def __init__(self, model):
        super().__init__(model)
        if self.keeps_cls:
            raise ValueError("LLaVA-NeXT packs crops into grids and needs vision_feature_select_strategy='default'")

    def _crops(self, image_sizes) -> list[int]:
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        cfg = self.model.config
        return [image_size_to_num_patches(image_size=s, grid_pinpoints=cfg.image_grid_pinpoints,
                                          patch_size=cfg.vision_config.image_size) for s in image_sizes]

    def vision_rows(self, pixel_values, image_sizes):
        if image_sizes is None:
            raise ValueError("LLaVA-NeXT needs image_sizes (returned by its processor)")
        crops = self._crops(image_sizes)
        if pixel_values.dim() == 5:
            rows = torch.cat([pv[:c] for pv, c in zip(pixel_values, crops)], dim=0)
        elif pixel_values.dim() == 4:
            rows = pixel_values
        else:
            raise ValueError(f"pixel_values of shape {tuple(pixel_values.shape)}: expected 4 or 5 dimensions")
        if rows.shape[0] != sum(crops):
            raise ValueError(f"pixel_values hold {rows.shape[0]} crops but image_sizes imply {sum(crops)}")
        size = self.model.config.vision_config.image_size
        if tuple(rows.shape[-2:]) != (size, size):
            raise ValueError(f"LLaVA-NeXT crops must be {size}x{size} (the vision config's image_size), got "
                             f"{tuple(rows.shape[-2:])}")
        return rows, crops

    def _pack_values(self, values: torch.Tensor, image_idx: int, image_sizes, newline: float) -> torch.Tensor:
        """Pack a per-row `(crops, n_patches, C)` tensor of one image with HF's layout; newline cells = `newline`."""
        nl = torch.full((values.shape[-1],), newline, dtype=values.dtype, device=values.device)
        packed, _ = self.model.model.pack_image_features([values], image_sizes[image_idx:image_idx + 1],
                                                         vision_feature_select_strategy=self.select_strategy,
                                                         image_newline=nl)
        return packed[0]

    def valid_positions(self, image_sizes, crops, device, n_patches):
        valid = torch.zeros(sum(crops), n_patches, dtype=torch.bool, device=device)
        start = 0
        for i, c in enumerate(crops):
            idx = torch.arange(c * n_patches, device=device, dtype=torch.float32).view(c, n_patches, 1)
            packed = self._pack_values(idx, i, image_sizes, newline=-1.0)[:, 0]
            flat = packed[packed >= 0].long()
            v = torch.zeros(c * n_patches, dtype=torch.bool, device=device)
            v[flat] = True
            valid[start:start + c] = v.view(c, n_patches)
            start += c
        return valid

    def tokens_per_image(self, plan):
        return [int(plan.valid[rws].sum()) + self._newlines(plan, i) for i, rws in enumerate(plan.image_rows)]

    def _newlines(self, plan: VisionPlan, image_idx: int) -> int:
        key = ("newlines", image_idx)
        if key not in plan.extra:
            rws = plan.image_rows[image_idx]
            ones = torch.zeros(len(rws), plan.n_patches, 1)
            packed = self._pack_values(ones, image_idx, plan.image_sizes, newline=1.0)
            plan.extra[key] = int(packed.sum())
        return plan.extra[key]

    def token_layout(self, plan, kept, image):
        rws, n = plan.image_rows[image], plan.n_patches
        grid = torch.zeros(len(rws), n, 1, dtype=torch.float64)  # 0 = pruned, j * n + k + 1 = kept patch
        for j, r in enumerate(rws):
            k = kept[r].cpu()
            grid[j, k, 0] = (j * n + k + 1).double()
        vals = self._pack_values(grid, image, plan.image_sizes, newline=-1.0)[:, 0]
        vals = vals[vals != 0]
        return torch.where(vals > 0, vals - 1, -1).round().long()

    def pack(self, projected, kept, plan):
        out = []
        for i, rws in enumerate(plan.image_rows):
            feats = projected[rws[0]]
            dim, dtype, device = feats.shape[-1], feats.dtype, feats.device
            grid = torch.zeros(len(rws), plan.n_patches, dim, dtype=dtype, device=device)
            mask = torch.zeros(len(rws), plan.n_patches, 1, dtype=dtype, device=device)
            for j, r in enumerate(rws):
                grid[j, kept[r]] = projected[r]
                mask[j, kept[r]] = 1
            nl = self.model.model.image_newline
            packed, _ = self.model.model.pack_image_features([grid], plan.image_sizes[i:i + 1],
                                                             vision_feature_select_strategy=self.select_strategy,
                                                             image_newline=nl)
            packed_mask = self._pack_values(mask, i, plan.image_sizes, newline=1.0)[:, 0]
            out.append(packed[0][packed_mask > 0.5])
        return out


    def frame_cells(self, image_size, grid):
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        cfg = self.model.config
        crops = image_size_to_num_patches(image_size=list(image_size), grid_pinpoints=cfg.image_grid_pinpoints,
                                          patch_size=cfg.vision_config.image_size)
        n = grid[0] * grid[1]
        idx = torch.arange(crops * n, dtype=torch.float64).view(crops, n, 1)
        sizes = torch.tensor([list(image_size)])
        packed = self._pack_values(idx, 0, sizes, newline=-1.0)[:, 0]
        base = torch.arange(n).view(grid[0], grid[1])
        tiles = packed[n:]
        if tiles.numel() == 0:  # no anyres tiles: the base crop is the frame
            return [base]
        width = int(torch.nonzero(tiles < 0)[0, 0]) + 1  # one row of the stitched grid + its newline
        frame = tiles.view(-1, width)[:, :-1].round().long()
        rows, cols = frame.shape
        # the base crop covers the whole (unpadded) image: nearest base cell of each frame cell's centre
        br = ((torch.arange(rows) + 0.5) * grid[0] / rows).floor().long().clamp(max=grid[0] - 1)
        bc = ((torch.arange(cols) + 0.5) * grid[1] / cols).floor().long().clamp(max=grid[1] - 1)
        return [frame, base[br][:, bc]]


def get_adapter(model: nn.Module) -> ModelAdapter:
    """The adapter for a supported model instance; anything else raises a `TypeError` naming the supported ones."""
    from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    if isinstance(model, LlavaNextForConditionalGeneration):
        return LlavaNextAdapter(model)
    if isinstance(model, LlavaForConditionalGeneration):
        return LlavaAdapter(model)
    raise TypeError(f"unsupported model {type(model).__name__}; vlm_tools supports: {', '.join(SUPPORTED_FAMILIES)}"
                    f" with a CLIP or DINOv2 vision tower")
