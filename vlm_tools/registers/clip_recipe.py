"""PH-Reg's CLIP recipe (`0raiser0/PH-Reg`, `CLIP/`): a NACLIP-style teacher and a value-readout student.

For CLIP towers the official code distils dense features differently from DINOv2:

* **Teacher** (NACLIP, `arch="reduced"`): the last block is replaced by its attention alone, with no residual and no
  MLP, computed as key-key attention plus a Gaussian neighbourhood window on the logits,
  `softmax(k k^T * head_dim^-0.5 + Omega) v`, then the attention's output projection; then the final LayerNorm
  (`ln_post` / HF `post_layernorm` / timm `norm`) on every token and the tower's projection where it has one.
  `Omega[(i, j), (k, l)] = exp(-((i - k)^2 + (j - l)^2) / (2 std^2))` over the patch grid of the input (NACLIP's
  default `std = 5`); its rows and columns of prefix tokens (CLS, timm's native registers) are 0.
* **Student**: registers as for every recipe, and a last block that keeps only the value path,
  `out_proj(v_proj(ln_1(x)))` (MaskCLIP's value embedding, `ModifiedLastLayer`), then the same final LayerNorm and
  projection.

Both are hooks on a tower instance (a forward hook that replaces the last block's output; marked, held by a
`HookHandle`), so the library classes are untouched. Supported: HF `CLIPVisionModel` (the LLaVA CLIP tower is one;
it has no projection) and timm `VisionTransformer` blocks with a fused `qkv` attention (their `head` is the
projection when it is a `Linear`, as in timm's OpenAI CLIP ViTs). The plain recipe (the unmodified tower as teacher
and student) stays available for every tower.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlm_tools.core.adapters import TowerAdapter, get_tower
from vlm_tools.core.attention import input_hidden_states, vit_project, vit_scale
from vlm_tools.core.hooks import HookHandle

__all__ = ["NACLIP_STD", "RECIPES", "attach_naclip_teacher", "attach_value_readout", "check_clip_tower",
           "dense_projection", "is_clip_tower", "naclip_attention", "neighbourhood_bias", "resolve_recipe"]

RECIPES = ("plain", "clip")
#: NACLIP's default Gaussian window std (`sinahmr/NACLIP`), which PH-Reg's teacher inherits.
NACLIP_STD = 5.0


def is_clip_tower(vit: nn.Module) -> bool:
    """Whether `vit` is a CLIP tower: HF `CLIPVisionModel`, or a timm ViT whose architecture name says CLIP."""
    tower = get_tower(vit)
    if tower.family == "hf_clip":
        return True
    arch = (getattr(vit, "pretrained_cfg", None) or {}).get("architecture") or ""
    return tower.family == "timm" and "clip" in arch


def resolve_recipe(recipe: str, vit: nn.Module, target_block: int | None) -> str:
    """`"auto"` -> `"clip"` for CLIP towers distilled at their final output, else `"plain"`; others are checked.

    Raises:
        ValueError: for an unknown recipe, or `"clip"` with a `target_block` (the recipe replaces the last block).
        TypeError: for `"clip"` on a tower whose last block cannot be rebuilt (see `check_clip_tower`).
    """
    if recipe == "auto":
        return "clip" if target_block is None and is_clip_tower(vit) else "plain"
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; choose from auto, {', '.join(RECIPES)}")
    if recipe == "clip":
        if target_block is not None:
            raise ValueError("the CLIP recipe distils the final output (it replaces the last block); "
                             f"target_block={target_block} needs recipe 'plain'")
        check_clip_tower(vit)
    return recipe


def _parts(tower: TowerAdapter, block: int) -> tuple[nn.Module, nn.Module, nn.Linear]:
    """`(norm1, attention, output projection)` of a block whose attention the recipe can rebuild."""
    attn = tower.attention(block)
    if tower.family == "hf_clip":
        return tower.norm1(block), attn, attn.out_proj
    if tower.family == "timm" and hasattr(attn, "qkv") and hasattr(attn, "proj") and getattr(attn, "gate",
                                                                                              None) is None:
        return tower.norm1(block), attn, attn.proj
    raise TypeError(f"the CLIP recipe needs a CLIP tower (HF CLIPVisionModel) or a timm ViT with fused-qkv "
                    f"attention; {type(attn).__name__} of a {tower.family} tower is not supported")


def check_clip_tower(vit: nn.Module) -> None:
    """Raise a `TypeError` unless the tower's last block can be rebuilt by the recipe."""
    tower = get_tower(vit)
    _parts(tower, len(tower.blocks) - 1)


def dense_projection(vit: nn.Module) -> nn.Linear | None:
    """The projection applied to dense features after the final norm (timm: `head` when it is a `Linear`; HF
    `CLIPVisionModel` has none: its projection lives in `CLIPModel.visual_projection`)."""
    head = getattr(vit, "head", None) if get_tower(vit).family == "timm" else None
    return head if isinstance(head, nn.Linear) else None


def neighbourhood_bias(grid: tuple[int, int], n_prefix: int, n_tokens: int, std: float,
                       device: torch.device | None = None) -> torch.Tensor:
    """NACLIP's `(T, T)` logit bias: a Gaussian of the grid distance between patches, 0 for non-patch tokens.

    Args:
        grid: patch grid `(h, w)` of the input.
        n_prefix: tokens before the patches (CLS, timm's native registers).
        n_tokens: sequence length (tokens after the patches, e.g. appended registers, also get 0).
        std: the Gaussian's std in patches.
    """
    h, w = grid
    if n_prefix + h * w > n_tokens:
        raise ValueError(f"{n_tokens} tokens cannot hold {n_prefix} prefix tokens and a {h}x{w} grid")
    rows = torch.arange(h, device=device).repeat_interleave(w).float()
    cols = torch.arange(w, device=device).repeat(h).float()
    d2 = (rows[:, None] - rows[None, :]) ** 2 + (cols[:, None] - cols[None, :]) ** 2
    bias = torch.zeros(n_tokens, n_tokens, device=device)
    bias[n_prefix:n_prefix + h * w, n_prefix:n_prefix + h * w] = torch.exp(-d2 / (2 * std ** 2))
    return bias


def naclip_attention(attn: nn.Module, out_proj: nn.Linear, hidden: torch.Tensor, grid: tuple[int, int],
                     n_prefix: int, std: float, return_probs: bool = False):
    """NACLIP's key-key attention of one layer, in fp32: `out_proj(merge(softmax(k k^T * scale + Omega) v))`.

    Args:
        attn: the attention module (HF CLIP or timm fused qkv).
        out_proj: its output projection.
        hidden: the attention's input `(B, T, D)` (the block's post-LayerNorm hidden states).
        grid: patch grid of the input.
        n_prefix: prefix tokens.
        std: Gaussian window std.
        return_probs: also return the `(B, heads, T, T)` attention probabilities.
    """
    k = vit_project(attn, hidden, "k")
    v = vit_project(attn, hidden, "v")
    logits = (k @ k.transpose(-1, -2)) * vit_scale(attn)
    logits = logits + neighbourhood_bias(grid, n_prefix, hidden.shape[1], std, hidden.device)
    probs = logits.softmax(-1)
    y = (probs @ v).transpose(1, 2).reshape(hidden.shape[0], hidden.shape[1], -1)
    norm = getattr(attn, "norm", None)  # timm scale_norm
    if isinstance(norm, nn.Module) and not isinstance(norm, nn.Identity):
        y = norm(y.to(hidden.dtype)).float()
    out = F.linear(y, out_proj.weight.float(), None if out_proj.bias is None else out_proj.bias.float())
    out = out.to(hidden.dtype)
    return (out, probs) if return_probs else out


def _grid_pre_hook(state: dict, tower: TowerAdapter, module: nn.Module, args: tuple, kwargs: dict) -> None:
    pixels = args[0] if args else kwargs["pixel_values"]
    state["grid"] = tower.grid(pixels.shape[-2], pixels.shape[-1])


def _replace_output(output: Any, new: torch.Tensor) -> Any:
    if isinstance(output, tuple):
        return (new, *output[1:])
    return new


def _naclip_hook(state: dict, norm1: nn.Module, attn: nn.Module, out_proj: nn.Linear, n_prefix: int, std: float,
                 module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
    x = input_hidden_states(args, kwargs)
    with torch.autocast(device_type=x.device.type, enabled=False):
        new = naclip_attention(attn, out_proj, norm1(x.float()), state["grid"], n_prefix, std)
    return _replace_output(output, new.to(x.dtype))


def _value_hook(norm1: nn.Module, attn: nn.Module, out_proj: nn.Linear, module: nn.Module, args: tuple,
                kwargs: dict, output: Any) -> Any:
    x = norm1(input_hidden_states(args, kwargs))
    if hasattr(attn, "v_proj"):
        v = attn.v_proj(x)
    else:
        width = attn.qkv.weight.shape[0] // 3
        bias = None if attn.qkv.bias is None else attn.qkv.bias[2 * width:]
        v = F.linear(x, attn.qkv.weight[2 * width:], bias)
        norm = getattr(attn, "norm", None)
        if isinstance(norm, nn.Module) and not isinstance(norm, nn.Identity):
            v = norm(v)
    return _replace_output(output, out_proj(v))


def _patch_module(tower: TowerAdapter) -> nn.Module:
    return tower.vit.patch_embed if tower.family == "timm" else tower.embeddings


def attach_naclip_teacher(vit: nn.Module, handle: HookHandle, std: float = NACLIP_STD) -> None:
    """Make `vit`'s last block NACLIP's (key-key attention + Gaussian window, no residual / MLP) until `handle` is
    removed. The final norm of the tower then applies as usual; add `dense_projection(vit)` for projected features.
    """
    if not std > 0:
        raise ValueError(f"the Gaussian window std must be positive, got {std}")
    tower = get_tower(vit)
    last = len(tower.blocks) - 1
    norm1, attn, out_proj = _parts(tower, last)
    state: dict = {}
    handle.forward_pre_hook(_patch_module(tower), functools.partial(_grid_pre_hook, state, tower), with_kwargs=True)
    handle.forward_hook(tower.blocks[last], functools.partial(_naclip_hook, state, norm1, attn, out_proj,
                                                              tower.spec.num_prefix_tokens, float(std)),
                        with_kwargs=True)


def attach_value_readout(vit: nn.Module, handle: HookHandle) -> None:
    """Make `vit`'s last block return only its value path `out_proj(v(norm1(x)))` (no attention mixing, residual or
    MLP) until `handle` is removed; differentiable (the student trains through it)."""
    tower = get_tower(vit)
    last = len(tower.blocks) - 1
    norm1, attn, out_proj = _parts(tower, last)
    handle.forward_hook(tower.blocks[last], functools.partial(_value_hook, norm1, attn, out_proj), with_kwargs=True)
