"""`--model_args` of the lmms-eval plugin: parsing and validation, before any model loads.

`split_model_args("pretrained=PATH,method=cls_topk,keep=64")` reads lmms-eval's `k=v,...` string (commas inside
quotes, braces or brackets do not split; a key given twice is an error). The plugin's own arguments are listed in
`PLUGIN_ARGS`; every other key is a field of the method's config dataclass. All values, plugin arguments included,
are cast by the core's one parser (`vlm_tools.core.config.cast_value` / `MethodConfig.from_dict(cast=True)`), so the
plugin, `vlm-tools eval` and the run YAMLs read `"64"`, `"true"`, `"none"` and `'quoted, text'` the same way.

lmms-eval's own arguments: its CLI (and `simple_evaluate(model="vlm_tools", ...)`) always passes `batch_size` (the
CLI default is 1), `max_batch_size` and `device` next to `model_args`. `merge_cli_args` applies one rule: **a key
given in `model_args` wins over lmms-eval's flag** (lmms-eval cannot tell its default `--batch_size 1` from an
explicit one, so the more specific setting wins); a flag fills a key that `model_args` does not set. An explicit
flag that disagrees with `model_args` is reported, not silently used.

An unknown method, an unknown key or a bad budget raises `ValueError` naming the valid values. This module imports
neither torch nor lmms-eval, so validation costs milliseconds.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from vlm_tools.core.config import ConfigError, cast_value, config_fields

__all__ = [
    "DTYPES",
    "LMMS_EVAL_ARGS",
    "PLUGIN_ARGS",
    "PROMPT_MODES",
    "DistInfo",
    "PluginArgs",
    "cast_method_kwargs",
    "format_model_args",
    "merge_cli_args",
    "method_fields",
    "parse_model_args",
    "resolve_device",
    "resolve_pretrained",
    "split_model_args",
    "validate_method",
]

#: The plugin's own `model_args` keys (everything else goes to the method config).
PLUGIN_ARGS: dict[str, str] = {
    "pretrained": "HF LLaVA / LLaVA-NeXT checkpoint (folder or hub id); `default` is another spelling of the "
                  "default model's folder (`vlm_tools.default_model_path()`) and is treated exactly like it",
    "method": "registered vlm_tools method (default none: the unpruned reference through the same code path)",
    "batch_size": "requests per forward/generate call (left-padded batches); wins over lmms-eval's --batch_size",
    "max_batch_size": "accepted for lmms-eval compatibility and ignored",
    "device": "cpu, cuda, cuda:N or auto (default: cuda:LOCAL_RANK when CUDA is available, else cpu); wins over "
              "lmms-eval's --device",
    "dtype": "auto, float32, float16 or bfloat16 (auto: the checkpoint's dtype)",
    "attn_implementation": "sdpa, eager or flash_attention_2 (default: the transformers default)",
    "max_new_tokens": "generation length when the task sets none (default 256)",
    "prompt": "auto (chat template when the processor has one, else '<image>\\n{question}'), chat or plain",
    "use_cache": "KV cache during generation (default true)",
    "assistant_prefix": "text appended after the prompt that the answer continues (default none, for every "
                        "checkpoint; quote it when it holds a comma: assistant_prefix='A, B')",
}

#: What lmms-eval passes to `create_from_arg_string` besides `model_args` (its `--batch_size`, ... flags).
LMMS_EVAL_ARGS = ("batch_size", "max_batch_size", "device")
#: lmms-eval's CLI defaults of those flags (argparse keeps a non-string default as is: an explicit flag is a string)
_LMMS_EVAL_DEFAULTS: dict[str, Any] = {"batch_size": 1}

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
        assistant_prefix: text appended to every prompt (the answer continues it), or None (nothing appended).
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


def resolve_pretrained(pretrained: str) -> str:
    """The checkpoint to load: `default` is the default model's folder (built offline on first use), anything else
    is returned unchanged. Nothing else depends on how the default model was spelled."""
    if pretrained == "default":
        from vlm_tools import default_model_path

        return str(default_model_path())
    return pretrained


# -- the model_args string ---------------------------------------------------------------------------------------
def split_model_args(text: str) -> dict[str, str]:
    """`"k=v,k2='a, b'"` -> `{"k": "v", "k2": "'a, b'"}` (values stay text: the config parser casts them).

    Commas inside quotes, braces or brackets do not split (as in lmms-eval); keys and unquoted values are stripped.

    Raises:
        ValueError: an item without `=`, an empty key, an unclosed quote, or a key given twice (names both values:
            lmms-eval's own parser would silently keep the last one).
    """
    items, buf, depth, quote = [], [], 0, None
    for ch in text:
        if quote is not None:
            buf.append(ch)
            if ch == quote:
                quote = None
            continue
        if ch in "'\"":
            quote = ch
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth = max(0, depth - 1)
        elif ch == "," and depth == 0:
            items.append("".join(buf))
            buf = []
            continue
        buf.append(ch)
    if quote is not None:
        raise ValueError(f"model_args {text!r}: unclosed {quote} quote")
    items.append("".join(buf))
    out: dict[str, str] = {}
    for item in (i.strip() for i in items):
        if not item:
            continue
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"model_args item {item!r} is not key=value (model_args are k=v,k2=v2)")
        if key in out:
            raise ValueError(f"model_args gives {key} twice ({key}={out[key]}, {key}={value.strip()}); "
                             f"give each key once")
        out[key] = value.strip()
    return out


def merge_cli_args(model_args: Mapping[str, Any],
                   cli: Mapping[str, Any] | None) -> tuple[dict[str, Any], dict[str, tuple[Any, Any]]]:
    """Merge lmms-eval's own arguments (`batch_size`, `max_batch_size`, `device`) into `model_args`.

    Precedence: a key given in `model_args` wins; a flag (not None) fills a key that `model_args` does not set.

    Returns:
        `(merged keyword arguments, {key: (model_args value, ignored flag value)})` for explicit flags that disagree
        with `model_args` (lmms-eval's default `--batch_size 1` is not reported).
    """
    merged = dict(model_args)
    ignored: dict[str, tuple[Any, Any]] = {}
    for key, value in (cli or {}).items():
        if value is None:
            continue
        if key not in merged:
            merged[key] = value
            continue
        is_default = key in _LMMS_EVAL_DEFAULTS and not isinstance(value, str) and value == _LMMS_EVAL_DEFAULTS[key]
        if str(value) != str(merged[key]) and not is_default:
            ignored[key] = (merged[key], value)
    return merged, ignored


def format_model_args(values: Mapping[str, Any]) -> str:
    """`k=v,k2=v2` as lmms-eval's `--model_args` expects (None dropped, tuples joined with `;`, bools lower-case).

    A value holding a comma is quoted (`'A, B'`), which `split_model_args` and the config parser read back.

    Raises:
        ValueError: a value holding a comma and both quote characters (it cannot be written).
    """
    parts = []
    for k, v in values.items():
        if v is None:
            continue
        if isinstance(v, (list, tuple)):
            v = ";".join(str(x) for x in v)
        if isinstance(v, bool):
            v = str(v).lower()
        text = str(v)
        if any(c in text for c in ",'\"{}[]") or text != text.strip():
            quote = "'" if "'" not in text else '"'
            if quote in text:
                raise ValueError(f"model_args value for {k!r} holds a comma and both quote characters: {text!r}")
            text = f"{quote}{text}{quote}"
        parts.append(f"{k}={text}")
    return ",".join(parts)


# -- methods -----------------------------------------------------------------------------------------------------
def _method_info(method: str) -> Any:
    from vlm_tools import get_method

    try:
        return get_method(method)
    except KeyError as exc:
        raise ValueError(exc.args[0]) from None


def method_fields(method: str) -> dict[str, Any]:
    """Field name -> resolved type annotation of a registered method's config (raises ValueError if unknown)."""
    return config_fields(_method_info(method).config_cls)


def _check_fields(method: str, kwargs: Mapping[str, Any]) -> Any:
    info = _method_info(method)
    fields_ = config_fields(info.config_cls)
    unknown = sorted(set(kwargs) - set(fields_))
    if unknown:
        valid = ", ".join(sorted(fields_)) or "(none: it takes no arguments)"
        raise ValueError(f"unknown model_args {', '.join(unknown)} for method {method!r}; the method's fields: "
                         f"{valid}; plugin arguments: {', '.join(PLUGIN_ARGS)}")
    return info


def cast_method_kwargs(method: str, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Cast `kwargs` to the method's config field types (core parser) without building the config (no budget
    needed: grids add it per run).

    Raises:
        ValueError: unknown method or field, or a value that cannot be cast.
    """
    fields_ = config_fields(_check_fields(method, kwargs).config_cls)
    try:
        return {k: cast_value(v, fields_[k], k) for k, v in kwargs.items()}
    except ConfigError as exc:
        raise ValueError(f"bad model_args for method {method!r}: {exc}") from None


def validate_method(method: str, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Cast `kwargs` with the core config parser and build the method's config once to validate it.

    Returns:
        The given keys, cast to their field types (pass them to `vlm_tools.wrap(model, method, **kwargs)`).

    Raises:
        ValueError: unknown method (lists the registered ones), unknown field (lists the method's fields and the
            plugin arguments), a value of the wrong type, or an invalid budget / config.
    """
    info = _check_fields(method, kwargs)
    try:
        config = info.config_cls.from_dict(kwargs, cast=True, method=method)
    except (TypeError, ValueError, OSError) as exc:  # ConfigError is both; a config may check a path (OSError)
        raise ValueError(f"bad model_args for method {method!r}: {exc}") from None
    values = config.to_dict()
    return {k: values[k] for k in kwargs}


# -- the plugin's own arguments ----------------------------------------------------------------------------------
_PLUGIN_FIELDS = config_fields(PluginArgs)


def _cast_own(name: str, value: Any) -> Any:
    try:
        return cast_value(value, _PLUGIN_FIELDS[name], name)
    except ConfigError as exc:
        raise ValueError(str(exc)) from None


def parse_model_args(args: Mapping[str, Any], require_pretrained: bool = True) -> PluginArgs:
    """Split and validate the plugin's keyword arguments (as `create_from_arg_string` passes them).

    Args:
        args: keyword arguments: the plugin's own (`PLUGIN_ARGS`) plus the method config's fields; values may be
            text (`"64"`, `"'A, B'"`) or already typed.
        require_pretrained: raise when `pretrained` is missing (False when a loaded model is passed in).

    Raises:
        ValueError: a missing checkpoint, an unknown method or field, a bad budget, device, dtype or batch size.
    """
    args = {k: v for k, v in args.items() if v is not None}
    method = str(_cast_own("method", args.pop("method", "none")))
    own = {k: args.pop(k) for k in list(args) if k in PLUGIN_ARGS}
    method_kwargs = validate_method(method, args)
    pretrained = _cast_own("pretrained", own["pretrained"]) if "pretrained" in own else None
    if require_pretrained and not pretrained:
        raise ValueError("model_args needs pretrained=PATH (an HF LLaVA or LLaVA-NeXT checkpoint folder or hub id)")
    try:
        batch_size = cast_value(own.get("batch_size", 1), int, "batch_size")
    except ConfigError:
        raise ValueError(f"batch_size must be a positive int (auto is not supported), "
                         f"got {own['batch_size']!r}") from None
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size}")
    dtype = str(_cast_own("dtype", own.get("dtype", "auto"))).lower().replace("torch.", "")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(sorted(set(DTYPES)))}, got {own['dtype']!r}")
    device = _cast_own("device", own["device"]) if "device" in own else None
    if device is not None and not _DEVICE_RE.match(device.lower()):
        raise ValueError(f"device must be auto, cpu, mps, cuda or cuda:N, got {device!r}")
    prompt = _cast_own("prompt", own.get("prompt", "auto"))
    if prompt not in PROMPT_MODES:
        raise ValueError(f"prompt must be one of {', '.join(PROMPT_MODES)}, got {prompt!r}")
    max_new = _cast_own("max_new_tokens", own.get("max_new_tokens", 256))
    if max_new < 1:
        raise ValueError(f"max_new_tokens must be positive, got {max_new}")
    attn = _cast_own("attn_implementation", own["attn_implementation"]) if "attn_implementation" in own else None
    prefix = _cast_own("assistant_prefix", own["assistant_prefix"]) if "assistant_prefix" in own else None
    return PluginArgs(pretrained=pretrained or None, method=method, method_kwargs=method_kwargs,
                      batch_size=batch_size, device=device.lower() if device else None, dtype=DTYPES[dtype],
                      attn_implementation=attn or None, max_new_tokens=max_new, prompt=prompt,
                      use_cache=_cast_own("use_cache", own.get("use_cache", True)), assistant_prefix=prefix)
