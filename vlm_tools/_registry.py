"""The one place a method is registered: `@register_method("name", kind=..., config=...)` on its `Method` class."""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
from dataclasses import dataclass
from typing import Any

__all__ = ["register_method", "get_method", "list_methods", "MethodInfo", "KINDS"]

#: Where a method acts. "vision": inside the vision tower; "projector": at the projector; "llm": inside the
#: language model; "modifier": changes the vision tower without selecting tokens (stackable with one pruner).
KINDS = ("vision", "projector", "llm", "modifier")

# Packages whose sub-packages hold one method each (`<pkg>/<method>/method.py`), imported on first lookup.
_METHOD_PACKAGES = ("vlm_tools.pruning",)
# Single modules that register methods outside the pruning package.
_METHOD_MODULES = ("vlm_tools.registers.vlm", "vlm_tools.registers.test_time")


@dataclass(frozen=True)
class MethodInfo:
    """A registered method: its name, kind, `Method` class, config dataclass and one-line description."""

    name: str
    kind: str
    cls: Any
    config_cls: Any
    description: str


_METHODS: dict[str, MethodInfo] = {}
_loaded: list[bool] = []


def register_method(name: str, *, kind: str, config: Any, description: str):
    """Class decorator that registers a `Method` subclass under `name` (lower-case, unique)."""
    if name != name.lower() or not name.replace("_", "").isalnum():
        raise ValueError(f"method names are lower-case identifiers, got {name!r}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")

    def deco(cls):
        if name in _METHODS and _METHODS[name].cls is not cls:
            raise ValueError(f"method {name!r} is already registered by {_METHODS[name].cls.__qualname__}")
        cls.name, cls.kind, cls.config_cls = name, kind, config
        _METHODS[name] = MethodInfo(name, kind, cls, config, description)
        return cls

    return deco


def _load_builtin() -> None:
    if _loaded:
        return
    for pkg_name in _METHOD_PACKAGES:
        pkg = importlib.import_module(pkg_name)
        for info in pkgutil.iter_modules(pkg.__path__):
            # a method folder is a sub-package with a `method` module (shared helpers live in plain modules)
            if info.ispkg and importlib.util.find_spec(f"{pkg_name}.{info.name}.method") is not None:
                importlib.import_module(f"{pkg_name}.{info.name}.method")
    for mod in _METHOD_MODULES:
        if importlib.util.find_spec(mod.rpartition(".")[0]) is not None and importlib.util.find_spec(mod):
            importlib.import_module(mod)
    _loaded.append(True)


def get_method(name: str) -> MethodInfo:
    """Look a method up by name; unknown names raise a `KeyError` listing the registered ones."""
    _load_builtin()
    if name not in _METHODS:
        raise KeyError(f"unknown method {name!r}; registered methods: {', '.join(sorted(_METHODS))}")
    return _METHODS[name]


def list_methods(kind: str | None = None) -> list[MethodInfo]:
    """All registered methods (optionally of one kind), sorted by name."""
    _load_builtin()
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return [m for _, m in sorted(_METHODS.items()) if kind is None or m.kind == kind]
