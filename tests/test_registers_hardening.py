"""Registers hardening (issues 13.8-13.11, 15.5, 15.7): exports as a set, stale temporaries, crafted checkpoints and
configs, unwritable / reused output folders, SIGTERM checkpoints, --image-size on timm, --help defaults, colour bars."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlm_tools.registers import artifacts, backbones, checkpoint, cli, distill, student

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parent.parent
# no img_size: --image-size / image_size decide it
TIMM_KW = {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "num_classes": 0}


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(5):
        arr = np.kron(rng.random((12, 12, 3)), np.ones((4, 4, 1)))
        Image.fromarray((arr * 255).astype(np.uint8)).save(root / f"img{i}.png")
    return root


@pytest.fixture(scope="module")
def timm_weights(tmp_path_factory):
    """Weights of a 32-px tiny ViT (loading them at another --image-size needs timm's position resampling)."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(1)
    m = timm.create_model("test_vit", pretrained=False, img_size=32, **TIMM_KW)
    path = tmp_path_factory.mktemp("w") / "tiny_vit.safetensors"
    save_file(m.state_dict(), str(path))
    return path


def _cfg(out, images, weights, **kw):
    base = {"backbone": "timm:test_vit", "out": str(out), "images": str(images), "weights": str(weights),
            "model_kwargs": TIMM_KW, "image_size": 32, "batch_size": 2, "n_views": 2, "num_registers": 2,
            "epochs": 3, "lr": 1e-3, "checkpoint_every": 2, "max_steps": 2}
    base.update(kw)
    return distill.DistillConfig(**base)


def _tiny_timm():
    import timm

    torch.manual_seed(0)
    return timm.create_model("test_vit", pretrained=False, img_size=32, **TIMM_KW).eval()


# ------------------------------------------------------------------------------------------- 13.8 exports as a set


def test_a_failed_export_leaves_the_previous_one_whole(tmp_path, monkeypatch):
    teacher = _tiny_timm()
    four = student.build_student(teacher, student.StudentConfig(num_registers=4))
    two = student.build_student(teacher, student.StudentConfig(num_registers=2))
    out = tmp_path / "exp"
    student.save_student(four, out)
    real_dumps = json.dumps

    def disk_full(obj, *a, **k):  # the config write fails after the weights of the new export were written
        if isinstance(obj, dict) and obj.get("format", "").startswith("vlm_tools.registers.student"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_dumps(obj, *a, **k)

    monkeypatch.setattr(json, "dumps", disk_full)
    with pytest.raises(OSError, match="No space"):
        student.save_student(two, out)
    monkeypatch.setattr(json, "dumps", real_dumps)
    meta, tensors = student.read_student_export(out)
    assert meta["student"]["num_registers"] == 4 and tensors["registers"].shape[1] == 4
    student.load_student(out, teacher)  # weights and config still belong together
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp"]  # no temporary sibling left
    student.save_student(two, out)  # and a working write replaces it as a whole
    assert student.read_student_export(out)[0]["student"]["num_registers"] == 2
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="other files"):  # never replaces a folder holding anything else
        student.save_student(two, tmp_path / "other")
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


# ------------------------------------------------------------------------------------ 13.9 stale temporaries


def test_stale_temporaries_of_a_killed_job_are_removed_on_the_next_start(tmp_path, image_dir, timm_weights):
    cfg = _cfg(tmp_path / "run", image_dir, timm_weights, max_steps=2)
    distill.run_distillation(cfg, progress=False)
    ck = tmp_path / "run" / "checkpoints"
    stale = [ck / ".step_00000003.pt.k1ll3d.tmp", ck / ".step_00000004.pt.x.tmp"]
    for p in stale:
        p.write_bytes(b"partial")
    (tmp_path / "run" / ".student.tmp-abc").mkdir()
    (tmp_path / "run" / ".student.tmp-abc" / "student.safetensors").write_bytes(b"partial")
    keep = ck / "notes.tmp"  # not a checkpoint temporary: left alone
    keep.write_text("x")
    distill.run_distillation(_cfg(tmp_path / "run", image_dir, timm_weights, max_steps=3), resume=True,
                             progress=False)
    assert not any(p.exists() for p in stale)
    assert not (tmp_path / "run" / ".student.tmp-abc").exists()
    assert keep.exists()
    assert checkpoint.latest_checkpoint(tmp_path / "run").name == "step_00000003.pt"


# ---------------------------------------------------------------------- 13.10 crafted checkpoints and configs


@pytest.fixture()
def one_checkpoint(tmp_path, image_dir, timm_weights):
    cfg = _cfg(tmp_path / "run", image_dir, timm_weights, max_steps=2)
    distill.run_distillation(cfg, progress=False)
    path = checkpoint.latest_checkpoint(tmp_path / "run")
    return _cfg(tmp_path / "run", image_dir, timm_weights, max_steps=4), path


def _rewrite(path, edit):
    obj = torch.load(path, map_location="cpu", weights_only=True)
    edit(obj)
    torch.save(obj, path)


@pytest.mark.parametrize("entry", ["reg_token", "pos_embed"])
def test_resume_refuses_a_broadcastable_wrong_shape_before_copying(one_checkpoint, entry):
    cfg, path = one_checkpoint

    def shrink(obj):  # (1, n, D) -> (1, 1, D): copy_ would broadcast it silently
        t = obj["trainable"]["registers" if entry == "reg_token" else entry]
        obj["trainable"]["registers" if entry == "reg_token" else entry] = t[:, :1].clone()

    _rewrite(path, shrink)
    name = "registers" if entry == "reg_token" else entry
    with pytest.raises(checkpoint.CheckpointError, match=rf"{re.escape(str(path))}.*'{name}' has shape \(1, 1, 32\)"):
        distill.run_distillation(cfg, resume=True, progress=False)


def test_resume_refuses_non_tensor_entries_and_bad_optimizer_state(one_checkpoint):
    cfg, path = one_checkpoint
    good = path.read_bytes()
    _rewrite(path, lambda obj: obj["trainable"].__setitem__("registers", [0.0, 1.0]))
    with pytest.raises(checkpoint.CheckpointError, match=rf"{re.escape(str(path))}.*'registers' is a list"):
        distill.run_distillation(cfg, resume=True, progress=False)
    path.write_bytes(good)
    _rewrite(path, lambda obj: obj.__setitem__("step", "2"))
    with pytest.raises(checkpoint.CheckpointError, match=rf"{re.escape(str(path))}.*'step'"):
        distill.run_distillation(cfg, resume=True, progress=False)
    path.write_bytes(good)

    def bad_moment(obj):
        st = obj["optimizer"]["state"][0]
        st["exp_avg"] = st["exp_avg"].flatten()[:1].clone()

    _rewrite(path, bad_moment)
    with pytest.raises(checkpoint.CheckpointError, match=rf"{re.escape(str(path))}.*'exp_avg'.*shape"):
        distill.run_distillation(cfg, resume=True, progress=False)
    path.write_bytes(good)
    assert distill.run_distillation(cfg, resume=True, progress=False).steps == 4  # the intact file still resumes


def test_a_crafted_num_registers_fails_before_allocating(tmp_path, capsys):
    teacher = _tiny_timm()
    out = tmp_path / "exp"
    student.save_student(student.build_student(teacher, student.StudentConfig(num_registers=2)), out)
    meta = json.loads((out / student.STUDENT_CONFIG).read_text())
    meta["student"]["num_registers"] = 2**40
    (out / student.STUDENT_CONFIG).write_text(json.dumps(meta))
    cfg_file = re.escape(str(out / student.STUDENT_CONFIG))
    with pytest.raises(student.StudentFormatError, match=rf"{cfg_file}.*num_registers"):
        student.load_student(out, teacher)
    meta["student"]["num_registers"] = "16"
    (out / student.STUDENT_CONFIG).write_text(json.dumps(meta))
    with pytest.raises(student.StudentFormatError, match="num_registers must be an int"):
        student.load_student(out, teacher)


def test_student_from_checkpoint_checks_the_register_count(one_checkpoint):
    _cfg_, path = one_checkpoint
    _rewrite(path, lambda obj: obj.__setitem__("job", obj["job"].replace('"num_registers": 2', '"num_registers": '
                                                                         + str(2**40))))
    teacher = backbones.load_backbone("timm:test_vit", str(_cfg_.weights), TIMM_KW, 32)
    with pytest.raises(checkpoint.CheckpointError, match=rf"{re.escape(str(path))}.*'registers'.*num_registers"):
        checkpoint.student_from_checkpoint(path, teacher)


# ----------------------------------------------------------------------------- 13.11 / 15.5 the output folder


def _distill_args(out, image_dir, timm_weights, *extra):
    return ["registers", "distill", "--backbone", "timm:test_vit", "--weights", str(timm_weights), "--model-kwargs",
            json.dumps(TIMM_KW), "--image-size", "32", "--images", str(image_dir), "--out", str(out),
            "--batch-size", "2", "--views", "2", "--registers", "2", "--max-steps", "2", "--checkpoint-every", "2",
            "--num-workers", "0", "--no-progress", *extra]


def test_an_unwritable_out_is_refused_first_with_one_line(tmp_path, image_dir, timm_weights, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    bad = blocker / "out"  # a file in the way: cannot be a folder
    args = _distill_args(bad, image_dir, timm_weights)
    args[args.index("--weights") + 1] = str(tmp_path / "missing.safetensors")  # would fail later if loaded
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --out") and str(bad) in err and "\n" not in err
    assert cli.main(["report", "--backbone", "timm:test_vit", "--images", str(image_dir), "--out", str(bad)]) == 2
    assert "--out" in capsys.readouterr().err
    if os.geteuid() != 0:  # root ignores permission bits
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        try:
            assert cli.main(_distill_args(ro, image_dir, timm_weights)) == 2
            assert "not a writable folder" in capsys.readouterr().err
        finally:
            ro.chmod(0o755)


def test_rerunning_into_an_existing_out_is_refused_without_resume_or_overwrite(tmp_path, image_dir, timm_weights,
                                                                                capsys):
    out = tmp_path / "run"
    assert cli.main(_distill_args(out, image_dir, timm_weights)) == 0
    before = (out / "train_log.jsonl").read_text()
    assert cli.main(_distill_args(out, image_dir, timm_weights)) == 2
    err = capsys.readouterr().err
    assert "already holds a distillation job" in err and "--resume" in err and "--overwrite" in err
    assert (out / "train_log.jsonl").read_text() == before  # nothing was touched
    with pytest.raises(checkpoint.OutputExistsError):
        distill.run_distillation(_cfg(out, image_dir, timm_weights), progress=False)
    (out / "checkpoints" / "step_00000099.pt").write_bytes(b"old")
    assert cli.main(_distill_args(out, image_dir, timm_weights, "--overwrite")) == 0
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_00000002.pt"]  # old ones gone
    assert [json.loads(ln)["step"] for ln in (out / "train_log.jsonl").read_text().splitlines()] == [1, 2]
    assert cli.main(_distill_args(out, image_dir, timm_weights, "--resume")) == 0  # resume is allowed


def test_sigterm_writes_a_checkpoint_then_resume_continues(tmp_path, image_dir, timm_weights):
    out = tmp_path / "run"
    args = _distill_args(out, image_dir, timm_weights)
    args[args.index("--max-steps") + 1] = "100000"
    args[args.index("--checkpoint-every") + 1] = "100000"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "vlm_tools.registers.cli", *args[1:]], env=env, cwd=str(ROOT),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = out / "train_log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if log.is_file() and len(log.read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM" in err
    steps = [json.loads(ln)["step"] for ln in log.read_text().splitlines()]
    last = checkpoint.latest_checkpoint(out)
    assert last is not None and checkpoint.load_checkpoint(last)["step"] == steps[-1] >= 3
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped_by"] == "SIGTERM" and summary["student_dir"] is None
    resume = _distill_args(out, image_dir, timm_weights, "--resume")
    resume[resume.index("--max-steps") + 1] = str(steps[-1] + 1)
    resume[resume.index("--checkpoint-every") + 1] = "100000"
    assert cli.main(resume) == 0
    assert json.loads((out / "summary.json").read_text())["start_step"] == steps[-1]


# ---------------------------------------------------------------------------------------------- 15.5 the CLI


def test_image_size_configures_the_timm_backbone(tmp_path, image_dir, timm_weights):
    m = backbones.load_backbone("timm:test_vit", str(timm_weights), TIMM_KW, image_size=64)
    assert tuple(m.patch_embed.img_size) == (64, 64) and m.pos_embed.shape[1] == 1 + 64  # resampled from 4x4
    with torch.no_grad():
        assert m.forward_features(torch.randn(1, 3, 64, 64)).shape == (1, 65, 32)
    with pytest.raises(ValueError, match="contradicts"):
        backbones.load_backbone("timm:test_vit", str(timm_weights), dict(TIMM_KW, img_size=32), image_size=64)
    args = _distill_args(tmp_path / "run", image_dir, timm_weights)
    args[args.index("--image-size") + 1] = "48"  # the weights are for 32 px
    assert cli.main(args) == 0
    meta = json.loads((tmp_path / "run" / "student" / student.STUDENT_CONFIG).read_text())
    assert meta["base"]["image_size"] == 48


def test_help_shows_every_default():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["registers"]
    commands = next(a for a in sub._actions if a.dest == "registers_command").choices
    for name, p in commands.items():
        text = p.format_help()
        for action in p._actions:
            if action.dest in ("help",) or not action.option_strings or action.required:
                continue
            assert action.help, f"{name} {action.option_strings[0]} has no help"
            assert "(default:" in p._get_formatter()._get_help_string(action), (name, action.option_strings)
        shown = {"distill": "--batch-size BATCH_SIZE images per optimizer step (default: 8)",
                 "report": "images measured (sorted order) (default: 16)",
                 "find-neurons": "neurons kept over all blocks (default: 10)",
                 "probe": "fitted on (default: 300)"}[name]
        assert shown in " ".join(text.split()), name


@pytest.mark.real_weights
def test_shortcut_backbones_name_the_cached_dinov2():
    from vlm_tools.assets import convert

    src = backbones.resolve_backbone("dinov2-s")
    assert src.kind == "hf" and Path(src.name) == convert.ensure_dinov2_hf(verbose=False)
    t = backbones.resolve_backbone("dinov2-s-timm")
    assert t.kind == "timm" and t.name == convert.TIMM_DINOV2_NAME and t.model_kwargs["num_classes"] == 0
    with pytest.raises(ValueError, match="do not pass --weights"):
        backbones.resolve_backbone("dinov2-s", weights="w.safetensors")
    with pytest.raises(ValueError, match="shortcut|one of"):
        distill.DistillConfig(backbone="dinov2-xl", out="o", images="i")
    m = backbones.load_backbone("dinov2-s-timm", image_size=224)
    assert m.patch_embed.grid_size == (16, 16)


# ---------------------------------------------------------------------------------- 15.7 norm-map colour bar


def test_norm_maps_carry_a_colour_bar(tmp_path, image_dir):
    bar = artifacts.colourbar_image(2.0, 10.0, height=40)
    arr = np.asarray(bar)
    top, bottom = arr[1, 5].astype(int), arr[-2, 5].astype(int)  # inside the outline
    assert np.abs(top - [253, 231, 37]).max() < 25  # vmax: the bright end of the scale, at the top
    assert np.abs(bottom - [68, 1, 84]).max() < 25  # vmin: the dark end, at the bottom
    model = _tiny_timm()
    rep = artifacts.artifact_report({"base": model}, image_dir, tmp_path / "rep", max_images=1, tta_views=0)
    fig = Image.open(tmp_path / "rep" / rep["figures"][0])
    scale = 224 // 4  # the 4x4 grid is drawn at 56 px per cell
    assert fig.width >= 2 * 4 * scale + bar.width  # input, one map, the colour bar
