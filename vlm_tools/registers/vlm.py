"""``registers``: run a LLaVA vision tower with distilled registers and weights (a stackable modifier).

``vlm_tools.wrap(llava, "registers", student=PATH)`` loads an export written by ``vlm-tools registers distill`` (or
:func:`vlm_tools.registers.save_student`) whose base model is the LLaVA vision tower (HF ``CLIPVisionModel`` or
``Dinov2Model`` with the same shapes). Stack it with one pruning method:
``vlm_tools.wrap(llava, [("registers", {"student": PATH}), ("cls_topk", {"keep": 64})])``.

During a wrapped call, and only then:

* a forward pre-hook on the tower swaps the distilled parameters (position embedding, patch embedding, unlocked
  blocks) into the tower instance and sets ``ctx.plan.n_suffix`` to the register count, so pruning hooks inside the
  tower skip the registers;
* a forward hook on the tower's ``embeddings`` appends the registers at the END of the sequence (CLS and patch
  indices stay put);
* a forward hook on the tower strips the registers from ``last_hidden_state`` and every ``hidden_states`` entry, then
  puts the original parameter objects back. It is registered with ``always_call=True``: torch runs it also when the
  tower (or a hook inside it) raises, so the base parameters are back before the exception leaves the tower and
  ``state_dict()`` / ``save_pretrained()`` of the still-wrapped model never see the student's tensors.

Wrapping warns when the export was distilled at another block than the one the LLaVA reads (its
``vision_feature_layer``; distil with ``--target-block <feature block>``), and refuses exports of PH-Reg's CLIP
recipe (a value-only last block read after the final norm, which a LLaVA never reads).

Outside wrapped calls (``WrappedModel.disabled()``, direct calls to the base model) the tower is untouched (the
pre-hook restores the base parameters if anything was left swapped), and the handle's ``remove()`` restores them in
any case.
"""

from __future__ import annotations

import functools
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlm_tools._registry import register_method
from vlm_tools.core.adapters import ModelAdapter, get_tower
from vlm_tools.core.config import MethodConfig
from vlm_tools.core.hooks import HookHandle, attach_guarded
from vlm_tools.core.method import ContextSlot, Modifier

from .student import (
    STUDENT_CONFIG,
    STUDENT_WEIGHTS,
    StudentConfig,
    StudentFormatError,
    build_student,
    export_config,
    read_student_export,
    save_student,
    strip_registers,
)

__all__ = ["RegistersConfig", "RegistersModifier"]

_ACTIVE = "registers_active"
_OWNER = "registers_owner"  # the modifier instance that appends tokens in this call


@dataclass(frozen=True)
class RegistersConfig(MethodConfig):
    """Config of ``registers``.

    Attributes:
        student: Folder of a student export (``student_config.json`` + ``student.safetensors``) distilled from this
            model's vision tower.
    """

    student: str

    def __post_init__(self) -> None:
        if not isinstance(self.student, (str, Path)):
            raise TypeError(f"student must be a path to an export folder, got {type(self.student).__name__}")
        cfg = Path(self.student) / STUDENT_CONFIG
        if not cfg.is_file():
            raise FileNotFoundError(f"registers: student export not found: {cfg}")

    def to_dict(self) -> dict[str, Any]:
        return {"student": str(self.student)}


class _ParamSwap:
    """Replacement parameter objects for a tower instance; ``apply``/``restore`` are idempotent and exact.

    The tower's parameters are shared by every thread calling the model, so a tower call holds ``lock`` from its
    pre-hook to its (always-called) forward hook: concurrent calls, wrapped or plain, run the tower one at a time,
    each with its own parameters.
    """

    def __init__(self, items: list[tuple[nn.Module, str, nn.Parameter, nn.Parameter]]) -> None:
        self.items = items
        self.applied = False
        self.lock = threading.Lock()
        self._held = threading.local()

    def __getstate__(self) -> dict:  # copies (deepcopy / pickle of a model carrying the hooks) get a fresh lock
        state = dict(self.__dict__)
        del state["lock"], state["_held"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.lock = threading.Lock()
        self._held = threading.local()

    def enter(self) -> None:
        """Take the tower for this thread's call (released by `leave`)."""
        self.lock.acquire()
        self._held.value = True

    def leave(self) -> None:
        """Restore the original parameters and release the tower (no-op if this thread does not hold it)."""
        if getattr(self._held, "value", False):
            self._held.value = False
            try:
                self.restore()
            finally:
                self.lock.release()

    def apply(self) -> None:
        if not self.applied:
            for module, name, _, new in self.items:
                setattr(module, name, new)
            self.applied = True

    def restore(self) -> None:
        if self.applied:
            for module, name, orig, _ in reversed(self.items):
                setattr(module, name, orig)
            self.applied = False


def _tower_pre_hook(module: nn.Module, args: tuple, slot: ContextSlot, swap: _ParamSwap, num_registers: int) -> None:
    ctx = slot.ctx
    if ctx is not None and ctx.plan is not None and ctx.plan.n_suffix and ctx.state.get(_OWNER) != id(swap):
        raise RuntimeError(f"registers cannot be stacked with another modifier that appends tokens "
                           f"({ctx.plan.n_suffix} appended already)")
    swap.enter()
    if ctx is None or ctx.plan is None:  # not a wrapped call: the base tower, as is
        swap.restore()
        return
    ctx.state[_OWNER] = id(swap)
    swap.apply()
    ctx.plan.n_suffix = num_registers
    ctx.state[_ACTIVE] = True


def _embeddings_hook(module: nn.Module, args: tuple, output: torch.Tensor, slot: ContextSlot,
                     registers: torch.Tensor) -> torch.Tensor | None:
    ctx = slot.ctx
    if ctx is None or not ctx.state.get(_ACTIVE):
        return None
    reg = registers.to(device=output.device, dtype=output.dtype).expand(output.shape[0], -1, -1)
    return torch.cat([output, reg], dim=1)


def _tower_hook(module: nn.Module, args: tuple, output: Any, slot: ContextSlot, swap: _ParamSwap,
                num_registers: int) -> Any:
    ctx = slot.ctx
    swap.leave()
    if ctx is None or not ctx.state.pop(_ACTIVE, False):
        return None
    return strip_registers(num_registers, module, args, output)


def _restore(swap: _ParamSwap) -> None:
    swap.restore()


_TOWER_FAMILY = {"dinov2": "hf_dinov2", "clip_vision_model": "hf_clip"}


@register_method("registers", kind="modifier", config=RegistersConfig,
                 description="PH-Reg: run the vision tower with distilled registers and weights (stack with a pruner)")
class RegistersModifier(Modifier):
    """Applies a distilled register student to the LLaVA vision tower during wrapped calls."""

    appends_tokens = True

    def __init__(self, config: RegistersConfig) -> None:
        super().__init__(config)
        self._export: tuple[dict, dict[str, torch.Tensor]] | None = None

    def _load(self) -> tuple[dict, dict[str, torch.Tensor]]:
        if self._export is None:
            self._export = read_student_export(self.config.student)
        return self._export

    def check(self, adapter: ModelAdapter) -> None:
        """Raise `StudentFormatError` if the export does not fit the tower; warn if it was distilled at another block
        than the one the LLaVA reads (its features there were not trained)."""
        config = self._validate(adapter)
        distilled = None if config.target_block is None else get_tower(adapter.vision_tower).resolve_block(
            config.target_block)
        if distilled != adapter.feature_block:
            where = "the final normalised output" if distilled is None else f"block {distilled}"
            warnings.warn(f"registers: {self.config.student} was distilled at {where}, but this model reads vision "
                          f"block {adapter.feature_block} (vision_feature_layer={adapter.feature_layer}); the "
                          f"student was not trained for that block. Distil with --target-block "
                          f"{adapter.feature_block} for this model.", UserWarning, stacklevel=3)

    def _validate(self, adapter: ModelAdapter) -> StudentConfig:
        meta, tensors = self._load()
        folder = Path(self.config.student)
        tower = adapter.vision_tower
        fam = _TOWER_FAMILY.get(adapter.tower_type)
        spec = get_tower(tower).spec
        if meta.get("mode") != "hook" or meta.get("base", {}).get("family") != fam:
            raise StudentFormatError(f"{folder / STUDENT_CONFIG}: a {meta.get('base', {}).get('family')} "
                                     f"({meta.get('mode')}) student does not fit this {adapter.tower_type} tower")
        base = meta["base"]
        for key in ("embed_dim", "depth", "patch_size"):
            if base.get(key) != getattr(spec, key):
                raise StudentFormatError(f"{folder / STUDENT_CONFIG}: {key}={base.get(key)} but the tower has "
                                         f"{getattr(spec, key)}")
        config = export_config(meta, tensors, folder, spec)  # register count and declared shapes vs the weights
        if config.recipe != "plain":
            raise StudentFormatError(
                f"{folder / STUDENT_CONFIG}: distilled with PH-Reg's {config.recipe.upper()} recipe (dense features "
                "read through a value-only last block and the final norm), which a LLaVA never reads; distil with "
                f"--recipe plain --target-block {adapter.feature_block} for use inside this model")
        params = dict(tower.named_parameters())
        for name, t in tensors.items():
            if name == "registers":
                continue
            if name not in params:
                raise StudentFormatError(f"{folder / STUDENT_WEIGHTS}: {name} is not a parameter of the tower")
            if tuple(params[name].shape) != tuple(t.shape):
                raise StudentFormatError(f"{folder / STUDENT_WEIGHTS}: {name} has shape {tuple(t.shape)}, the "
                                         f"tower's is {tuple(params[name].shape)}")
        return config

    def attach(self, model: nn.Module, adapter: ModelAdapter, slot: ContextSlot) -> HookHandle:
        self._validate(adapter)
        _, tensors = self._load()
        tower = adapter.vision_tower
        ref = next(tower.parameters())
        registers = tensors["registers"].to(device=ref.device, dtype=ref.dtype)
        items = []
        for name, t in tensors.items():
            if name == "registers":
                continue
            owner_name, _, attr = name.rpartition(".")
            owner = tower.get_submodule(owner_name)
            orig = getattr(owner, attr)
            new = nn.Parameter(t.to(device=orig.device, dtype=orig.dtype), requires_grad=orig.requires_grad)
            items.append((owner, attr, orig, new))
        swap = _ParamSwap(items)
        n = int(registers.shape[1])
        def register(handle: HookHandle) -> None:
            handle.add(functools.partial(_restore, swap))  # undone last: the original parameters are back
            handle.forward_pre_hook(tower, functools.partial(_tower_pre_hook, slot=slot, swap=swap, num_registers=n))
            handle.forward_hook(tower.embeddings, functools.partial(_embeddings_hook, slot=slot, registers=registers))
            # always_call: also runs when the tower raises, so the swap is undone inside the call that made it
            handle.forward_hook(tower, functools.partial(_tower_hook, slot=slot, swap=swap, num_registers=n),
                                always_call=True)

        handle = attach_guarded(self.name, register)
        return handle

    @classmethod
    def example_config(cls, model: nn.Module, workdir: str | None = None) -> dict[str, Any]:
        """Export an (untrained) 4-register student of ``model``'s vision tower, distilled at its feature block, to
        ``workdir`` and point at it.

        Without ``workdir`` a new temporary folder is used.
        """
        from vlm_tools.core.adapters import get_adapter

        adapter = get_adapter(model)
        tower = adapter.vision_tower
        out = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="vlm_tools_registers_"))
        student = build_student(tower, StudentConfig(num_registers=4, target_block=adapter.feature_block))
        try:
            save_student(student, out / "student")
        finally:
            student.remove_hooks()
        return {"student": str(out / "student")}
