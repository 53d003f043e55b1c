"""The demo pipeline on the tiny offline model, its HTML report (screenshot-free), and the report's building blocks."""

from __future__ import annotations

import json
import re

import pytest
import torch
from PIL import Image

from vlm_tools.demo.report import (DemoRow, GalleryCell, GalleryPhoto, PhotosScore, accuracy_plot_png, format_table,
                                   grid_columns, kept_mask_image, render_html)
from vlm_tools.demo.runner import pruning_methods, run_demo


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_demo")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = run_demo("tiny", str(out))
    finally:
        torch.set_num_threads(n)
    return rows, out


def test_tiny_demo_writes_a_row_per_method_and_budget(tiny_demo):
    rows, tmp_path = tiny_demo
    assert [(r.method, r.budget) for r in rows[:1]] == [("none", "all")]
    assert len(rows) == 1 + 3 * len(pruning_methods())
    for r in rows[1:]:
        assert r.visual_tokens == int(r.budget.split("=")[1])  # keep=k of 64 patches
        assert r.prefill_ms > 0
    data = json.loads((tmp_path / "results.json").read_text())
    assert len(data["rows"]) == len(rows)
    assert (tmp_path / "results.md").read_text().startswith("| method |")
    assert (tmp_path / "results.csv").read_text().count("\n") == len(rows) + 1
    for r in rows:  # the same fixed questions in every cell, with a Wilson interval around the accuracy
        assert r.n == rows[0].n == 8 and r.ci_low <= r.accuracy <= r.ci_high


def test_tiny_demo_report_has_one_section_per_distinct_photo(tiny_demo):
    from vlm_tools.assets.data import photos_yesno

    rows, out = tiny_demo
    doc = (out / "report.html").read_text()
    distinct = list(dict.fromkeys(it["photo"] for it in photos_yesno()))
    sections = re.findall(r'<section class="photo" data-photo="([^"]+)">(.*?)</section>', doc, re.S)
    assert [name for name, _ in sections] == distinct  # every photo once, none repeated
    methods = pruning_methods()
    for _, body in sections:
        answers = re.findall(r'<b class="answer (?:ok|bad)">([^<]*)</b>', body)
        assert len(answers) == 1 + len(methods)  # unpruned + one kept mask per method, each with its answer
        assert len(re.findall(r'<img src="data:image/jpeg;base64,', body)) == 1 + len(methods)
        for m in methods:
            assert f"{m} keep=16" in body
        assert f"grid-template-columns:repeat({1 + len(methods)}," in body  # all panels on one row, no wrap
    assert re.search(r'<img class="plot" alt="accuracy vs visual tokens[^"]*" src="data:image/png;base64,', doc)
    assert (out / "accuracy_vs_tokens.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "random weights" in doc and "photos_yesno, unpruned" in doc


def _synthetic(question: str, label: str):
    img = Image.new("RGB", (40, 30), (200, 10, 10))
    rows = [DemoRow("none", "all", 64.0, 10.0, accuracy=0.9, ci_low=0.8, ci_high=0.95, n=100, retention=1.0),
            DemoRow(label, "keep=8", 8.0, 5.0, accuracy=0.5, ci_low=0.4, ci_high=0.6, n=100, retention=0.55)]
    cells = [GalleryCell("unpruned", img, 64, "yes"), GalleryCell(f"{label} keep=8", img, 8, "<b>no</b>")]
    gallery = [GalleryPhoto("cat<1>", "src & co", "credit \"x\"", question, "yes", [0, 0, 10, 10], cells)]
    return rows, gallery


def test_report_escapes_user_text():
    question, label = "<script>alert('x')</script> & \"q\"?", "evil|<i>m</i>"
    rows, gallery = _synthetic(question, label)
    doc = render_html(rows, gallery, {"model": "<m>"}, accuracy_plot_png(rows),
                      PhotosScore(0.5, 0.35, 0.65, 42, 0.5, "<u>no</u>", 1.0), "t<itle>", "n<ote>")
    for raw in ("<script>", "<i>m</i>", "<b>no</b>", "cat<1>", "<m>", "t<itle>", "n<ote>", "<u>no</u>"):
        assert raw not in doc
    for escaped in ("&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; &quot;q&quot;?",
                    "evil|&lt;i&gt;m&lt;/i&gt;", "&lt;b&gt;no&lt;/b&gt;", 'data-photo="cat&lt;1&gt;"'):
        assert escaped in doc
    table = format_table(rows)
    assert table.splitlines()[3].count(" | ") == table.splitlines()[0].count(" | ")  # `|` in a label is escaped
    assert "evil\\|<i>m</i>" in table


def test_plot_takes_labels_with_dollar_signs():
    rows, _ = _synthetic("q", "cost $5 $x")
    assert accuracy_plot_png(rows)[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("n, columns", [(1, 1), (6, 6), (7, 7), (8, 8), (9, 5), (12, 6), (17, 6)])
def test_grid_columns_never_leave_a_lone_panel(n, columns):
    assert grid_columns(n) == columns
    rows = -(-n // columns)
    assert rows == 1 or n - (rows - 1) * columns >= columns - 1


def test_kept_mask_image_darkens_only_pruned_cells():
    white = Image.new("RGB", (64, 64), (255, 255, 255))
    out = kept_mask_image(white, torch.tensor([0, 63]), (8, 8), size=80)
    assert out.size == (80, 80)
    assert out.getpixel((5, 5)) == (255, 255, 255)  # inside kept cell 0
    assert out.getpixel((75, 75)) == (255, 255, 255)  # inside kept cell 63
    assert max(out.getpixel((45, 45))) < 100  # a pruned cell is dark


def test_kept_mask_image_draws_the_box_in_the_models_view():
    white = Image.new("RGB", (200, 100), (255, 255, 255))
    out = kept_mask_image(white, None, None, size=100, bbox=[50, 50, 150, 100])  # x scaled by 0.5, y by 1
    assert out.getpixel((25, 75)) != (255, 255, 255)  # left edge of the box at x = 50 * 0.5
    assert out.getpixel((50, 75)) == (255, 255, 255)  # inside the box, untouched
    assert out.getpixel((10, 10)) == (255, 255, 255)  # outside


def test_demo_refuses_bad_arguments_before_running(tmp_path):
    with pytest.raises(ValueError, match=r"unknown pruning methods \['nope'\]"):
        run_demo("tiny", tmp_path, methods=["nope"])
    with pytest.raises(ValueError, match="answer mode 'beam'"):
        run_demo("tiny", tmp_path, answer="beam")
    with pytest.raises(ValueError, match="dtype 'fp8'"):
        run_demo("default", tmp_path, dtype="fp8")
    assert list(tmp_path.iterdir()) == []
