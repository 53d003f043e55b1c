"""Synthetic artifact injection: give a small ViT high-norm outlier tokens at known grid cells.

Small backbones show weak artifacts (DINOv2 ViT-S: max/median patch norm <= 2.2 at every layer), so checks of
artifact metrics and of register distillation plant them. :func:`plant_position_outliers` mimics the
position-dependent artifacts described by DVT: a trigger direction ``u`` is added to the position embedding of a few
cells, and one MLP neuron of a chosen block is rewired to fire only on ``u`` and write a large vector ``v`` into the
residual stream. Those tokens then carry norms ``gain`` times the median from that block on, whatever the image.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from vlm_tools.core.adapters import get_tower
from vlm_tools.core.hooks import HookHandle

__all__ = ["PlantedArtifacts", "plant_position_outliers"]


@dataclass
class PlantedArtifacts:
    """What :func:`plant_position_outliers` changed.

    Attributes:
        cells: Flat grid indices of the planted cells.
        block: Block whose MLP neuron was rewired (non-negative index).
        neuron: The rewired hidden unit.
        trigger: ``(D,)`` unit trigger direction added to the position embedding.
        write: ``(D,)`` unit direction the neuron writes.
    """

    cells: list[int]
    block: int
    neuron: int
    trigger: torch.Tensor
    write: torch.Tensor


def _capture_input(store: dict, module: nn.Module, args: tuple) -> None:
    store["in"] = args[0].detach()


def _capture(store: dict, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
    store.setdefault("out", []).append(output.detach())


@torch.no_grad()
def plant_position_outliers(vit: nn.Module, calib_pixels: torch.Tensor, cells: Sequence[int], block: int = 1,
                            neuron: int = 0, trigger_scale: float = 3.0, gain: float = 20.0,
                            seed: int = 0) -> PlantedArtifacts:
    """Plant position-locked high-norm tokens into ``vit`` in place (use it on a model you own).

    Args:
        vit: A timm ``VisionTransformer`` or HF ``Dinov2Model`` (plain GELU MLP), used at its native image size.
        calib_pixels: ``(B, 3, H, W)`` images at the native size, used to calibrate the neuron's threshold.
        cells: Flat patch-grid indices to plant.
        block: Block whose MLP neuron is rewired.
        neuron: Hidden unit to rewire.
        trigger_scale: Trigger added to the planted position rows, in units of the median norm of the embedded
            patch tokens (the input of block 0).
        gain: Target norm of the written vector, in units of the median token norm at that block's output.
        seed: Seed of the trigger and write directions.

    Returns:
        A :class:`PlantedArtifacts` record.

    Raises:
        ValueError: If the planted cells cannot be separated from the others (raise ``trigger_scale``).
    """
    tower = get_tower(vit)
    spec = tower.spec
    if spec.family == "hf_clip":
        raise TypeError("planting supports timm VisionTransformer and Dinov2Model, not hf_clip")
    gh, gw = tower.grid(calib_pixels.shape[-2], calib_pixels.shape[-1])
    n = gh * gw
    cells = sorted({int(c) for c in cells})
    if not cells or cells[0] < 0 or cells[-1] >= n:
        raise ValueError(f"cells must be non-empty indices in [0, {n})")
    b_idx = tower.resolve_block(block)
    norm = tower.norm2(b_idx)
    fc1, _act, fc2 = tower.mlp(b_idx)
    scale = tower.mlp_scale(b_idx)
    gamma = None if scale is None else scale.data
    if not 0 <= neuron < fc1.out_features:
        raise ValueError(f"neuron must be in [0, {fc1.out_features})")
    gen = torch.Generator().manual_seed(int(seed))
    dirs = []
    for _ in range(2):
        d = torch.randn(spec.embed_dim, generator=gen)
        d = d - d.mean()  # survives the LayerNorm mean subtraction
        dirs.append(d / d.norm())
    u, v = dirs
    rows, offset = tower.position_rows()
    if rows.shape[0] - offset != n:
        raise ValueError(f"calibrate at the native grid ({rows.shape[0] - offset} cells), got {n}")
    start = spec.num_prefix_tokens
    first: dict = {}
    with HookHandle("registers.plant") as handle:
        handle.forward_pre_hook(tower.blocks[0], functools.partial(_capture_input, first))
        tower.tokens(calib_pixels, 0)
    typical = first["in"][:, start: start + n].float().norm(dim=-1).median().to(rows)
    idx = torch.tensor(cells) + offset
    rows[idx] += trigger_scale * typical * u.to(rows)

    store: dict = {}
    with HookHandle("registers.plant") as handle:
        handle.forward_hook(norm, functools.partial(_capture, store))
        handle.forward_hook(tower.blocks[b_idx], functools.partial(_capture, store))
        tower.tokens(calib_pixels, b_idx)
    ln_out, blk_out = store["out"][0], store["out"][1]
    z = (ln_out[:, start: start + n].float() @ u.to(ln_out.device)).cpu()  # (B, N)
    planted = torch.zeros(n, dtype=torch.bool)
    planted[cells] = True
    hi, lo = float(z[:, planted].min()), float(z[:, ~planted].max()) if (~planted).any() else -1.0
    if hi <= lo:
        raise ValueError(f"planted cells not separable (min {hi:.3f} <= max {lo:.3f}); raise trigger_scale")
    w = 8.0 / (hi - lo)
    fc1.weight.data[neuron] = (w * u).to(fc1.weight)
    if fc1.bias is not None:
        fc1.bias.data[neuron] = -w * (hi + lo) / 2
    act = torch.nn.functional.gelu(torch.tensor(w * (float(z[:, planted].mean()) - (hi + lo) / 2)))
    median_norm = blk_out[:, start: start + n].float().norm(dim=-1).median().cpu()
    col = v * gain * median_norm / act
    if gamma is not None:
        col = col / gamma.float().cpu()
    fc2.weight.data[:, neuron] = col.to(fc2.weight)
    return PlantedArtifacts(cells=cells, block=b_idx, neuron=neuron, trigger=u, write=v)
