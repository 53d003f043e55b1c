"""Test-time registers (Jiang, Dravid, Efros, Gandelsman, NeurIPS 2025, "Vision Transformers Don't Need Trained
Registers"; code `nickjiang2378/test-time-registers`): training-free, a few MLP neurons moved onto an extra token.

**Finding the register neurons** (`find_register_neurons`, the authors' `find_register_neurons` rule): per image,
the outlier tokens are those whose norm at the output of `detect_block` (the residual stream, before any final
norm; every token, CLS included) exceeds a threshold (`> tau`, the authors' rule; `rule="ratio"/"mad"` give
per-image robust thresholds for uncalibrated backbones); images without outliers are skipped. Every MLP neuron
(the post-activation hidden, i.e. the input of `fc2`) of every block scores `mean over outliers |activation|`,
optionally times a sparsity filter (the neuron is below `sparsity_act` on at least `sparsity_frac` of the tokens);
scores are averaged over the counted images, ranked globally, filtered to `lowest_layer <= block <= highest_layer`,
and the first `top_k` are grouped per block.

**The intervention** (`attach_test_time_registers`, the authors' `activate_on_registers` with
`normal_values="zero"`): `num_registers` zero tokens are appended after the position embeddings (before any
pre-norm); at each selected block, in the input of `fc2`, the selected neurons of the register tokens are set to
`scale * sign_max(...)` of those neurons over all tokens (the value of largest magnitude, the minimum on ties; one
scalar per block, or per neuron with `per_neuron_max`), and the same neurons of the patch tokens to 0 (prefix
tokens such as CLS are left as they are). The registers are stripped from the outputs, so callers see the usual
layout.

Differences from the authors' code: the edit is applied to every image of a batch with its own `sign_max` (theirs
edits only batch item 0 and leaves the others with their artifacts); the ranking sorts stably (ties in flat
`(block, neuron)` order; theirs uses an unstable `torch.sort`); the threshold may be per-image robust
(`rule`); a block's "neuron activation" is read as the input of its `fc2` (their hook on the activation module
gives the same tensor for plain MLPs; SwiGLU towers are not supported here).

`test_time_registers` is a stackable modifier for wrapped LLaVA models: `vlm_tools.wrap(llava,
[("test_time_registers", {"neurons": "neurons.json"}), ("cls_topk", {"keep": 64})])`.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlm_tools._registry import register_method
from vlm_tools.core.adapters import ModelAdapter, TowerAdapter, get_tower
from vlm_tools.core.config import MethodConfig
from vlm_tools.core.hooks import HookHandle, attach_guarded
from vlm_tools.core.io import write_json_atomic
from vlm_tools.core.method import ContextSlot, Modifier

from .artifacts import OUTLIER_RULES, outlier_mask
from .student import strip_registers, vit_of

__all__ = ["NEURONS_FORMAT", "RegisterNeurons", "TestTimeRegistersConfig", "TestTimeRegistersModifier",
           "attach_test_time_registers", "edit_activations", "find_register_neurons", "sign_max"]

NEURONS_FORMAT = "vlm_tools.registers.register_neurons/1"


# ---------------------------------------------------------------------------------------------- the neuron list


@dataclass
class RegisterNeurons:
    """The register neurons of a tower (what `vlm-tools registers find-neurons` writes as JSON).

    Attributes:
        layers: block index -> neuron indices (rank order).
        ranking: the selected `(block, neuron, score)` entries in global rank order.
        tower: the tower's `TowerSpec` as JSON, plus `mlp_width` (checked when the list is applied).
        settings: how the list was found (threshold / rule, detect block, layer range, top_k, sparsity filter,
            images seen and images that had outliers).
    """

    layers: dict[int, list[int]]
    ranking: list[tuple[int, int, float]] = field(default_factory=list)
    tower: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"format": NEURONS_FORMAT, "layers": {str(k): list(v) for k, v in sorted(self.layers.items())},
                "ranking": [[int(b), int(n), float(s)] for b, n, s in self.ranking], "tower": self.tower,
                "settings": self.settings}

    def save(self, path: str | os.PathLike) -> Path:
        """Write the JSON file atomically."""
        return write_json_atomic(path, self.to_json(), indent=2)

    @classmethod
    def load(cls, path: str | os.PathLike) -> RegisterNeurons:
        """Read a file written by `save` (errors name the file and the entry)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"register-neuron file not found: {path}")
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read register-neuron file {path}: {e}") from e
        if not isinstance(data, dict) or data.get("format") != NEURONS_FORMAT:
            raise ValueError(f"{path} is not a {NEURONS_FORMAT} file")
        layers = data.get("layers")
        if not isinstance(layers, dict) or not layers:
            raise ValueError(f"{path}: entry 'layers' must map block indices to neuron lists")
        out: dict[int, list[int]] = {}
        for k, v in layers.items():
            try:
                block = int(k)
            except ValueError:
                raise ValueError(f"{path}: block key {k!r} of 'layers' is not an int") from None
            if not isinstance(v, list) or not v or not all(isinstance(n, int) and not isinstance(n, bool)
                                                           and n >= 0 for n in v):
                raise ValueError(f"{path}: 'layers.{k}' must be a non-empty list of neuron indices, got {v!r}")
            out[block] = list(v)
        return cls(layers=out, ranking=[tuple(r) for r in data.get("ranking", [])], tower=data.get("tower", {}),
                   settings=data.get("settings", {}))

    def check(self, tower: TowerAdapter, where: str = "register neurons") -> dict[int, list[int]]:
        """The layers as non-negative block indices, checked against the tower (depth, MLP width)."""
        out: dict[int, list[int]] = {}
        for block, neurons in self.layers.items():
            try:
                b = tower.resolve_block(block)
            except IndexError as e:
                raise ValueError(f"{where}: {e}") from None
            fc1, _, _ = tower.mlp(b)
            bad = [n for n in neurons if not 0 <= n < fc1.out_features]
            if bad:
                raise ValueError(f"{where}: block {b} has {fc1.out_features} MLP neurons; got {bad}")
            out[b] = sorted(set(neurons))
        width = self.tower.get("mlp_width")
        if width is not None and width != tower.mlp(0)[0].out_features:
            raise ValueError(f"{where}: found on a tower with MLP width {width}, this one has "
                             f"{tower.mlp(0)[0].out_features}")
        return out


def _capture_block(store: dict, index: int, module: nn.Module, args: tuple, output: Any) -> None:
    store["outs"][index] = (output[0] if isinstance(output, tuple) else output).detach().float()


def _capture_hidden(store: dict, index: int, module: nn.Module, args: tuple) -> None:
    store["acts"][index] = args[0].detach().float()


@torch.no_grad()
def find_register_neurons(model: nn.Module, images: torch.Tensor | Iterable[torch.Tensor], *,
                          threshold: float | None = None, rule: str = "fixed", k: float = 3.0,
                          detect_block: int = -1, top_k: int = 10, highest_layer: int | None = None,
                          lowest_layer: int = 0, sparsity_filter: bool = True, sparsity_frac: float = 0.5,
                          sparsity_act: float = 0.5) -> RegisterNeurons:
    """Rank the MLP neurons whose activations concentrate on the outlier tokens (the authors' rule, see the module).

    Args:
        model: a supported ViT (or a `RegisterStudent`: its ViT) with plain `fc1 -> act -> fc2` MLPs.
        images: `(B, 3, H, W)` normalised images, or an iterable of such batches; each image is scored on its own.
        threshold: the norm threshold tau of `rule="fixed"` (the authors: 30 for CLIP-B/16 at the last block, 150
            for DINOv2-L at block -2).
        rule: `"fixed"` (`norm > threshold`), or a per-image robust rule of `artifacts.outlier_mask` (`"ratio"`:
            `norm > k * median`, `"mad"`), applied to every token.
        k: parameter of the robust rules.
        detect_block: block whose output norms define the outliers.
        top_k: neurons kept, over all blocks (global ranking).
        highest_layer: keep blocks <= this (None: no bound; the authors use 5 for CLIP-B, 17 for DINOv2-L).
        lowest_layer: keep blocks >= this.
        sparsity_filter: multiply scores by the sparsity filter (the authors' notebook turns it on).
        sparsity_frac: fraction of tokens a sparse neuron must be below `sparsity_act` on.
        sparsity_act: activation bound of the sparsity filter.

    Raises:
        ValueError: for bad settings, or when no image has an outlier token (lower the threshold).
    """
    if rule not in OUTLIER_RULES:
        raise ValueError(f"unknown outlier rule {rule!r}; choose from {list(OUTLIER_RULES)}")
    if rule == "fixed" and threshold is None:
        raise ValueError("rule 'fixed' needs a norm threshold (the authors: 30 for CLIP-B/16, 150 for DINOv2-L)")
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    tower = get_tower(vit_of(model))
    depth = len(tower.blocks)
    detect = tower.resolve_block(detect_block)
    fcs = [tower.mlp(b)[2] for b in range(depth)]
    width = fcs[0].in_features
    if any(fc.in_features != width for fc in fcs):
        raise ValueError("the MLP width differs between blocks; a global neuron ranking needs one width")
    batches = [images] if torch.is_tensor(images) else list(images)
    total = torch.zeros(depth, width, dtype=torch.float64)
    seen = counted = 0
    for batch in batches:
        store: dict = {"outs": {}, "acts": {}}
        with HookHandle("registers.find_neurons") as handle:
            handle.forward_hook(tower.blocks[detect], functools.partial(_capture_block, store, detect))
            for b, fc in enumerate(fcs):
                handle.forward_pre_hook(fc, functools.partial(_capture_hidden, store, b))
            ref = next(tower.vit.parameters())
            tower.tokens(batch.to(device=ref.device, dtype=ref.dtype), None)
        norms = store["outs"][detect].norm(dim=-1)  # (B, T), every token
        mask = norms > threshold if rule == "fixed" else outlier_mask(norms, rule, k)
        acts = torch.stack([store["acts"][b] for b in range(depth)], dim=1)  # (B, L, T, M)
        n_tok = acts.shape[2]
        for i in range(acts.shape[0]):
            seen += 1
            rows = mask[i].nonzero().flatten()
            if rows.numel() == 0:
                continue
            score = acts[i][:, rows].abs().mean(dim=1)  # (L, M)
            if sparsity_filter:
                sparse = (acts[i] < sparsity_act).sum(dim=1) >= sparsity_frac * n_tok  # (L, M)
                score = score * sparse
            total += score.double().cpu()
            counted += 1
    if counted == 0:
        raise ValueError(f"none of the {seen} images has an outlier token at block {detect} (rule {rule!r}, "
                         f"threshold {threshold}); lower the threshold or use more images")
    mean = (total / counted).flatten()
    order = torch.sort(mean, descending=True, stable=True).indices.tolist()
    hi = depth - 1 if highest_layer is None else tower.resolve_block(highest_layer)
    ranking = []
    for idx in order:
        b, n = divmod(idx, width)
        if lowest_layer <= b <= hi:
            ranking.append((b, n, float(mean[idx])))
            if len(ranking) == top_k:
                break
    layers: dict[int, list[int]] = {}
    for b, n, _ in ranking:
        layers.setdefault(b, []).append(n)
    return RegisterNeurons(
        layers=layers, ranking=ranking, tower={**tower.spec.to_json(), "mlp_width": width},
        settings={"rule": rule, "threshold": threshold, "k": k if rule != "fixed" else None, "detect_block": detect,
                  "top_k": top_k, "highest_layer": hi, "lowest_layer": lowest_layer,
                  "sparsity_filter": sparsity_filter, "sparsity_frac": sparsity_frac, "sparsity_act": sparsity_act,
                  "images": seen, "images_with_outliers": counted})


# ----------------------------------------------------------------------------------------------- the intervention


def sign_max(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """The value of largest magnitude (the minimum when `|max| == |min|`), over all of `x` or along `dim`."""
    hi = x.amax() if dim is None else x.amax(dim=dim)
    lo = x.amin() if dim is None else x.amin(dim=dim)
    return torch.where(hi.abs() > lo.abs(), hi, lo)


def edit_activations(hidden: torch.Tensor, neurons: Sequence[int], n_prefix: int, num_registers: int,
                     scale: float = 1.0, per_neuron_max: bool = False) -> torch.Tensor:
    """The test-time-register edit of one block's MLP hidden `(B, T, M)` (registers last), per batch item.

    Register rows of the selected neurons get `scale * sign_max` of those neurons over all tokens (one scalar per
    item, or one per neuron with `per_neuron_max`); patch rows (between the prefix and the registers) get 0.
    """
    idx = torch.as_tensor(list(neurons), device=hidden.device, dtype=torch.long)
    out = hidden.clone()
    sub = hidden[:, :, idx]  # (B, T, S)
    flat = sub.flatten(1) if not per_neuron_max else sub
    s = sign_max(flat, dim=1)  # (B,) or (B, S)
    value = (scale * s).to(hidden.dtype)
    value = value[:, None, None] if not per_neuron_max else value[:, None, :]
    t = hidden.shape[1]
    out[:, t - num_registers:, idx] = value.expand(-1, num_registers, idx.numel())
    out[:, n_prefix:t - num_registers, idx] = 0
    return out


class _Always:
    """Gate of a stand-alone attachment: always on."""

    def __call__(self) -> bool:
        return True


class _CallGate:
    """Gate of the modifier: on inside a wrapped call once its tower pre-hook has run."""

    def __init__(self, slot: ContextSlot, key: str) -> None:
        self.slot, self.key = slot, key

    def __call__(self) -> bool:
        ctx = self.slot.ctx
        return ctx is not None and bool(ctx.state.get(self.key))


def _append_zeros(gate, num_registers: int, module: nn.Module, args: tuple, output: torch.Tensor):
    if not gate():
        return None
    zeros = output.new_zeros(output.shape[0], num_registers, output.shape[-1])
    return torch.cat([output, zeros], dim=1)


def _strip(gate, num_registers: int, module: nn.Module, args: tuple, output: Any) -> Any:
    if not gate():
        return None
    if torch.is_tensor(output):  # timm's final norm
        return output[:, :output.shape[1] - num_registers]
    return strip_registers(num_registers, module, args, output)


def _edit_hook(gate, neurons: list[int], n_prefix: int, num_registers: int, scale: float, per_neuron_max: bool,
               module: nn.Module, args: tuple):
    if not gate():
        return None
    return (edit_activations(args[0], neurons, n_prefix, num_registers, scale, per_neuron_max), *args[1:])


def _register_hooks(handle: HookHandle, tower: TowerAdapter, layers: Mapping[int, list[int]], num_registers: int,
                    scale: float, per_neuron_max: bool, gate) -> None:
    if num_registers < 1:
        raise ValueError(f"num_registers must be >= 1, got {num_registers}")
    if tower.family == "timm":
        append_at, strip_at = tower.vit.patch_drop, tower.final_norm  # after _pos_embed, before norm_pre / at the end
    else:
        append_at, strip_at = tower.embeddings, tower.vit
    n_prefix = tower.spec.num_prefix_tokens
    handle.forward_hook(append_at, functools.partial(_append_zeros, gate, num_registers))
    for b, neurons in sorted(layers.items()):
        _, _, fc2 = tower.mlp(b)
        handle.forward_pre_hook(fc2, functools.partial(_edit_hook, gate, list(neurons), n_prefix, num_registers,
                                                       float(scale), bool(per_neuron_max)))
    handle.forward_hook(strip_at, functools.partial(_strip, gate, num_registers))


def attach_test_time_registers(vit: nn.Module, neurons: RegisterNeurons | Mapping[int, Sequence[int]],
                               num_registers: int = 1, scale: float = 1.0,
                               per_neuron_max: bool = False) -> HookHandle:
    """Give a ViT instance test-time registers (hooks, until the returned handle is removed).

    Args:
        vit: a supported ViT (timm, HF DINOv2 / CLIP) with plain MLPs.
        neurons: a `RegisterNeurons` (e.g. `find_register_neurons`, `RegisterNeurons.load`) or `{block: [neuron]}`.
        num_registers: zero tokens appended (the authors use 1).
        scale: multiplier of the register value.
        per_neuron_max: one `sign_max` per neuron instead of one per block (a reading of the paper; the code uses
            one per block).

    Returns:
        The `HookHandle`; the outputs keep the usual layout (registers stripped at the end of the tower).
    """
    tower = get_tower(vit)
    found = neurons if isinstance(neurons, RegisterNeurons) else RegisterNeurons(
        layers={int(b): list(n) for b, n in neurons.items()})
    layers = found.check(tower)
    return attach_guarded("registers.test_time", lambda handle: _register_hooks(
        handle, tower, layers, num_registers, scale, per_neuron_max, _Always()))


# ----------------------------------------------------------------------------------------------------- modifier


@dataclass(frozen=True)
class TestTimeRegistersConfig(MethodConfig):
    """Config of `test_time_registers`.

    Attributes:
        neurons: the register-neuron JSON file written by `vlm-tools registers find-neurons` for this model's tower.
        num_registers: extra zero tokens (the authors use 1).
        scale: multiplier of the register value.
        per_neuron_max: one `sign_max` per neuron instead of one per block.
    """

    neurons: str
    num_registers: int = 1
    scale: float = 1.0
    per_neuron_max: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.neurons, (str, Path)):
            raise TypeError(f"neurons must be the path of a register-neuron JSON file, got {type(self.neurons)}")
        if not Path(self.neurons).is_file():
            raise FileNotFoundError(f"test_time_registers: register-neuron file not found: {self.neurons}")
        if isinstance(self.num_registers, bool) or not isinstance(self.num_registers, int) or self.num_registers < 1:
            raise ValueError(f"num_registers must be an int >= 1, got {self.num_registers!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"neurons": str(self.neurons), "num_registers": self.num_registers, "scale": self.scale,
                "per_neuron_max": self.per_neuron_max}


def _tower_pre_hook(slot: ContextSlot, key: str, owner: object, num_registers: int, module: nn.Module,
                    args: tuple) -> None:
    ctx = slot.ctx
    if ctx is None or ctx.plan is None:
        return
    if ctx.plan.n_suffix and ctx.state.get(key) is not owner:
        raise RuntimeError(f"test_time_registers cannot be stacked with another modifier that appends tokens "
                           f"({ctx.plan.n_suffix} appended already)")
    ctx.plan.n_suffix = num_registers  # pruning hooks inside the tower skip the registers
    ctx.state[key] = owner


@register_method("test_time_registers", kind="modifier", config=TestTimeRegistersConfig,
                 description="Test-time registers (Jiang et al. 2025): training-free, register neurons moved onto an "
                             "extra token (stack with a pruner)")
class TestTimeRegistersModifier(Modifier):
    """Applies test-time registers to the LLaVA vision tower during wrapped calls."""

    appends_tokens = True

    def check(self, adapter: ModelAdapter) -> None:
        RegisterNeurons.load(self.config.neurons).check(get_tower(adapter.vision_tower), str(self.config.neurons))

    def attach(self, model: nn.Module, adapter: ModelAdapter, slot: ContextSlot) -> HookHandle:
        tower = get_tower(adapter.vision_tower)
        layers = RegisterNeurons.load(self.config.neurons).check(tower, str(self.config.neurons))
        key, cfg = self.name, self.config
        owner = object()  # identifies this attachment in ctx.state

        def register(handle: HookHandle) -> None:
            handle.forward_pre_hook(tower.vit, functools.partial(_tower_pre_hook, slot, key, owner,
                                                                 cfg.num_registers))
            _register_hooks(handle, tower, layers, cfg.num_registers, cfg.scale, cfg.per_neuron_max,
                            _CallGate(slot, key))

        return attach_guarded(self.name, register)

    @classmethod
    def example_config(cls, model: nn.Module, workdir: str | None = None) -> dict[str, Any]:
        """Find register neurons of `model`'s tower on two random images (per-image ratio rule) and point at them."""
        import tempfile

        from vlm_tools.core.adapters import get_adapter

        tower = get_adapter(model).vision_tower
        spec = get_tower(tower).spec
        side = spec.image_size
        images = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(0))
        found = find_register_neurons(tower, images, rule="ratio", k=1.0, top_k=4)
        out = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="vlm_tools_ttr_"))
        path = found.save(out / "register_neurons.json")
        return {"neurons": str(path)}
