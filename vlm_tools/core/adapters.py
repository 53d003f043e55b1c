"""Model adapters: where the vision tower, projector and LLM of a family live, token counts, and the per-call plan.

Supported families: HF `LlavaForConditionalGeneration` (LLaVA-1.5 layout) and `LlavaNextForConditionalGeneration`
(anyres crops, `image_newline`), each with a CLIP or DINOv2 vision tower (one CLS prefix token). All counts are read
from the model config: grid size, prefix tokens, feature layer, number of layers.

Budget rule for several crops (LLaVA-NeXT): `keep` is the number of visual tokens per *image* that reach the LLM,
newline tokens excluded, summed over the base crop and the tiles. It is split evenly across the image's crops;
a crop whose patches partly fall in the unpadded border (removed by HF's anyres unpadding) can only hold its valid
positions, and what it cannot hold goes to the other crops (water-filling). Selection never picks positions that
unpadding would remove. `ratio` removes that fraction of the image's valid patch tokens. All newline tokens of the
anyres layout are kept, so the LLM sees `keep + rows_of_the_stitched_grid` tokens (as in ZOO-Prune).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["ModelAdapter", "LlavaAdapter", "LlavaNextAdapter", "VisionPlan", "get_adapter", "SUPPORTED_FAMILIES",
           "split_budget"]

SUPPORTED_FAMILIES = ("LlavaForConditionalGeneration (llava)", "LlavaNextForConditionalGeneration (llava_next)")
SUPPORTED_TOWERS = ("clip_vision_model", "dinov2")


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
        if self.tower_type == "clip_vision_model":
            return getattr(self.vision_tower, "vision_model", self.vision_tower).encoder.layers
        return self.vision_tower.encoder.layer

    def vision_attention(self, block: int) -> nn.Module:
        """The attention module of a vision block; its input is the block's post-LayerNorm hidden states."""
        layer = self.vision_layers[block]
        return layer.self_attn if self.tower_type == "clip_vision_model" else layer.attention

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


def get_adapter(model: nn.Module) -> ModelAdapter:
    """The adapter for a supported model instance; anything else raises a `TypeError` naming the supported ones."""
    from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    if isinstance(model, LlavaNextForConditionalGeneration):
        return LlavaNextAdapter(model)
    if isinstance(model, LlavaForConditionalGeneration):
        return LlavaAdapter(model)
    raise TypeError(f"unsupported model {type(model).__name__}; vlm_tools supports: {', '.join(SUPPORTED_FAMILIES)}"
                    f" with a CLIP or DINOv2 vision tower")
