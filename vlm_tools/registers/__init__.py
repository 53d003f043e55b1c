"""Registers for ViTs: PH-Reg (TTA denoiser, register student, distillation job), test-time registers, artifact
metrics.

Public API::

    from vlm_tools.registers import tta_denoise, build_student, load_student, run_distillation, artifact_report
"""

from .artifacts import ArtifactMeasures, artifact_report, measure_artifacts, outlier_mask, summarize
from .backbones import BACKBONE_SHORTCUTS, load_backbone
from .checkpoint import CheckpointError, OutputExistsError, load_checkpoint, student_from_checkpoint
from .distill import DistillConfig, DistillSummary, distill_loss, run_distillation
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
from .test_time import RegisterNeurons, attach_test_time_registers, find_register_neurons
from .tta import TTAResult, ViewPlan, sample_plan, tta_denoise

__all__ = [
    "BACKBONE_SHORTCUTS", "ArtifactMeasures", "CheckpointError", "DistillConfig", "DistillSummary",
    "OutputExistsError", "RegisterHooks", "RegisterNeurons", "RegisterStudent", "StudentConfig", "StudentFormatError",
    "TTAResult", "ViewPlan", "artifact_report", "attach_registers", "attach_test_time_registers", "build_student",
    "distill_loss", "find_register_neurons", "load_backbone", "load_checkpoint", "load_student", "measure_artifacts",
    "outlier_mask", "run_distillation", "sample_plan", "save_student", "student_from_checkpoint", "summarize",
    "tta_denoise",
]
