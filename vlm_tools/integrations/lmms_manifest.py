"""lmms-eval entry point (`[project.entry-points."lmms_eval.models"]`): registers `--model vlm_tools`.

Importing `lmms_eval.models` loads this module; it imports only `lmms_eval.models.registry_v2` (cheap) and names the
model class by its dotted path, so lmms-eval imports `vlm_tools.integrations.lmms_eval` only when the model is used.
"""

from __future__ import annotations

from lmms_eval.models.registry_v2 import ModelManifest

__all__ = ["MANIFESTS"]

MANIFESTS = (
    ModelManifest(model_id="vlm_tools", simple_class_path="vlm_tools.integrations.lmms_eval.VlmToolsModel",
                  aliases=("vlm_tools_llava",)),
)
