"""The one place a method is registered: `@register_method("name", kind=..., config=...)` on its `Method` class.

Two namespaces share this registry. Methods that `wrap` a model (kinds `KINDS`: pruning methods and modifiers) are
looked up by `get_method`; attribution methods (kind `"explain"`, `vlm_tools.explain`) by `get_explainer`, so an
attribution baseline may share a name with a pruning method (`random`). `list_methods()` lists the wrap methods,
`list_methods("explain")` the attribution methods.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
from dataclasses import dataclass
from typing import Any

__all__ = ["register_method", "register_explainer", "get_method", "get_explainer", "list_methods", "MethodInfo",
           "KINDS", "EXPLAIN"]

#: Where a method acts. "vision": inside the vision tower; "projector": at the projector; "llm": inside the
#: language model; "modifier": changes the vision tower without selecting tokens (stackable with one pruner).
KINDS = ("vision", "projector", "llm", "modifier")
#: The kind of attribution methods (`vlm_tools.explain`), registered with `register_explainer`.
EXPLAIN = "explain"

# Packages whose sub-packages hold one method each (`<pkg>/<method>/method.py`), imported on first lookup.
_METHOD_PACKAGES = ("vlm_tools.pruning",)
# Single modules that register methods outside the pruning package.
_METHOD_MODULES = ("vlm_tools.registers.vlm", "vlm_tools.registers.test_time")
# Packages whose modules each register attribution methods, imported on first lookup.
_EXPLAINER_PACKAGES = ("vlm_tools.interpret.methods",)


@dataclass(frozen=True)
class MethodInfo:
    """A registered method: its name, kind, `Method` class, config dataclass and one-line description."""

    name: str
    kind: str
    cls: Any
    config_cls: Any
    description: str


_METHODS: dict[str, MethodInfo] = {}
_EXPLAINERS: dict[str, MethodInfo] = {}
_loaded: list[bool] = []


def _registrar(table: dict[str, MethodInfo], what: str, name: str, kind: str, config: Any, description: str):
    """The class decorator of both namespaces: check the name, refuse a second class under it, record the method."""
    if name != name.lower() or not name.replace("_", "").isalnum():
        raise ValueError(f"method names are lower-case identifiers, got {name!r}")

    def deco(cls):
        if name in table and table[name].cls is not cls:
            raise ValueError(f"{what} {name!r} is already registered by {table[name].cls.__qualname__}")
        cls.name, cls.kind, cls.config_cls = name, kind, config
        table[name] = MethodInfo(name, kind, cls, config, description)
        return cls

    return deco


def register_method(name: str, *, kind: str, config: Any, description: str):
    """Class decorator that registers a `Method` subclass under `name` (lower-case, unique)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return _registrar(_METHODS, "method", name, kind, config, description)


def register_explainer(name: str, *, config: Any, description: str):
    """Class decorator that registers an attribution method (a `vlm_tools.interpret.base.Explainer` subclass)."""
    return _registrar(_EXPLAINERS, "explain method", name, EXPLAIN, config, description)


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
    for pkg_name in _EXPLAINER_PACKAGES:
        if importlib.util.find_spec(pkg_name) is None:
            continue
        pkg = importlib.import_module(pkg_name)
        for info in pkgutil.iter_modules(pkg.__path__):
            if not info.ispkg and not info.name.startswith("_"):
                importlib.import_module(f"{pkg_name}.{info.name}")
    _loaded.append(True)


def get_method(name: str) -> MethodInfo:
    """Look a method up by name; unknown names raise a `KeyError` listing the registered ones."""
    _load_builtin()
    if name not in _METHODS:
        raise KeyError(f"unknown method {name!r}; registered methods: {', '.join(sorted(_METHODS))}")
    return _METHODS[name]


def get_explainer(name: str) -> MethodInfo:
    """Look an attribution method up by name; unknown names raise a `KeyError` listing the registered ones."""
    _load_builtin()
    if name not in _EXPLAINERS:
        raise KeyError(f"unknown explain method {name!r}; registered explain methods: "
                       f"{', '.join(sorted(_EXPLAINERS)) or '(none)'}")
    return _EXPLAINERS[name]


def list_methods(kind: str | None = None) -> list[MethodInfo]:
    """The registered wrap methods (optionally of one kind), sorted by name; `kind="explain"`: attribution methods."""
    _load_builtin()
    if kind == EXPLAIN:
        return [m for _, m in sorted(_EXPLAINERS.items())]
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {(*KINDS, EXPLAIN)}, got {kind!r}")
    return [m for _, m in sorted(_METHODS.items()) if kind is None or m.kind == kind]
