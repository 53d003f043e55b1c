"""`vlm-tools setup` prints the path of every part it built (issue 15.5: the README's registers commands use them),
and the printed timm weights file loads the same DINOv2-S as the `dinov2-s-timm` shortcut."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.real_weights


def test_setup_prints_the_path_of_every_part(capsys):
    from vlm_tools.cli import main

    assert main(["setup"]) == 0
    printed = capsys.readouterr().out
    lines = dict(re.findall(r"^\[vlm_tools\] (\w+)\s+(/\S+)$", printed, re.M))
    assert set(lines) == {"dinov2_hf", "dinov2_timm_weights", "smollm2", "default_model", "shapes_vqa",
                          "photos_yesno"}
    for name in ("dinov2_hf", "smollm2", "default_model"):
        assert (Path(lines[name]) / "config.json").is_file(), name
    for name in ("shapes_vqa", "photos_yesno"):
        assert any((Path(lines[name]) / "images").glob("*.png")), name
    weights = Path(lines["dinov2_timm_weights"])
    assert weights.is_file() and weights.suffix == ".safetensors"

    from vlm_tools.registers.backbones import load_backbone

    by_path = load_backbone("timm:vit_small_patch14_dinov2", str(weights), {"num_classes": 0})
    by_name = load_backbone("dinov2-s-timm")
    a, b = by_path.state_dict(), by_name.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
