"""The demo pipeline on the tiny offline model, and the kept-mask overlay of the HTML report."""

from __future__ import annotations

import json

import torch
from PIL import Image

from vlm_tools.demo.report import kept_mask_image
from vlm_tools.demo.runner import pruning_methods, run_demo


def test_tiny_demo_writes_a_row_per_method_and_budget(tmp_path):
    rows = run_demo("tiny", str(tmp_path))
    assert [(r.method, r.budget) for r in rows[:1]] == [("none", "all")]
    assert len(rows) == 1 + 3 * len(pruning_methods())
    for r in rows[1:]:
        assert r.visual_tokens == int(r.budget.split("=")[1])  # keep=k of 64 patches
        assert r.prefill_ms > 0
    data = json.loads((tmp_path / "results.json").read_text())
    assert len(data["rows"]) == len(rows)
    assert (tmp_path / "results.md").read_text().startswith("| method |")
    assert (tmp_path / "results.csv").read_text().count("\n") == len(rows) + 1


def test_kept_mask_image_darkens_only_pruned_cells():
    white = Image.new("RGB", (64, 64), (255, 255, 255))
    out = kept_mask_image(white, torch.tensor([0, 63]), (8, 8), size=80)
    assert out.size == (80, 80)
    assert out.getpixel((5, 5)) == (255, 255, 255)  # inside kept cell 0
    assert out.getpixel((75, 75)) == (255, 255, 255)  # inside kept cell 63
    assert max(out.getpixel((45, 45))) < 100  # a pruned cell is dark
