"""Hook lifecycle: one composite, idempotent handle for everything a method attaches to a model instance.

Every hook vlm_tools registers is a `functools.partial` of a module-level function (no bound methods capturing a
method object, see peft PR #904) and carries the attribute `_vlm_tools_hook = True`, so leftovers can be found
(`find_hooks`) and an already-wrapped model is detected without any global registry.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any

from torch import nn

__all__ = ["HookHandle", "find_hooks", "hook_snapshot", "mark", "attach_guarded", "hook_dicts", "marked_ids",
           "remove_marked_since", "marked_hooks", "remove_marked"]

_MARK = "_vlm_tools_hook"


def mark(fn: Callable) -> Callable:
    """Tag a hook function as owned by vlm_tools (wraps plain functions in a partial so the tag can be set)."""
    if not isinstance(fn, functools.partial):
        fn = functools.partial(fn)
    setattr(fn, _MARK, True)
    return fn


def hook_dicts(module: nn.Module) -> dict[str, dict]:
    """The instance hook dictionaries of a module that matter for the lifecycle contract."""
    return {
        "forward": module._forward_hooks,
        "forward_pre": module._forward_pre_hooks,
        "backward": module._backward_hooks,
        "backward_pre": module._backward_pre_hooks,
    }


def hook_snapshot(model: nn.Module) -> dict[str, dict[str, list[int]]]:
    """Every module's hook ids by kind (vlm_tools' and anyone else's), to compare a model before and after."""
    return {name: {k: list(d.keys()) for k, d in hook_dicts(m).items()} for name, m in model.named_modules()}


def find_hooks(model: nn.Module) -> list[tuple[str, str]]:
    """List `(module name, hook kind)` of every vlm_tools hook still registered anywhere in `model`."""
    found = []
    for name, mod in model.named_modules():
        for kind, hooks in hook_dicts(mod).items():
            found.extend((name, kind) for fn in hooks.values() if getattr(fn, _MARK, False))
    return found


def _marked(model: nn.Module) -> list[tuple[dict, int]]:
    return [(hooks, hid) for _, mod in model.named_modules() for hooks in hook_dicts(mod).values()
            for hid, fn in list(hooks.items()) if getattr(fn, _MARK, False)]


def marked_hooks(model: nn.Module) -> list[Callable]:
    """The vlm_tools hook functions registered anywhere in `model` (partials; their `keywords` hold any `slot`)."""
    return [hooks[hid] for hooks, hid in _marked(model)]


def remove_marked(model: nn.Module, keep: Callable[[Callable], bool] | None = None) -> int:
    """Remove every vlm_tools hook from `model` (those `keep(fn)` accepts stay); returns how many were removed."""
    n = 0
    for hooks, hid in _marked(model):
        if keep is None or not keep(hooks[hid]):
            hooks.pop(hid, None)
            n += 1
    return n


def remove_marked_since(model: nn.Module, before: set[int]) -> int:
    """Safety net for a failed attach: drop vlm_tools hooks registered after `before` (ids); returns how many."""
    n = 0
    for hooks, hid in _marked(model):
        if hid not in before:
            hooks.pop(hid, None)
            n += 1
    return n


def marked_ids(model: nn.Module) -> set[int]:
    """Ids of the vlm_tools hooks currently on `model`."""
    return {hid for _, hid in _marked(model)}


class HookHandle:
    """A composite handle: torch `RemovableHandle`s, restore callbacks and child handles.

    `remove()` undoes everything in reverse order (LIFO) and is idempotent; it runs every undo step even if one
    raises, then re-raises the first error. Use it as a context manager or keep it and call `remove()`.
    """

    def __init__(self, name: str = "") -> None:
        self.name = name
        self._items: list[Any] = []
        self._removed = False

    def __repr__(self) -> str:
        state = "removed" if self._removed else f"{len(self._items)} items"
        return f"HookHandle({self.name!r}, {state})"

    @property
    def removed(self) -> bool:
        return self._removed

    def add(self, item: Any) -> Any:
        """Track a `RemovableHandle`, a `HookHandle` or a zero-argument undo callable; returns it."""
        if self._removed:
            raise RuntimeError(f"{self!r} was already removed; create a new handle")
        if not (hasattr(item, "remove") or callable(item)):
            raise TypeError(f"cannot track {type(item).__name__}: need .remove() or a callable")
        self._items.append(item)
        return item

    def forward_pre_hook(self, module: nn.Module, fn: Callable, *, with_kwargs: bool = False,
                         prepend: bool = False) -> None:
        """Register a marked forward pre-hook on an instance and track it."""
        self.add(module.register_forward_pre_hook(mark(fn), with_kwargs=with_kwargs, prepend=prepend))

    def forward_hook(self, module: nn.Module, fn: Callable, *, with_kwargs: bool = False,
                     prepend: bool = False, always_call: bool = False) -> None:
        """Register a marked forward hook on an instance and track it (`always_call`: also run when the module
        raises, e.g. to undo a change made by a pre-hook inside the same call)."""
        self.add(module.register_forward_hook(mark(fn), with_kwargs=with_kwargs, prepend=prepend,
                                              always_call=always_call))

    def remove(self) -> None:
        """Undo everything (LIFO). Safe to call more than once."""
        if self._removed:
            return
        self._removed = True
        first_error: BaseException | None = None
        while self._items:
            item = self._items.pop()
            try:
                if hasattr(item, "remove"):
                    item.remove()
                else:
                    item()
            except BaseException as exc:  # keep undoing the rest, report the first failure
                first_error = first_error or exc
        if first_error is not None:
            raise first_error

    def __enter__(self) -> "HookHandle":
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __iter__(self) -> Iterator[Any]:
        return iter(list(self._items))


def attach_guarded(name: str, register: Callable[[HookHandle], None]) -> HookHandle:
    """Run `register(handle)` and return the handle; on any error remove what was registered and re-raise."""
    handle = HookHandle(name)
    try:
        register(handle)
    except BaseException:
        handle.remove()
        raise
    return handle

