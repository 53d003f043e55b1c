"""The register student: a copy of a ViT plus N register tokens, with only a few parameter groups unlocked.

Two ways to add the registers, both without touching any library class:

* ``native`` (timm ``VisionTransformer``): the copy is given timm's own register mechanism, exactly as
  ``timm.create_model(..., reg_tokens=N)`` builds it: a ``reg_token`` parameter after the CLS token,
  ``num_prefix_tokens`` and ``num_reg_tokens`` increased, and (for models whose position embedding covers the prefix
  tokens) zero position rows for the new registers. timm's own forward then inserts and (via ``num_prefix_tokens``)
  skips them.
* ``hook`` (HF ``Dinov2Model``, ``CLIPVisionModel``): a forward hook on the instance's ``embeddings`` module appends the
  registers at the END of the sequence (after pos-emb, before any pre-norm), and a forward hook on the model strips
  them from ``last_hidden_state``, every ``hidden_states`` entry and any ``attentions``, so downstream code sees the
  original token layout (CLS at 0, patches at ``1:``). The hooks are marked `vlm_tools.core.hooks` hooks held by a
  :class:`RegisterHooks` handle (a `HookHandle`) with an idempotent ``remove()``.

Unlocked groups (``StudentConfig.unlock``): ``registers``, ``pos_embed``, ``patch_embed`` and ``last_block`` (the
``unlock_last_blocks`` blocks ending at the distillation target block). Everything else is frozen.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlm_tools.core.adapters import TowerSpec, get_tower
from vlm_tools.core.hooks import HookHandle
from vlm_tools.core.io import replace_dir_atomic, write_bytes_atomic, write_json_atomic

from .backbones import unlock_param_names
from .clip_recipe import RECIPES, attach_value_readout, check_clip_tower, dense_projection

__all__ = [
    "DEFAULT_UNLOCK",
    "STUDENT_CONFIG",
    "STUDENT_WEIGHTS",
    "UNLOCK_GROUPS",
    "RegisterHooks",
    "RegisterStudent",
    "StudentConfig",
    "StudentFormatError",
    "attach_registers",
    "build_student",
    "export_config",
    "load_student",
    "read_student_export",
    "save_student",
    "strip_registers",
    "vit_of",
]

UNLOCK_GROUPS = ("registers", "pos_embed", "patch_embed", "last_block")
DEFAULT_UNLOCK = UNLOCK_GROUPS
STUDENT_WEIGHTS = "student.safetensors"
STUDENT_CONFIG = "student_config.json"
_FORMAT = "vlm_tools.registers.student/1"


class StudentFormatError(ValueError):
    """An exported student cannot be read or does not fit the base model."""


@dataclass(frozen=True)
class StudentConfig:
    """How the student is built.

    Attributes:
        num_registers: Register tokens to add (PH-Reg uses 16).
        unlock: Trainable groups, a subset of :data:`UNLOCK_GROUPS`.
        unlock_last_blocks: How many blocks the ``last_block`` group unlocks, ending at the target block.
        target_block: Block whose output is distilled (``None``: the final normalised output, as in PH-Reg).
        init_seed: Seed of the register initialisation.
        init_std: Std of the register initialisation (``None``: ``1/sqrt(D)``, PH-Reg's ``randn/sqrt(D)``).
        recipe: ``"plain"`` (the tower as it is) or ``"clip"`` (PH-Reg's CLIP recipe, `.clip_recipe`: the last
            block keeps only its value path, and dense features get the tower's projection; final output only).
    """

    num_registers: int = 16
    unlock: tuple[str, ...] = DEFAULT_UNLOCK
    unlock_last_blocks: int = 1
    target_block: int | None = None
    init_seed: int = 0
    init_std: float | None = None
    recipe: str = "plain"

    def __post_init__(self) -> None:
        for name in ("num_registers", "unlock_last_blocks", "init_seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {value!r}")
        if self.target_block is not None and (isinstance(self.target_block, bool)
                                              or not isinstance(self.target_block, int)):
            raise TypeError(f"target_block must be an int or None, got {self.target_block!r}")
        if self.init_std is not None and (isinstance(self.init_std, bool)
                                          or not isinstance(self.init_std, (int, float))):
            raise TypeError(f"init_std must be a number or None, got {self.init_std!r}")
        if self.num_registers < 1:
            raise ValueError(f"num_registers must be >= 1, got {self.num_registers}")
        object.__setattr__(self, "unlock", tuple(self.unlock))
        bad = [g for g in self.unlock if g not in UNLOCK_GROUPS]
        if bad:
            raise ValueError(f"unknown unlock group(s) {bad}; choose from {list(UNLOCK_GROUPS)}")
        if self.unlock_last_blocks < 0:
            raise ValueError(f"unlock_last_blocks must be >= 0, got {self.unlock_last_blocks}")
        if self.init_std is not None and self.init_std <= 0:
            raise ValueError(f"init_std must be positive, got {self.init_std}")
        if self.recipe not in RECIPES:
            raise ValueError(f"unknown recipe {self.recipe!r}; choose from {list(RECIPES)}")
        if self.recipe == "clip" and self.target_block is not None:
            raise ValueError("the CLIP recipe distils the final output; target_block must be None")

    def to_json(self) -> dict:
        """JSON-serialisable form."""
        d = asdict(self)
        d["unlock"] = list(self.unlock)
        return d

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> StudentConfig:
        """Inverse of :meth:`to_json` (unknown keys raise)."""
        known = {f for f in cls.__dataclass_fields__}
        extra = set(data) - known
        if extra:
            raise ValueError(f"unknown StudentConfig field(s): {sorted(extra)}")
        return cls(**{k: (tuple(v) if k == "unlock" else v) for k, v in data.items()})


class RegisterHooks(HookHandle):
    """The `HookHandle` of the register hooks on one model instance (marked hooks; `remove()` is idempotent).

    Usable as a context manager (removes on exit).
    """

    @property
    def active(self) -> bool:
        """Whether the hooks are still attached."""
        return not self.removed and any(True for _ in self)


def _append_registers(registers: nn.Parameter, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    reg = registers.to(device=output.device, dtype=output.dtype).expand(output.shape[0], -1, -1)
    return torch.cat([output, reg], dim=1)


def _strip_tensor(t: Any, n: int, seq_len: int) -> Any:
    if not torch.is_tensor(t):
        return t
    if t.ndim == 3 and t.shape[1] == seq_len:
        return t[:, : seq_len - n]
    if t.ndim == 4 and t.shape[-1] == seq_len and t.shape[-2] == seq_len:
        return t[..., : seq_len - n, : seq_len - n]
    return t


def _strip_any(value: Any, n: int, seq_len: int) -> Any:
    if isinstance(value, (tuple, list)):
        return type(value)(_strip_tensor(v, n, seq_len) for v in value)
    return _strip_tensor(value, n, seq_len)


def strip_registers(num_registers: int, module: nn.Module, args: tuple, output: Any) -> Any:
    """Forward-hook body: drop the last ``num_registers`` tokens from an HF vision model's outputs.

    Handles ``ModelOutput`` (``last_hidden_state``, every ``hidden_states`` entry, ``attentions`` rows and columns;
    ``None`` entries stay ``None``) and the tuple returned with ``return_dict=False``.
    """
    if isinstance(output, Mapping):  # transformers ModelOutput
        last = output.get("last_hidden_state")
        if last is None:
            return output
        seq_len = last.shape[1]
        for key in ("last_hidden_state", "hidden_states", "attentions"):
            if output.get(key) is not None:
                output[key] = _strip_any(output[key], num_registers, seq_len)
        return output
    if isinstance(output, tuple) and output and torch.is_tensor(output[0]):  # return_dict=False
        seq_len = output[0].shape[1]
        return tuple(_strip_any(v, num_registers, seq_len) for v in output)
    return output


def attach_registers(vit: nn.Module, registers: nn.Parameter) -> RegisterHooks:
    """Add register tokens to an HF ViT instance by hooks (registers at the END of the sequence).

    Args:
        vit: An HF ``Dinov2Model`` or ``CLIPVisionModel`` instance.
        registers: ``(1, N, D)`` register tokens (the caller owns the parameter).

    Returns:
        The hook handle; its ``remove()`` restores the instance exactly.

    Raises:
        TypeError: For timm models (use :func:`build_student`, which uses timm's native registers) or other models.
        ValueError: If the register width does not match the model.
    """
    tower = get_tower(vit)
    spec = tower.spec
    if spec.family == "timm":
        raise TypeError("timm VisionTransformer takes native registers; use build_student()")
    if registers.ndim != 3 or registers.shape[0] != 1 or registers.shape[2] != spec.embed_dim:
        raise ValueError(f"registers must have shape (1, N, {spec.embed_dim}), got {tuple(registers.shape)}")
    handle = RegisterHooks("registers.student")
    try:
        handle.forward_hook(tower.embeddings, functools.partial(_append_registers, registers))
        handle.forward_hook(vit, functools.partial(strip_registers, int(registers.shape[1])))
    except BaseException:
        handle.remove()
        raise
    return handle


def _add_native_registers(vit: nn.Module, init: torch.Tensor) -> None:
    """Give a (private copy of a) timm VisionTransformer ``init.shape[1]`` more native register tokens."""
    from timm.layers import PatchDropout

    n = init.shape[1]
    old_prefix = int(vit.num_prefix_tokens)
    old = vit.reg_token
    reg = init if old is None else torch.cat([old.detach(), init], dim=1)
    vit.reg_token = nn.Parameter(reg)
    vit.num_reg_tokens = int(getattr(vit, "num_reg_tokens", 0)) + n
    vit.num_prefix_tokens = old_prefix + n
    if vit.pos_embed is not None and not vit.no_embed_class:
        pe = vit.pos_embed.detach()
        zeros = torch.zeros(1, n, pe.shape[-1], dtype=pe.dtype, device=pe.device)
        vit.pos_embed = nn.Parameter(torch.cat([pe[:, :old_prefix], zeros, pe[:, old_prefix:]], dim=1))
    if isinstance(vit.patch_drop, PatchDropout):
        vit.patch_drop.num_prefix_tokens = vit.num_prefix_tokens


class RegisterStudent(nn.Module):
    """A ViT copy with registers; ``forward`` returns the patch tokens at the target block.

    Build it with :func:`build_student` or :func:`load_student`.

    Attributes:
        vit: The ViT (timm with native registers, or HF with register hooks attached).
        config: The :class:`StudentConfig`.
        mode: ``"native"`` or ``"hook"``.
        base_spec: the `TowerSpec` of the base model (before registers).
        registers: The register parameter in hook mode (``None`` in native mode: see :meth:`get_registers`).
    """

    def __init__(self, vit: nn.Module, config: StudentConfig, base_spec: TowerSpec, mode: str,
                 registers: nn.Parameter | None, hooks: RegisterHooks | None) -> None:
        super().__init__()
        self.vit = vit
        self.config = config
        self.base_spec = base_spec
        self.mode = mode
        self.registers = registers
        self._hooks = hooks
        self.tower = get_tower(vit)
        self._unlocked = unlock_param_names(vit, config.unlock, config.unlock_last_blocks, config.target_block)

    @property
    def num_registers(self) -> int:
        """Registers added by this student (timm base registers not counted)."""
        return self.config.num_registers

    def get_registers(self) -> nn.Parameter:
        """The register parameter (timm: the whole ``reg_token``, including any the base model had)."""
        return self.vit.reg_token if self.mode == "native" else self.registers

    def trainable_named_parameters(self) -> dict[str, nn.Parameter]:
        """The unlocked parameters, keyed ``"registers"`` and by their name in the base ViT, in a fixed order."""
        out: dict[str, nn.Parameter] = {}
        if "registers" in self.config.unlock:
            out["registers"] = self.get_registers()
        params = dict(self.vit.named_parameters())
        for name in self._unlocked:
            out[name] = params[name]
        return out

    def exported_named_parameters(self) -> dict[str, nn.Parameter]:
        """What an export holds: the registers (always) and the unlocked parameters."""
        out = {"registers": self.get_registers()}
        out.update(self.trainable_named_parameters())
        return out

    def freeze_for_training(self) -> list[nn.Parameter]:
        """Set ``requires_grad`` on the unlocked parameters only; return them in a fixed order."""
        for p in self.vit.parameters():
            p.requires_grad_(False)
        if self.registers is not None:
            self.registers.requires_grad_(False)
        trainable = list(self.trainable_named_parameters().values())
        for p in trainable:
            p.requires_grad_(True)
        return trainable

    def forward(self, pixel_values: torch.Tensor, block: int | None = None) -> torch.Tensor:
        """Patch tokens ``(B, grid_h * grid_w, D)`` of the student, registers removed.

        Args:
            pixel_values: ``(B, 3, H, W)`` normalised images.
            block: Override of ``config.target_block`` (``None`` uses the config; the final output when that is
                ``None`` too).
        """
        target = self.config.target_block if block is None else block
        tokens = self.tower.patch_tokens(pixel_values, target)
        proj = dense_projection(self.vit) if self.config.recipe == "clip" and target is None else None
        return tokens if proj is None else proj(tokens)

    def remove_hooks(self) -> None:
        """Detach the student's hooks (registers in hook mode, the CLIP recipe's value readout; idempotent). The
        student then behaves like the plain copy."""
        if self._hooks is not None:
            self._hooks.remove()

    @property
    def hooks_active(self) -> bool:
        """Whether the student's hooks are attached (native mode has some only with the CLIP recipe)."""
        return self._hooks is not None and self._hooks.active


def vit_of(model: nn.Module) -> nn.Module:
    """The ViT of a `RegisterStudent` (registers attached), or `model` itself for a plain ViT."""
    return model.vit if isinstance(model, RegisterStudent) else model


def _init_registers(n: int, dim: int, config: StudentConfig, like: torch.Tensor) -> torch.Tensor:
    gen = torch.Generator().manual_seed(int(config.init_seed))
    std = config.init_std if config.init_std is not None else 1.0 / math.sqrt(dim)
    return (torch.randn(1, n, dim, generator=gen) * std).to(device=like.device, dtype=like.dtype)


def build_student(teacher: nn.Module, config: StudentConfig | None = None) -> RegisterStudent:
    """Build a register student from a (frozen) teacher ViT; the teacher instance is not modified.

    Args:
        teacher: A supported ViT (`vlm_tools.core.adapters.SUPPORTED_TOWER_FAMILIES`).
        config: Student settings (defaults: 16 registers, PH-Reg's unlocked groups).

    Returns:
        The student (a deep copy of the teacher plus registers), with only the unlocked parameters requiring grad.
    """
    config = config or StudentConfig()
    base_tower = get_tower(teacher)
    base_spec = base_tower.spec
    if config.target_block is not None:
        base_tower.resolve_block(config.target_block)
    if config.recipe == "clip":
        check_clip_tower(teacher)
    vit = copy.deepcopy(teacher)
    ref = next(vit.parameters())
    init = _init_registers(config.num_registers, base_spec.embed_dim, config, ref)
    if base_spec.family == "timm":
        _add_native_registers(vit, init)
        mode, registers, hooks = "native", None, None
    else:
        registers = nn.Parameter(init)
        mode, hooks = "hook", attach_registers(vit, registers)
    if config.recipe == "clip":
        hooks = hooks or RegisterHooks("registers.student")
        attach_value_readout(vit, hooks)
    student = RegisterStudent(vit, config, base_spec, mode, registers, hooks)
    student.freeze_for_training()
    return student


def save_student(student: RegisterStudent, out_dir: str | os.PathLike, extra: Mapping[str, Any] | None = None) -> Path:
    """Export the student: ``student.safetensors`` (registers + unlocked parameters) and ``student_config.json``.

    The folder is written as a set (`vlm_tools.core.io.replace_dir_atomic`): both files go to a temporary sibling
    that then replaces ``out_dir``, so a failure leaves the previous export (or none) intact, never a weights file
    beside a config of another student.

    Args:
        student: The student.
        out_dir: Directory to write (replaced as a whole if it exists; its parent is created if needed).
        extra: Extra JSON-serialisable metadata stored under ``"extra"`` (e.g. training settings).

    Returns:
        The directory.
    """
    from safetensors.torch import save

    out = Path(out_dir)
    if out.exists():
        other = sorted(p.name for p in out.iterdir()) if out.is_dir() else [out.name]
        other = [n for n in other if n not in (STUDENT_WEIGHTS, STUDENT_CONFIG)]
        if other or not out.is_dir():
            raise FileExistsError(f"{out} holds other files than a student export ({other[:3]}); an export replaces "
                                  "its folder as a whole, so give a new or an export folder")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in student.exported_named_parameters().items()}
    meta = {
        "format": _FORMAT,
        "mode": student.mode,
        "register_position": "after_cls" if student.mode == "native" else "end",
        "recipe": student.config.recipe,
        "student": student.config.to_json(),
        "base": student.base_spec.to_json(),
        "base_class": f"{type(student.vit).__module__}.{type(student.vit).__name__}",
        "tensors": {k: list(v.shape) for k, v in tensors.items()},
        "extra": dict(extra or {}),
    }
    weights = save(tensors)

    def fill(folder: Path) -> None:
        write_bytes_atomic(folder / STUDENT_WEIGHTS, weights)
        write_json_atomic(folder / STUDENT_CONFIG, meta, indent=2)

    return replace_dir_atomic(out, fill)


def read_student_export(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read an export directory (or its ``student_config.json``/``student.safetensors``) without a base model.

    Returns:
        The JSON metadata and the tensors.

    Raises:
        StudentFormatError: Naming the file that is missing, unreadable or of the wrong format.
    """
    from safetensors.torch import load_file

    p = Path(path)
    folder = p.parent if p.is_file() else p
    cfg_path, w_path = folder / STUDENT_CONFIG, folder / STUDENT_WEIGHTS
    for f in (cfg_path, w_path):
        if not f.is_file():
            raise StudentFormatError(f"student export file not found: {f}")
    try:
        meta = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise StudentFormatError(f"cannot read student config {cfg_path}: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
        raise StudentFormatError(f"{cfg_path} is not a {_FORMAT} file")
    try:
        tensors = load_file(str(w_path))
    except Exception as e:  # safetensors raises its own error types
        raise StudentFormatError(f"cannot read student weights {w_path}: {e}") from e
    return meta, tensors


def export_config(meta: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], folder: str | os.PathLike,
                  spec: TowerSpec) -> StudentConfig:
    """The `StudentConfig` of an export, checked against its weights and the base model before anything is built.

    The register count of the config must be the number of register rows in the weights (a crafted
    ``num_registers: 2**40`` fails here instead of allocating), the register width the base model's, and every
    tensor the shape the config file declares.

    Raises:
        StudentFormatError: naming the file and the entry.
    """
    folder = Path(folder)
    cfg_file, w_file = folder / STUDENT_CONFIG, folder / STUDENT_WEIGHTS
    raw = meta.get("student")
    if not isinstance(raw, Mapping):
        raise StudentFormatError(f"{cfg_file}: entry 'student' must be an object of StudentConfig fields")
    try:
        config = StudentConfig.from_json(raw)
    except (TypeError, ValueError) as e:
        raise StudentFormatError(f"{cfg_file}: entry 'student': {e}") from e
    regs = tensors.get("registers")
    if regs is None or regs.ndim != 3 or regs.shape[0] != 1 or regs.shape[2] != spec.embed_dim:
        raise StudentFormatError(f"{w_file}: entry 'registers' must have shape (1, N, {spec.embed_dim}), got "
                                 f"{None if regs is None else tuple(regs.shape)}")
    native = meta.get("mode") == "native"
    expected = config.num_registers + (spec.num_native_registers if native else 0)
    if regs.shape[1] != expected:
        raise StudentFormatError(f"{cfg_file}: entry 'student.num_registers' is {config.num_registers} but {w_file} "
                                 f"holds {regs.shape[1]} register rows"
                                 + (f" ({spec.num_native_registers} of them the base model's)" if native else ""))
    declared = meta.get("tensors", {})
    if not isinstance(declared, Mapping):
        raise StudentFormatError(f"{cfg_file}: entry 'tensors' must map tensor names to shapes")
    for name, t in tensors.items():
        if name in declared and list(declared[name]) != list(t.shape):
            raise StudentFormatError(f"{cfg_file}: entry 'tensors.{name}' declares shape {declared[name]}, {w_file} "
                                     f"holds {list(t.shape)}")
    return config


def load_student(path: str | os.PathLike, base_model: nn.Module) -> RegisterStudent:
    """Load an exported student onto a copy of ``base_model`` (the model the student was distilled from).

    Args:
        path: Export directory written by :func:`save_student` (or the distillation job's ``student/`` folder).
        base_model: The base ViT; it is not modified.

    Returns:
        The student in eval mode.

    Raises:
        StudentFormatError: If the export is unreadable or does not fit ``base_model`` (names the file).
    """
    meta, tensors = read_student_export(path)
    folder = Path(path) if Path(path).is_dir() else Path(path).parent
    spec = get_tower(base_model).spec
    base = meta.get("base", {})
    for key in ("family", "embed_dim", "depth", "patch_size", "num_prefix_tokens"):
        if base.get(key) != getattr(spec, key):
            raise StudentFormatError(f"{folder / STUDENT_CONFIG}: base model mismatch on {key!r} "
                                     f"(export {base.get(key)!r}, given model {getattr(spec, key)!r})")
    config = export_config(meta, tensors, folder, spec)  # checked against the weights before anything is built
    student = build_student(base_model, config)
    params = student.exported_named_parameters()
    missing = sorted(set(params) - set(tensors))
    unexpected = sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise StudentFormatError(f"{folder / STUDENT_WEIGHTS}: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        for name, p in params.items():
            t = tensors[name]
            if tuple(t.shape) != tuple(p.shape):
                raise StudentFormatError(f"{folder / STUDENT_WEIGHTS}: {name} has shape {tuple(t.shape)}, "
                                         f"expected {tuple(p.shape)}")
            p.copy_(t.to(dtype=p.dtype, device=p.device))
    return student.eval()
