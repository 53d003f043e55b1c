"""Registers: TTA index bookkeeping, the register student (native timm / HF hooks), export, artifact metrics."""

from __future__ import annotations

import pytest
import torch

from vlm_tools.core.adapters import get_tower
from vlm_tools.core.hooks import find_hooks, hook_snapshot
from vlm_tools.registers import artifacts, student, synthetic, tta
from vlm_tools.registers.distill import distill_loss


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_timm(**kw):
    import timm

    torch.manual_seed(0)
    args = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 3, "num_heads": 2, "num_classes": 0}
    args.update(kw)
    return timm.create_model("test_vit", pretrained=False, **args).eval()


def tiny_dinov2(attn="sdpa"):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    cfg = Dinov2Config(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, mlp_ratio=2, patch_size=8,
                       image_size=32, attn_implementation=attn)
    return Dinov2Model(cfg).eval()


def tiny_clip(attn="sdpa"):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                           patch_size=8, image_size=32, attn_implementation=attn)
    return CLIPVisionModel(cfg).eval()


BUILDERS = {"timm": tiny_timm, "dinov2": tiny_dinov2, "clip": tiny_clip}


def _hook_ids(model):
    """`(module, kind, hook id)` of every hook on `model` (vlm_tools' and anyone else's)."""
    return [(name, kind, hid) for name, kinds in hook_snapshot(model).items() for kind, ids in kinds.items()
            for hid in ids]


def pixels(b=2, size=32, seed=0):
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------------------ TTA


def test_plan_is_seeded_fps_with_identity_view():
    plan = tta.sample_plan(37, 37, n_views=10, shift_frac=0.15, seed=3)
    assert plan.offsets.shape == (10, 2) and plan.flips.shape == (10,)
    assert plan.offsets[0].tolist() == [0, 0] and not plan.flips[0]
    assert int(plan.offsets.abs().max()) <= round(0.15 * 37) == 6
    assert len({tuple(o) for o in plan.offsets.tolist()}) == 10  # farthest points are distinct
    again = tta.sample_plan(37, 37, n_views=10, shift_frac=0.15, seed=3)
    assert torch.equal(plan.offsets, again.offsets) and torch.equal(plan.flips, again.flips)
    other = tta.sample_plan(37, 37, n_views=10, shift_frac=0.15, seed=4)
    assert not torch.equal(plan.offsets, other.offsets)
    # FPS spreads the views: the closest pair is farther apart than in a random draw of the same pool
    d = torch.cdist(plan.offsets.float(), plan.offsets.float()) + torch.eye(10) * 1e9
    assert float(d.min()) >= 2.0


@pytest.mark.parametrize("patch", [8, 14])
def test_views_carry_their_source_cells_and_shift_back_exactly(patch):
    """Index test: a view's cell (r, c) shows original cell source_index[r, c]; merging restores every cell."""
    gh, gw = 5, 6
    plans = [tta.sample_plan(gh, gw, n_views=6, shift_frac=0.4, seed=s) for s in (0, 1)]
    assert any(p.flips.any() for p in plans)
    rows = torch.arange(gh).repeat_interleave(patch).view(-1, 1).expand(gh * patch, gw * patch)
    cols = torch.arange(gw).repeat_interleave(patch).view(1, -1).expand(gh * patch, gw * patch)
    img = torch.stack([rows.float(), cols.float(), torch.zeros_like(rows, dtype=torch.float32)])
    batch = torch.stack([img, img + 100.0 * torch.tensor([0.0, 0.0, 1.0]).view(3, 1, 1)])
    fill = (-7.0, -7.0, -7.0)
    views = tta.make_views(batch, plans, patch, fill)
    assert views.shape == (2 * 6, 3, gh * patch, gw * patch)

    def cell_features(x):  # mean over each patch: exact, since the pixels are constant within a patch
        return torch.nn.functional.avg_pool2d(x, patch).flatten(2).transpose(1, 2)

    feats = cell_features(views)  # (B*V, N, 3)
    for i, plan in enumerate(plans):
        src = tta.source_index(plan, gh, gw)
        for v in range(plan.num_views):
            f = feats[i * plan.num_views + v]
            valid = src[v] >= 0
            assert torch.equal(f[valid, 0], (src[v][valid] // gw).float())
            assert torch.equal(f[valid, 1], (src[v][valid] % gw).float())
            assert torch.all(f[~valid] == -7.0)  # shifted-in area is the fill value
    merged, counts = tta.merge_views(feats, plans, gh, gw)
    ident = cell_features(batch)
    assert torch.equal(merged, ident)  # every view's cells went back to their original positions
    assert counts.min() >= 1 and counts[:, 0].max() <= 6


def test_fill_is_white_in_normalised_units():
    model = tiny_dinov2()
    spec = get_tower(model).spec
    plan = tta.ViewPlan(offsets=torch.tensor([[0, 0], [1, -2]]), flips=torch.tensor([False, True]))
    views = tta.make_views(pixels(1), [plan], spec.patch_size, spec.white())
    mean, std = torch.tensor(spec.mean).view(3, 1), torch.tensor(spec.std).view(3, 1)
    top = views[1, :, 0, :].reshape(3, -1)  # first pixel row of view 1 was shifted in
    assert torch.allclose(top * std + mean, torch.ones_like(top), atol=1e-6)


@pytest.mark.parametrize("family", ["timm", "dinov2"])
def test_tta_denoise_single_view_is_the_plain_forward(family):
    model = BUILDERS[family]()
    x = pixels()
    one = tta.tta_denoise(model, x, n_views=1)
    with torch.no_grad():
        ref = get_tower(model).patch_tokens(x)
    assert torch.equal(one.features, ref.float()) and torch.all(one.counts == 1)
    many = tta.tta_denoise(model, x, n_views=4, shift_frac=0.5, seed=1, chunk_size=3)
    assert many.features.shape == ref.shape and many.counts.max() > 1


# -------------------------------------------------------------------------------------------------------- student


@pytest.mark.parametrize("family", ["timm", "dinov2", "clip"])
def test_student_output_has_teacher_shape_and_layout(family):
    teacher = BUILDERS[family]()
    x = pixels()
    s = student.build_student(teacher, student.StudentConfig(num_registers=5))
    with torch.no_grad():
        t_out = get_tower(teacher).patch_tokens(x)
        s_out = s(x)
    assert s_out.shape == t_out.shape == (2, 16, 32)
    assert not torch.equal(s_out, t_out)  # registers take part in attention
    if family == "timm":
        assert s.mode == "native" and s.vit.num_prefix_tokens == 6 and teacher.num_prefix_tokens == 1
    else:
        assert s.mode == "hook"
        with torch.no_grad():
            out = s.vit(pixel_values=x, output_hidden_states=True, output_attentions=family == "dinov2")
        assert out.last_hidden_state.shape[1] == 17  # CLS + 16 patches: registers stripped
        assert all(h.shape[1] == 17 for h in out.hidden_states)
        full = get_tower(s.vit).tokens(x, block=-1)
        assert full.shape[1] == 17 + 5  # inside the model the registers sit at the END


def test_native_timm_student_matches_timm_reg_tokens_construction():
    import timm

    teacher = tiny_timm()
    s = student.build_student(teacher, student.StudentConfig(num_registers=4))
    ref = timm.create_model("test_vit", pretrained=False, img_size=32, patch_size=8, embed_dim=32, depth=3,
                            num_heads=2, num_classes=0, reg_tokens=4).eval()
    ours = s.vit.state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in ref.state_dict().items()}
    ref.load_state_dict(ours)
    x = pixels()
    with torch.no_grad():
        assert torch.equal(ref.forward_features(x), s.vit.forward_features(x))
    assert torch.equal(s.vit.pos_embed[:, 1:5], torch.zeros(1, 4, 32))  # new rows start at zero
    assert not any(n == "reg_token" for n, _ in teacher.named_parameters())  # teacher untouched


def test_trainable_groups_and_frozen_rest():
    teacher = tiny_dinov2()
    s = student.build_student(teacher, student.StudentConfig(num_registers=2, unlock=("registers", "pos_embed")))
    names = set(s.trainable_named_parameters())
    assert names == {"registers", "embeddings.position_embeddings"}
    assert {n for n, p in s.vit.named_parameters() if p.requires_grad} == {"embeddings.position_embeddings"}
    s2 = student.build_student(teacher, student.StudentConfig(num_registers=2, unlock_last_blocks=2, target_block=1))
    blocks = {n.split(".")[2] for n in s2.trainable_named_parameters() if n.startswith("encoder.layer.")}
    assert blocks == {"0", "1"}  # the two blocks ending at the target block
    with pytest.raises(ValueError, match="unknown unlock group"):
        student.StudentConfig(unlock=("registers", "everything"))
    with pytest.raises(IndexError):
        student.build_student(teacher, student.StudentConfig(target_block=7))
    with pytest.raises(TypeError, match="supported"):
        student.build_student(torch.nn.Linear(3, 3))


@pytest.mark.parametrize("family", ["timm", "dinov2"])
def test_only_unlocked_parameters_change(family):
    teacher = BUILDERS[family]()
    s = student.build_student(teacher, student.StudentConfig(num_registers=3))
    params = s.freeze_for_training()
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=1e-2)
    spec = s.base_spec
    x = pixels()
    plans = [tta.sample_plan(4, 4, 3, 0.3, seed=i) for i in range(2)]
    for _ in range(2):
        with torch.no_grad():
            target, _ = tta.tta_features(lambda v: get_tower(teacher).patch_tokens(v), x, plans, spec.patch_size,
                                         spec.white())
        loss, _, _ = distill_loss(s(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    base = dict(teacher.named_parameters())
    changed = set()
    for name, p in s.vit.named_parameters():
        if name == "reg_token":
            continue
        ref = base[name]
        if name == "pos_embed" and p.shape != ref.shape:  # native registers: compare the original rows
            p = torch.cat([p[:, :1], p[:, 1 + 3:]], dim=1)
        if not torch.equal(p, ref):
            changed.add(name)
    expected = set(s.trainable_named_parameters()) - {"registers"}
    assert changed == expected
    assert not torch.equal(s.get_registers(), student.build_student(teacher, s.config).get_registers())


def test_register_hooks_remove_restores_bitwise_and_leave_no_hooks():
    model = tiny_dinov2()
    x = pixels()
    with torch.no_grad():
        model(pixel_values=x, output_hidden_states=True)  # let transformers install its own capture hooks first
        before = model(pixel_values=x, output_hidden_states=True)
    snap = sorted(_hook_ids(model))
    regs = torch.nn.Parameter(torch.randn(1, 4, 32))
    handle = student.attach_registers(model, regs)
    assert handle.active and len(sorted(_hook_ids(model))) == len(snap) + 2
    assert sorted(find_hooks(model)) == [("", "forward"), ("embeddings", "forward")]  # marked: find_hooks sees them
    with torch.no_grad():
        during = model(pixel_values=x, output_hidden_states=True)
    assert during.last_hidden_state.shape == before.last_hidden_state.shape
    assert not torch.equal(during.last_hidden_state, before.last_hidden_state)
    handle.remove()
    handle.remove()  # idempotent
    with torch.no_grad():
        after = model(pixel_values=x, output_hidden_states=True)
    assert torch.equal(after.last_hidden_state, before.last_hidden_state)
    assert all(torch.equal(a, b) for a, b in zip(after.hidden_states, before.hidden_states))
    assert sorted(_hook_ids(model)) == snap
    # an exception inside the forward still leaves the model clean when used as a context manager
    with pytest.raises(ValueError), student.attach_registers(model, regs):
        model(pixel_values=torch.randn(1, 4, 32, 32))  # wrong channel count raises inside the forward
    assert sorted(_hook_ids(model)) == snap
    with pytest.raises(TypeError, match="native"):
        student.attach_registers(tiny_timm(), regs)
    with pytest.raises(ValueError, match="shape"):
        student.attach_registers(model, torch.nn.Parameter(torch.randn(1, 4, 31)))


def test_student_remove_hooks_gives_the_teacher_back():
    teacher = tiny_clip()
    s = student.build_student(teacher, student.StudentConfig(num_registers=2))
    x = pixels()
    s.remove_hooks()
    s.remove_hooks()
    assert not s.hooks_active
    with torch.no_grad():
        assert torch.equal(s(x), get_tower(teacher).patch_tokens(x))


@pytest.mark.parametrize("family", ["timm", "dinov2"])
def test_export_round_trip_and_errors(tmp_path, family):
    teacher = BUILDERS[family]()
    s = student.build_student(teacher, student.StudentConfig(num_registers=3, init_seed=5))
    with torch.no_grad():
        for p in s.trainable_named_parameters().values():
            p.add_(0.01)
    student.save_student(s, tmp_path / "exp")
    assert not list((tmp_path / "exp").glob("*.tmp"))
    loaded = student.load_student(tmp_path / "exp", teacher)
    x = pixels()
    with torch.no_grad():
        assert torch.equal(loaded(x), s.eval()(x))
    other = BUILDERS["timm" if family == "dinov2" else "dinov2"]()
    with pytest.raises(student.StudentFormatError, match="student_config.json"):
        student.load_student(tmp_path / "exp", other)
    (tmp_path / "exp" / student.STUDENT_WEIGHTS).write_bytes(b"not safetensors")
    with pytest.raises(student.StudentFormatError, match=student.STUDENT_WEIGHTS):
        student.load_student(tmp_path / "exp", teacher)
    with pytest.raises(student.StudentFormatError, match="not found"):
        student.load_student(tmp_path / "missing", teacher)


# ------------------------------------------------------------------------------------------------------ artifacts


def test_loss_is_one_minus_cos_plus_mse():
    s = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    t = torch.tensor([[[1.0, 0.0], [2.0, 0.0]]])
    loss, cos_term, mse = distill_loss(s, t)
    assert cos_term.item() == pytest.approx(0.5)
    assert mse.item() == pytest.approx((0 + 0 + 4 + 4) / 4)
    assert loss.item() == pytest.approx(0.5 + 2.0)
    z = torch.zeros(1, 2, 2)
    assert torch.isfinite(distill_loss(z, z)[0])


def test_outlier_rules():
    norms = torch.tensor([[1.0, 1.1, 0.9, 1.0, 1.05, 0.95, 9.0, 1.0]])
    assert outlier_ids(norms, "mad") == [6]
    assert outlier_ids(norms, "ratio", k=3.0) == [6]
    assert outlier_ids(norms, "fixed", threshold=1.06) == [1, 6]
    with pytest.raises(ValueError, match="threshold"):
        artifacts.outlier_mask(norms, "fixed")
    with pytest.raises(ValueError, match="unknown"):
        artifacts.outlier_mask(norms, "otsu")


def outlier_ids(norms, rule, k=5.0, threshold=None):
    return torch.nonzero(artifacts.outlier_mask(norms, rule, k, threshold)[0]).flatten().tolist()


@pytest.mark.parametrize("family", ["timm", "dinov2", "clip"])
def test_cls_attention_recompute_matches_eager(family):
    if family == "timm":
        model = tiny_timm()
    else:
        model = BUILDERS[family](attn="eager")
    x = pixels()
    m = artifacts.measure_artifacts(model, x, block=1, sink_block=1, tta_views=0)
    if family == "timm":
        attn = model.blocks[1].attn
        attn.fused_attn = False  # per instance, restored below
        store = {}
        h = attn.attn_drop.register_forward_hook(lambda mod, a, o: store.setdefault("a", o))
        try:
            with torch.no_grad():
                model.forward_features(x)
        finally:
            h.remove()
            attn.fused_attn = True
        ref = store["a"]
    else:
        with torch.no_grad():
            ref = model(pixel_values=x, output_attentions=True).attentions[1]
    torch.testing.assert_close(m.cls_attention, ref.mean(1)[:, 0, 1:].reshape(2, 4, 4), atol=1e-6, rtol=1e-5)
    assert m.tta_residual is None and m.norms.shape == (2, 4, 4)


def test_planted_outliers_are_flagged_and_student_tokens_are_scored_without_registers():
    model = tiny_timm(img_size=64)
    x = pixels(4, 64)
    clean = artifacts.measure_artifacts(model, x, block=-1, tta_views=0)
    planted = synthetic.plant_position_outliers(model, x, cells=[5, 20, 42], block=1, trigger_scale=1.5)
    m = artifacts.measure_artifacts(model, x, block=-1, tta_views=3)
    flagged = {int(i) for i in torch.nonzero(m.outliers.flatten(1).any(0)).flatten()}
    assert flagged == set(planted.cells)
    assert float(m.outliers.float().mean()) == pytest.approx(3 / 64)
    assert float(clean.outliers.float().mean()) == 0.0
    s = student.build_student(model, student.StudentConfig(num_registers=2))
    ms = artifacts.measure_artifacts(s, x, block=-1, tta_views=0)
    assert ms.norms.shape == m.norms.shape  # registers are not scored as patches
    summary = artifacts.summarize([m])
    assert summary["outlier_rate"] == pytest.approx(3 / 64) and summary["max_over_median"] > 10
    assert "tta_residual" in summary
