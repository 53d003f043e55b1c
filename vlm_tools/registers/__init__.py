"""Post-hoc registers for ViTs (PH-Reg): TTA denoiser, register student, distillation job, artifact metrics.

Public API::

    from vlm_tools.registers import tta_denoise, build_student, load_student, run_distillation, artifact_report
"""

from .artifacts import ArtifactMeasures, artifact_report, measure_artifacts, outlier_mask, summarize
from .backbones import BackboneSpec, describe, patch_tokens
from .distill import (
    CheckpointError,
    DistillConfig,
    DistillSummary,
    distill_loss,
    load_backbone,
    load_checkpoint,
    run_distillation,
)
from .student import (
    RegisterHooks,
    RegisterStudent,
    StudentConfig,
    StudentFormatError,
    attach_registers,
    build_student,
    load_student,
    save_student,
)
from .tta import TTAResult, ViewPlan, sample_plan, tta_denoise

__all__ = [
    "ArtifactMeasures", "BackboneSpec", "CheckpointError", "DistillConfig", "DistillSummary", "RegisterHooks",
    "RegisterStudent", "StudentConfig", "StudentFormatError", "TTAResult", "ViewPlan", "artifact_report",
    "attach_registers", "build_student", "describe", "distill_loss", "load_backbone", "load_checkpoint",
    "load_student", "measure_artifacts", "outlier_mask", "patch_tokens", "run_distillation", "sample_plan",
    "save_student", "summarize", "tta_denoise",
]
