"""Integrations with evaluation harnesses (lmms-eval). Nothing here is imported by `import vlm_tools`.

- `lmms_manifest`: the `lmms_eval.models` entry point (imports only `lmms_eval.models.registry_v2`).
- `lmms_eval`: the lmms-eval model class `VlmToolsModel` (`--model vlm_tools`), loaded lazily by lmms-eval.
- `model_args`: parsing and validation of `--model_args` (no heavy imports; fails before any model loads).
- `local_tasks`: local task helpers (data-relative task class, a small photo task generator, offline data checks).
- `grid` / `eval_cli`: the `vlm-tools eval` grid runner and its comparison table.
"""
