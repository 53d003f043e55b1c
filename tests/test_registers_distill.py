"""Registers: the distillation job (exact resume, atomic/corrupt checkpoints), the CLI, the planted-artifact check."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vlm_tools.registers import artifacts, backbones, checkpoint, cli, distill, student, synthetic
from vlm_tools.registers.data import open_source, preprocess

TIMM_KW = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "num_classes": 0}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    """Seven smooth random images of different sizes and formats in a nested tree."""
    root = tmp_path_factory.mktemp("images")
    (root / "a" / "b").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(7):
        h, w = 36 + 5 * i, 60 - 3 * i
        base = rng.random((h // 4 + 1, w // 4 + 1, 3))
        arr = np.kron(base, np.ones((4, 4, 1)))[:h, :w]
        sub = [root, root / "a", root / "a" / "b"][i % 3]
        Image.fromarray((arr * 255).astype(np.uint8)).save(sub / f"img{i}.{['png', 'jpg', 'JPG'][i % 3]}")
    (root / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def timm_weights(tmp_path_factory):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(1)
    m = timm.create_model("test_vit", pretrained=False, **TIMM_KW)
    path = tmp_path_factory.mktemp("w") / "tiny_vit.safetensors"
    save_file(m.state_dict(), str(path))
    return path


@pytest.fixture(scope="module")
def hf_dinov2_dir(tmp_path_factory):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(2)
    m = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
                                 patch_size=8, image_size=32))
    path = tmp_path_factory.mktemp("hf") / "dinov2"
    m.save_pretrained(str(path))
    return path


def _cfg(out, images, backbone, weights=None, **kw):
    base = {"backbone": backbone, "out": str(out), "images": str(images),
            "weights": None if weights is None else str(weights),
            "model_kwargs": TIMM_KW if backbone.startswith("timm:") else {}, "batch_size": 2, "n_views": 3,
            "num_registers": 2, "epochs": 3, "lr": 1e-3, "checkpoint_every": 3, "max_steps": 6}
    base.update(kw)
    return distill.DistillConfig(**base)


class _Killed(Exception):
    pass


def _kill_after(step):
    def cb(done, loss):
        if done == step:
            raise _Killed
    return cb


@pytest.mark.parametrize("backbone", ["timm", "hf"])
def test_resume_after_kill_is_bitwise_equal_to_uninterrupted(tmp_path, image_dir, timm_weights, hf_dinov2_dir,
                                                             backbone):
    spec = ("timm:test_vit", timm_weights) if backbone == "timm" else (f"hf:{hf_dinov2_dir}", None)
    full = distill.run_distillation(_cfg(tmp_path / "full", image_dir, *spec), progress=False)
    assert full.steps == 6 and full.student_dir is not None
    with pytest.raises(_Killed):  # dies right after the step-3 checkpoint, mid-job
        distill.run_distillation(_cfg(tmp_path / "cut", image_dir, *spec), progress=False,
                                 step_callback=_kill_after(3))
    assert checkpoint.latest_checkpoint(tmp_path / "cut").name == "step_00000003.pt"
    resumed = distill.run_distillation(_cfg(tmp_path / "cut", image_dir, *spec), resume=True, progress=False)
    assert resumed.start_step == 3 and resumed.steps == 6
    a = checkpoint.load_checkpoint(tmp_path / "full" / "checkpoints" / "step_00000006.pt")
    b = checkpoint.load_checkpoint(tmp_path / "cut" / "checkpoints" / "step_00000006.pt")
    assert a["trainable"].keys() == b["trainable"].keys()
    for k in a["trainable"]:
        assert torch.equal(a["trainable"][k], b["trainable"][k]), k
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in ("exp_avg", "exp_avg_sq"))
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] == 6
    log = [json.loads(ln) for ln in (tmp_path / "cut" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    assert not list((tmp_path / "cut").rglob("*.tmp"))
    # the export loads onto the base model
    teacher = backbones.load_backbone(spec[0], None if spec[1] is None else str(spec[1]),
                                    TIMM_KW if backbone == "timm" else None)
    s = student.load_student(full.student_dir, teacher)
    ref = checkpoint.student_from_checkpoint(tmp_path / "full" / "checkpoints" / "step_00000006.pt", teacher)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(s(x), ref(x))


def test_corrupt_and_incompatible_checkpoints_name_the_file(tmp_path, image_dir, timm_weights):
    cfg = _cfg(tmp_path / "run", image_dir, "timm:test_vit", timm_weights, max_steps=3)
    distill.run_distillation(cfg, progress=False)
    ckpt = checkpoint.latest_checkpoint(tmp_path / "run")
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])  # truncated, as by a crash mid-copy
    with pytest.raises(checkpoint.CheckpointError, match=str(ckpt)):
        distill.run_distillation(cfg, resume=True, progress=False)
    ckpt.write_bytes(b"\x00garbage")
    with pytest.raises(checkpoint.CheckpointError, match=str(ckpt)):
        checkpoint.load_checkpoint(ckpt)
    torch.save({"something": 1}, ckpt)
    with pytest.raises(checkpoint.CheckpointError, match="not a"):
        checkpoint.load_checkpoint(ckpt)
    ckpt.write_bytes(data)
    other = _cfg(tmp_path / "run", image_dir, "timm:test_vit", timm_weights, max_steps=3, lr=5e-4)
    with pytest.raises(checkpoint.CheckpointError, match=r"settings differ on \['lr'\]"):
        distill.run_distillation(other, resume=True, progress=False)
    # a stale temp file from a killed writer is ignored
    (ckpt.parent / ".step_00000009.pt.123.tmp").write_bytes(b"partial")
    assert checkpoint.latest_checkpoint(tmp_path / "run") == ckpt
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint"):
        distill.run_distillation(_cfg(tmp_path / "empty", image_dir, "timm:test_vit", timm_weights), resume=True)


def test_schedule_is_the_reference_exponential_decay():
    sched = distill.ExponentialDecay(lr0=1e-4, lr_min=5e-6, epochs=4, steps_per_epoch=2)
    lrs = [1e-4 * sched(step) for step in range(12)]
    assert lrs[0] == pytest.approx(1e-4)  # only the very first step runs at lr0 (issue 14.1; it was all of epoch 0)
    assert lrs[1] == lrs[2] == pytest.approx(1e-4 * (5e-6 / 1e-4) ** 0.25)  # after the first step
    assert lrs[8] == lrs[11] == pytest.approx(5e-6)  # floor


def official_rates(lr, end_lr, num_epochs, steps_per_epoch):
    """The rate each optimizer step of PH-Reg's `distill_main.py` loop runs with (a plain restatement of the loop:
    after every `optimizer.step()` it writes `lr * (end_lr / lr) ** ((epoch + 1) / num_epochs)`, floored)."""
    rates, current = [], lr
    decay_ratio = end_lr / lr
    for epoch in range(num_epochs):
        for _ in range(steps_per_epoch):
            rates.append(current)  # this step uses the rate written after the previous one
            new_lr = lr * decay_ratio ** ((epoch + 1) / num_epochs)
            if new_lr <= end_lr:
                new_lr = end_lr
            current = new_lr
    return rates


@pytest.mark.parametrize(("epochs", "steps"), [(100, 3), (4, 2), (3, 7), (1, 5)])
def test_per_step_rates_equal_the_official_loop(epochs, steps):
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, distill.ExponentialDecay(1e-4, 5e-6, epochs, steps))
    ours = []
    for _ in range(epochs * steps):
        ours.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    ref = official_rates(1e-4, 5e-6, epochs, steps)
    assert ours == pytest.approx(ref, rel=1e-12, abs=0)
    if (epochs, steps) == (100, 3):  # the worked example of the research notes
        assert ours[0] == 1e-4 and ours[1] == ours[3] == pytest.approx(9.7049e-5, rel=1e-4)
        assert ours[298] == ours[299] == pytest.approx(5e-6)


def test_the_job_logs_the_official_rate_of_every_step(tmp_path, image_dir, timm_weights):
    cfg = _cfg(tmp_path / "run", image_dir, "timm:test_vit", timm_weights, epochs=3, max_steps=None,
               checkpoint_every=100, lr=1e-3, lr_min=1e-4)  # 7 images, batch 2: 4 steps per epoch
    distill.run_distillation(cfg, progress=False)
    logged = [json.loads(ln)["lr"] for ln in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert logged == pytest.approx(official_rates(1e-3, 1e-4, 3, 4), rel=1e-12, abs=0)


def test_data_sources_and_bad_inputs(tmp_path, image_dir):
    src = open_source(image_dir)
    assert len(src) == 7  # the .txt file is ignored, nested folders and .JPG are found
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(str(p) for p in src.paths[:3]) + "\n")
    assert len(open_source(dataset=listing)) == 3
    x = preprocess(src.load(0), 32, (0.5,) * 3, (0.5,) * 3, np.random.default_rng(0))
    assert x.shape == (3, 32, 32) and x.min() >= -1 and x.max() <= 1
    with pytest.raises(ValueError, match="no .jpg"):
        open_source(tmp_path / "nothing" if (tmp_path / "nothing").mkdir() is None else None)
    with pytest.raises(ValueError, match="exactly one"):
        open_source()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.png").write_bytes(b"no png")
    with pytest.raises(ValueError, match="broken.png"):
        open_source(bad).load(0)
    with pytest.raises(ValueError, match="backbone"):
        distill.DistillConfig(backbone="torchvision:vit", out="o", images="i")
    with pytest.raises(ValueError, match="batch_size"):
        distill.DistillConfig(backbone="timm:test_vit", out="o", images="i", batch_size=0)
    with pytest.raises(FileNotFoundError):
        backbones.load_backbone("hf:/definitely/not/here")


def test_cli_distill_then_report(tmp_path, image_dir, timm_weights, capsys):
    common = ["--backbone", "timm:test_vit", "--weights", str(timm_weights), "--model-kwargs", json.dumps(TIMM_KW)]
    rc = cli.main(["registers", "distill", *common, "--images", str(image_dir), "--out", str(tmp_path / "run"),
                   "--batch-size", "2", "--views", "2", "--registers", "2", "--max-steps", "2",
                   "--checkpoint-every", "1", "--keep-checkpoints", "1", "--num-workers", "0", "--no-progress"])
    assert rc == 0
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step_00000002.pt"]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 2
    rc = cli.main(["report", *common, "--images", str(image_dir), "--student", str(tmp_path / "run" / "student"),
                   "--out", str(tmp_path / "rep"), "--max-images", "3", "--tta-views", "2"])
    assert rc == 0
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert set(report["models"]) == {"base", "student"} and report["settings"]["num_images"] == 3
    assert len(report["figures"]) == 3 and all((tmp_path / "rep" / f).is_file() for f in report["figures"])
    assert rc == 0 and "student" in capsys.readouterr().out
    rc = cli.main(["distill", "--backbone", "timm:test_vit", "--images", str(tmp_path / "missing"),
                   "--out", str(tmp_path / "x"), "--model-kwargs", json.dumps(TIMM_KW)])
    assert rc == 2 and "image folder not found" in capsys.readouterr().err


def test_parser_registers_into_a_main_cli():
    import argparse

    parser = argparse.ArgumentParser(prog="vlm-tools")
    cli.register_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["registers", "distill", "--backbone", "timm:x", "--images", "d", "--out", "o",
                              "--resume"])
    assert args.resume is True and callable(args.func)
    args = parser.parse_args(["registers", "report", "--backbone", "hf:d", "--images", "d", "--out", "o"])
    assert args.registers_command == "report"


def test_planted_artifacts_shrink_after_short_distillation(tmp_path, image_dir):
    """Fast version of benchmarks/registers_planted.py."""
    import timm
    from safetensors.torch import save_file

    kw = dict(TIMM_KW, img_size=64, depth=3)
    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False, **kw).eval()
    src = open_source(image_dir)
    calib = torch.stack([preprocess(src.load(i), 64, (0.5,) * 3, (0.5,) * 3) for i in range(len(src))])
    synthetic.plant_position_outliers(model, calib, cells=[9, 30, 45], block=1, trigger_scale=1.5)
    before = artifacts.summarize([artifacts.measure_artifacts(model, calib, block=-1, tta_views=0)])
    assert before["outlier_rate"] == pytest.approx(3 / 64)
    weights = tmp_path / "planted.safetensors"
    save_file(model.state_dict(), str(weights))
    cfg = distill.DistillConfig(backbone="timm:test_vit", weights=str(weights), model_kwargs=kw,
                                images=str(image_dir), out=str(tmp_path / "run"), batch_size=4, n_views=6,
                                num_registers=4, max_steps=40, epochs=100, lr=5e-3, lr_min=1e-4,
                                checkpoint_every=1000)
    distill.run_distillation(cfg, progress=False)
    s = student.load_student(tmp_path / "run" / "student", model)
    after = artifacts.summarize([artifacts.measure_artifacts(s, calib, block=-1, tta_views=0)])
    assert after["outlier_rate"] < before["outlier_rate"] / 2
    assert after["max_over_median"] < before["max_over_median"] / 2
