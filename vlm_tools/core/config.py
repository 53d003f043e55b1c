"""Method configs: one base class, one parser for every front end (Python, CLI, lmms-eval `model_args`, YAML grids).

A method's config is a frozen dataclass deriving from `MethodConfig`. `to_dict()` / `from_dict()` round-trip it;
`from_dict(..., cast=True)` first casts string-ish values (`"64"`, `"0.5"`, `"true"`, `"none"`, `"a;b"`) to each
field's annotated type, which is what the CLI, the lmms-eval plugin and the run YAMLs need. Unknown fields and values
of the wrong type raise errors that name the field and the valid ones. `BudgetConfig` is the token budget shared by
every pruning method (`keep` tokens per image, or `ratio` removed).

This module imports neither torch nor any method package.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

__all__ = ["MethodConfig", "BudgetConfig", "ConfigError", "cast_value", "config_fields"]


class ConfigError(TypeError, ValueError):
    """A config cannot be built from the given values (the message names the field and what is valid).

    Both a `TypeError` (what Python raises for an unexpected keyword argument) and a `ValueError` (what the text
    front ends report), so every caller catches it the way it expects.
    """


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def cast_value(value: Any, annotation: Any, name: str = "value") -> Any:
    """Cast a value read from text (CLI, `model_args`, YAML) to a config field's annotated type.

    Supports `int`, `float`, `bool`, `str`, `X | None`, `Literal[...]` and tuples/lists of those (items separated by
    `;`). Quotes around a string value (`'A, B'`, `"x"`) are removed. Other annotations pass the value through.

    Raises:
        ConfigError: the value cannot be read as the annotated type (names the field and the type).
    """
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if type(None) in options and (value is None or (isinstance(value, str) and value.lower() in ("none", "null"))):
            return None
        for opt in (o for o in options if o is not type(None)):
            try:
                return cast_value(value, opt, name)
            except ConfigError:
                continue
        raise ConfigError(f"{name}={value!r}: expected {_type_name(annotation)}")
    if origin is typing.Literal:
        allowed = typing.get_args(annotation)
        for a in allowed:
            if value == a or str(value) == str(a):
                return a
        raise ConfigError(f"{name}={value!r}: expected one of {', '.join(map(repr, allowed))}")
    if origin in (tuple, list):
        items = value if isinstance(value, (list, tuple)) else [v for v in str(value).split(";") if v != ""]
        args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        item_type = args[0] if args else Any
        out = [cast_value(v, item_type, name) for v in items]
        return tuple(out) if origin is tuple else out
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, float)) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{name}={value!r}: expected a bool (true/false)")
    if annotation is int:
        if isinstance(value, bool):
            raise ConfigError(f"{name}={value!r}: expected an int")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise ConfigError(f"{name}={value!r}: expected an int")
    if annotation is float:
        if isinstance(value, bool):
            raise ConfigError(f"{name}={value!r}: expected a float")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}={value!r}: expected a float") from None
    if annotation is str:
        text = str(value)
        if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
            text = text[1:-1]
        return text
    return value


def config_fields(config_cls: type) -> dict[str, Any]:
    """Field name -> resolved type annotation of a config dataclass."""
    hints = typing.get_type_hints(config_cls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(config_cls)}


@dataclass(frozen=True)
class MethodConfig:
    """Base of every method config (a frozen dataclass; subclasses add documented fields and checks)."""

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (tuples kept; JSON writers turn them into lists)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], *, cast: bool = False, method: str | None = None):
        """Build the config from keyword values.

        Args:
            values: field name -> value.
            cast: first cast each value to its field's annotated type (values read from text).
            method: the method's name, for error messages.

        Raises:
            ConfigError: an unknown field (lists the valid ones) or a value that cannot be cast.
            TypeError / ValueError: the config's own checks (budgets, ranges), unchanged.
        """
        fields_ = config_fields(cls)
        unknown = sorted(set(values) - set(fields_))
        if unknown:
            who = f" for method {method!r}" if method else ""
            valid = ", ".join(sorted(fields_)) or "(none: it takes no arguments)"
            raise ConfigError(f"unknown config field(s) {', '.join(unknown)}{who}; valid fields: {valid}")
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in values
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if missing:
            who = f" of method {method!r}" if method else ""
            raise ConfigError(f"missing config field(s) {', '.join(missing)}{who}; valid fields: "
                              f"{', '.join(sorted(fields_))}")
        kwargs = {k: cast_value(v, fields_[k], k) for k, v in values.items()} if cast else dict(values)
        return cls(**kwargs)


@dataclass(frozen=True)
class BudgetConfig(MethodConfig):
    """Token budget shared by every pruning method.

    Attributes:
        keep: visual tokens kept per image (LLaVA-NeXT: summed over its crops, newlines excluded).
        ratio: fraction of the visual tokens removed, in (0, 1). Give `keep` or `ratio`, not both.
    """

    keep: int | None = None
    ratio: float | None = None

    #: fields that are the budget (the core's plan reads them; everything else is the method's own)
    budget_fields: ClassVar[tuple[str, ...]] = ("keep", "ratio")

    def __post_init__(self) -> None:
        if self.keep is not None and self.ratio is not None:
            raise ValueError(f"give keep= or ratio=, not both (got keep={self.keep}, ratio={self.ratio})")
        if self.keep is None and self.ratio is None:
            raise ValueError("a token budget is required: keep= (tokens kept per image) or ratio= (fraction removed)")
        if self.keep is not None:
            if isinstance(self.keep, bool) or not isinstance(self.keep, int):
                raise TypeError(f"keep must be an int, got {type(self.keep).__name__}")
            if self.keep <= 0:
                raise ValueError(f"keep must be a positive number of tokens per image, got {self.keep}")
        if self.ratio is not None:
            if not isinstance(self.ratio, (int, float)) or isinstance(self.ratio, bool):
                raise TypeError(f"ratio must be a float, got {type(self.ratio).__name__}")
            if not 0.0 < float(self.ratio) < 1.0:
                raise ValueError(f"ratio is the fraction of visual tokens removed and must lie in (0, 1), "
                                 f"got {self.ratio}")
