"""`--model_args` of the lmms-eval plugin: parsing, type casting and validation, before any model loads.

lmms-eval turns `--model_args "pretrained=PATH,method=cls_topk,keep=64"` into keyword arguments whose values are
already int/float/bool/str guesses (`"64"` -> 64, `"0.5"` -> 0.5, `"true"` -> True). The plugin's own arguments are
listed in `PLUGIN_ARGS`; every other key is a field of the method's config dataclass and is cast to that field's
annotated type. An unknown method, an unknown key or a bad budget raises `ValueError` naming the valid values.

This module imports neither torch nor lmms-eval, so validation costs milliseconds.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "DTYPES",
    "PLUGIN_ARGS",
    "PROMPT_MODES",
    "DistInfo",
    "PluginArgs",
    "cast_value",
    "format_model_args",
    "method_fields",
    "parse_model_args",
    "resolve_device",
    "validate_method",
]

#: The plugin's own `model_args` keys (everything else goes to the method config).
PLUGIN_ARGS: dict[str, str] = {
    "pretrained": "HF LLaVA / LLaVA-NeXT checkpoint (folder or hub id; `default`: the embedded default model)",
    "method": "registered vlm_tools method (default none: the unpruned reference through the same code path)",
    "batch_size": "requests per forward/generate call (left-padded batches)",
    "max_batch_size": "accepted for lmms-eval compatibility and ignored",
    "device": "cpu, cuda, cuda:N or auto (default: cuda:LOCAL_RANK when CUDA is available, else cpu)",
    "dtype": "auto, float32, float16 or bfloat16 (auto: the checkpoint's dtype)",
    "attn_implementation": "sdpa, eager or flash_attention_2 (default: the transformers default)",
    "max_new_tokens": "generation length when the task sets none (default 256)",
    "prompt": "auto (chat template when the processor has one, else '<image>\\n{question}'), chat or plain",
    "use_cache": "KV cache during generation (default true)",
    "assistant_prefix": "text after the prompt that the answer continues (default none; `Answer:` for the default "
                        "model)",
}

DTYPES: dict[str, str] = {"auto": "auto", "float32": "float32", "fp32": "float32", "float": "float32",
                          "float16": "float16", "fp16": "float16", "half": "float16", "bfloat16": "bfloat16",
                          "bf16": "bfloat16"}
PROMPT_MODES = ("auto", "chat", "plain")
_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


@dataclass(frozen=True)
class PluginArgs:
    """Validated plugin arguments.

    Attributes:
        pretrained: checkpoint path or hub id (None when the caller passes a loaded model).
        method: registered method name.
        method_kwargs: the method config's fields, cast to their annotated types (already validated).
        batch_size: requests per call.
        device: requested device (None: automatic).
        dtype: normalised dtype name ("auto", "float32", "float16", "bfloat16").
        attn_implementation: attention backend passed to `from_pretrained`, or None.
        max_new_tokens: default generation length.
        prompt: prompt mode ("auto", "chat", "plain").
        use_cache: KV cache during generation.
        assistant_prefix: text appended to every prompt (the answer continues it), or None for the model's default.
    """

    pretrained: str | None
    method: str = "none"
    method_kwargs: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 1
    device: str | None = None
    dtype: str = "auto"
    attn_implementation: str | None = None
    max_new_tokens: int = 256
    prompt: str = "auto"
    use_cache: bool = True
    assistant_prefix: str | None = None


@dataclass(frozen=True)
class DistInfo:
    """Process placement under `accelerate launch` / torchrun (read from RANK, LOCAL_RANK, WORLD_SIZE)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> DistInfo:
        """Read the launcher's environment variables (defaults: a single process)."""
        env = os.environ if env is None else env
        world = int(env.get("WORLD_SIZE", "1") or 1)
        rank = int(env.get("RANK", "0") or 0)
        local = int(env.get("LOCAL_RANK", str(rank)) or 0)
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"inconsistent launcher environment: RANK={rank}, WORLD_SIZE={world}")
        return cls(rank=rank, local_rank=local, world_size=world)

    @property
    def is_main(self) -> bool:
        """Whether this process writes outputs (global rank 0)."""
        return self.rank == 0


def resolve_device(device: str | None, dist: DistInfo, cuda_available: bool) -> str:
    """The device of this process.

    Under data parallelism (`world_size > 1`) every process uses its own GPU `cuda:LOCAL_RANK`, whatever CUDA index
    was asked for (a fixed `cuda:0` would load every rank onto GPU 0).

    Args:
        device: requested device (None or "auto": CUDA when available, else CPU).
        dist: the process placement.
        cuda_available: `torch.cuda.is_available()`.

    Raises:
        ValueError: an unknown device, or CUDA was requested but is not available.
    """
    device = (device or "auto").strip().lower()
    if not _DEVICE_RE.match(device):
        raise ValueError(f"device must be auto, cpu, mps, cuda or cuda:N, got {device!r}")
    if device == "auto":
        device = "cuda" if cuda_available else "cpu"
    if device.startswith("cuda"):
        if not cuda_available:
            raise ValueError(f"device={device} was requested but CUDA is not available; use device=cpu")
        if dist.world_size > 1:
            return f"cuda:{dist.local_rank}"
        return device if ":" in device else "cuda:0"
    return device


def method_fields(method: str) -> dict[str, Any]:
    """Field name -> resolved type annotation of a registered method's config (raises ValueError if unknown)."""
    from vlm_tools._registry import get_method

    try:
        info = get_method(method)
    except KeyError as exc:
        raise ValueError(exc.args[0]) from None
    hints = typing.get_type_hints(info.config_cls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(info.config_cls)}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def cast_value(value: Any, annotation: Any, name: str = "value") -> Any:
    """Cast a `model_args` value (as lmms-eval parsed it) to a config field's annotated type.

    Supports `int`, `float`, `bool`, `str`, `X | None`, `Literal[...]` and tuples/lists of those (items separated
    by `;`). Other annotations pass the value through unchanged.

    Raises:
        ValueError: the value cannot be read as the annotated type (names the field and the type).
    """
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if type(None) in options and (value is None or (isinstance(value, str) and value.lower() in ("none", "null"))):
            return None
        for opt in (o for o in options if o is not type(None)):
            try:
                return cast_value(value, opt, name)
            except ValueError:
                continue
        raise ValueError(f"{name}={value!r}: expected {_type_name(annotation)}")
    if origin is typing.Literal:
        allowed = typing.get_args(annotation)
        for a in allowed:
            if value == a or str(value) == str(a):
                return a
        raise ValueError(f"{name}={value!r}: expected one of {', '.join(map(repr, allowed))}")
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
        raise ValueError(f"{name}={value!r}: expected a bool (true/false)")
    if annotation is int:
        if isinstance(value, bool):
            raise ValueError(f"{name}={value!r}: expected an int")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise ValueError(f"{name}={value!r}: expected an int")
    if annotation is float:
        if isinstance(value, bool):
            raise ValueError(f"{name}={value!r}: expected a float")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name}={value!r}: expected a float") from None
    if annotation is str:
        return str(value)
    return value


def validate_method(method: str, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Cast `kwargs` to the method's config field types and build the config once to validate it.

    Returns:
        The cast keyword arguments (pass them to `vlm_tools.wrap(model, method, **kwargs)`).

    Raises:
        ValueError: unknown method (lists the registered ones), unknown field (lists the method's fields and the
            plugin arguments), a value of the wrong type, or an invalid budget.
    """
    from vlm_tools._registry import get_method

    fields_ = method_fields(method)
    unknown = sorted(set(kwargs) - set(fields_))
    if unknown:
        valid = ", ".join(sorted(fields_)) or "(none: it takes no arguments)"
        raise ValueError(f"unknown model_args {', '.join(unknown)} for method {method!r}; the method's fields: "
                         f"{valid}; plugin arguments: {', '.join(PLUGIN_ARGS)}")
    cast = {k: cast_value(v, fields_[k], k) for k, v in kwargs.items()}
    config_cls = get_method(method).config_cls
    try:
        config_cls(**cast)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"bad model_args for method {method!r}: {exc}") from None
    return cast


def parse_model_args(args: Mapping[str, Any], require_pretrained: bool = True) -> PluginArgs:
    """Split and validate the plugin's keyword arguments (as `create_from_arg_string` passes them).

    Args:
        args: keyword arguments: the plugin's own (`PLUGIN_ARGS`) plus the method config's fields.
        require_pretrained: raise when `pretrained` is missing (False when a loaded model is passed in).

    Raises:
        ValueError: a missing checkpoint, an unknown method or field, a bad budget, device, dtype or batch size.
    """
    args = {k: v for k, v in args.items() if v is not None}
    method = str(args.pop("method", "none"))
    own = {k: args.pop(k) for k in list(args) if k in PLUGIN_ARGS}
    method_kwargs = validate_method(method, args)
    pretrained = own.get("pretrained")
    if require_pretrained and not pretrained:
        raise ValueError("model_args needs pretrained=PATH (an HF LLaVA or LLaVA-NeXT checkpoint folder or hub id)")
    try:
        batch_size = int(own.get("batch_size", 1))
    except (TypeError, ValueError):
        raise ValueError(f"batch_size must be a positive int (auto is not supported), "
                         f"got {own['batch_size']!r}") from None
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size}")
    dtype = str(own.get("dtype", "auto")).lower().replace("torch.", "")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(sorted(set(DTYPES)))}, got {own['dtype']!r}")
    device = own.get("device")
    if device is not None and not _DEVICE_RE.match(str(device).lower()):
        raise ValueError(f"device must be auto, cpu, mps, cuda or cuda:N, got {device!r}")
    prompt = str(own.get("prompt", "auto"))
    if prompt not in PROMPT_MODES:
        raise ValueError(f"prompt must be one of {', '.join(PROMPT_MODES)}, got {prompt!r}")
    max_new = cast_value(own.get("max_new_tokens", 256), int, "max_new_tokens")
    if max_new < 1:
        raise ValueError(f"max_new_tokens must be positive, got {max_new}")
    attn = own.get("attn_implementation")
    prefix = own.get("assistant_prefix")
    return PluginArgs(pretrained=str(pretrained) if pretrained else None, method=method, method_kwargs=method_kwargs,
                      batch_size=batch_size, device=str(device).lower() if device else None, dtype=DTYPES[dtype],
                      attn_implementation=str(attn) if attn else None, max_new_tokens=max_new, prompt=prompt,
                      use_cache=cast_value(own.get("use_cache", True), bool, "use_cache"),
                      assistant_prefix=str(prefix) if prefix is not None else None)


def format_model_args(values: Mapping[str, Any]) -> str:
    """`k=v,k2=v2` as lmms-eval's `--model_args` expects (None values dropped, tuples joined with `;`)."""
    parts = []
    for k, v in values.items():
        if v is None:
            continue
        if isinstance(v, (list, tuple)):
            v = ";".join(str(x) for x in v)
        if isinstance(v, bool):
            v = str(v).lower()
        text = str(v)
        if "," in text:
            raise ValueError(f"model_args value for {k!r} may not contain a comma: {text!r}")
        parts.append(f"{k}={text}")
    return ",".join(parts)
