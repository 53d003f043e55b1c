"""Registers: the dense linear probe (issue 14.4): IoU, the probe itself, its shape-mask labels, `registers probe`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vlm_tools.core.adapters import get_tower
from vlm_tools.registers import cli, probe, student, test_time

pytestmark = pytest.mark.usefixtures("one_thread")


def test_iou_per_class_by_hand():
    pred = np.array([0, 0, 1, 1, 2, 2, 0])
    target = np.array([0, 1, 1, 1, 2, 0, 0])
    # class 0: pred {0,1,6} target {0,5,6} -> 2/4; class 1: {2,3} vs {1,2,3} -> 2/3; class 2: {4,5} vs {4} -> 1/2
    assert probe.iou_per_class(pred, target, 4)[:3] == pytest.approx([0.5, 2 / 3, 0.5])
    assert np.isnan(probe.iou_per_class(pred, target, 4)[3])  # absent from both


def test_linear_probe_separates_separable_features():
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (300,), generator=gen)
    x = torch.randn(300, 8, generator=gen) * 0.1
    x[torch.arange(300), y] += 3.0  # class c lives on axis c
    r = probe.linear_probe(x[:200], y[:200], x[200:], y[200:], 3)
    assert r["miou"] == 1.0 and r["accuracy"] == 1.0 and r["iou"] == [1.0, 1.0, 1.0]
    noise = probe.linear_probe(torch.randn(200, 8, generator=gen), y[:200], torch.randn(100, 8, generator=gen),
                               y[200:], 3)
    assert noise["miou"] < 0.6


@pytest.fixture(scope="module")
def small_data():
    return probe.load_shape_probe_data(12, 6, 64, 8, (0.5,) * 3, (0.5,) * 3)


def test_patch_labels_follow_the_shape_masks(small_data):
    import easy_vqa
    from PIL import Image

    from vlm_tools.assets.data import shape_mask

    d = small_data
    assert d.train.shape == (12, 3, 64, 64) and d.train_labels.shape == (12, 64) and d.grid == (8, 8)
    assert d.test_labels.shape == (6, 64)
    paths = easy_vqa.get_train_image_paths()
    texts, answers, ids = easy_vqa.get_train_questions()
    for k, image_id in enumerate(sorted(paths)[:12]):  # the first training images by id
        mask = shape_mask(np.asarray(Image.open(paths[image_id]).convert("RGB")))
        frac = mask.reshape(8, 8, 8, 8).mean(axis=(1, 3)).flatten()  # 64 px: one 8 x 8 cell per patch
        # "what shape is in the image?" -> circle; "what color is the circle?" names it too
        named = {a for a, i in zip(answers, ids) if i == image_id and a in probe.SHAPES}
        named |= {s for t, i in zip(texts, ids) if i == image_id and "color" in t for s in probe.SHAPES if s in t}
        assert len(named) == 1, named
        shape = named.pop()
        expected = np.where(frac > 0.5, 1 + probe.SHAPES.index(shape), 0)
        assert d.train_labels[k].tolist() == expected.tolist()
    assert set(d.train_labels.unique().tolist()) <= {0, 1, 2, 3} and (d.train_labels > 0).any()


def test_probe_cli_scores_teacher_student_and_test_time_registers(tmp_path, capsys):
    import timm
    from safetensors.torch import save_file

    from vlm_tools.registers import synthetic

    kw = {"patch_size": 8, "embed_dim": 32, "depth": 3, "num_heads": 2, "num_classes": 0}
    torch.manual_seed(0)
    vit = timm.create_model("test_vit", pretrained=False, img_size=64, **kw).eval()
    data = probe.load_shape_probe_data(12, 6, 64, 8, (0.5,) * 3, (0.5,) * 3)
    synthetic.plant_position_outliers(vit, data.train, cells=[9, 30], block=1, trigger_scale=1.5)
    weights = tmp_path / "vit.safetensors"
    save_file(vit.state_dict(), str(weights))
    student.save_student(student.build_student(vit, student.StudentConfig(num_registers=2)), tmp_path / "student")
    with torch.no_grad():
        norms = get_tower(vit).tokens(data.train, -1)[:, 1:].norm(dim=-1)
    neurons = test_time.find_register_neurons(vit, data.train, threshold=5 * float(norms.median()), top_k=1)
    neurons.save(tmp_path / "neurons.json")
    rc = cli.main(["probe", "--backbone", "timm:test_vit", "--weights", str(weights), "--model-kwargs", json.dumps(kw),
                   "--image-size", "64", "--student", str(tmp_path / "student"), "--neurons",
                   str(tmp_path / "neurons.json"), "--out", str(tmp_path / "probe"), "--train-images", "12",
                   "--test-images", "6"])
    assert rc == 0, capsys.readouterr().err
    res = json.loads((tmp_path / "probe" / "probe.json").read_text())
    assert set(res["models"]) == {"teacher", "ph_reg_student", "test_time_registers"}
    for r in res["models"].values():
        assert 0 <= r["fg_bg"]["miou"] <= 1 and len(r["shape"]["iou"]) == 4 and 0 <= r["sink_score"] <= 1
    assert res["models"]["teacher"]["outlier_rate"] > 0  # the planted cells
    assert res["models"]["test_time_registers"]["outlier_rate"] < res["models"]["teacher"]["outlier_rate"]
    assert res["settings"]["grid"] == [8, 8] and res["settings"]["test_patches"] == 6 * 64
