"""vlm_tools: visual-token pruning, explanations and ViT register distillation for HF LLaVA-style VLMs.

`import vlm_tools` is cheap and has no side effects; submodules load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "wrap": "vlm_tools.core.wrapped",
    "attached": "vlm_tools.core.wrapped",
    "WrappedModel": "vlm_tools.core.wrapped",
    "Trace": "vlm_tools.core.wrapped",
    "list_methods": "vlm_tools._registry",
    "get_method": "vlm_tools._registry",
    "register_method": "vlm_tools._registry",
    "get_adapter": "vlm_tools.core.adapters",
    "explain": "vlm_tools.interpret.api",
    "dominance": "vlm_tools.analysis",
    "load_default": "vlm_tools.assets.default_model",
    "default_model_path": "vlm_tools.assets.default_model",
}

__all__ = ["__version__", "unwrap", *_LAZY]


def unwrap(model: Any):
    """Remove every vlm_tools hook and return the base model.

    `model` is a `WrappedModel` (same as `wrapped.unwrap()`) or a plain model that still carries vlm_tools hooks
    (its wrapper was lost, or it is a copy of a wrapped model).
    """
    from vlm_tools.core.wrapped import unwrap_model

    return unwrap_model(model)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vlm_tools' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
