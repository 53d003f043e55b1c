"""Registers inside a VLM: `vlm_tools.wrap(llava, "registers", student=PATH)`, alone and stacked with a pruner."""

from __future__ import annotations

import pytest
import torch

import vlm_tools
from vlm_tools.core.adapters import get_adapter
from vlm_tools.core.hooks import find_hooks, hook_snapshot
from vlm_tools.registers import student as st
from vlm_tools.testing import TinyCase


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=["clip", "dinov2"])
def case(request, tmp_path_factory):
    """A tiny LLaVA, a trained-looking student export of its tower, and the base outputs."""
    tiny = TinyCase("llava", request.param)
    tower = get_adapter(tiny.model).vision_tower
    student = st.build_student(tower, st.StudentConfig(num_registers=3, init_seed=1))
    with torch.no_grad():  # pretend it was distilled: every exported tensor differs from the base
        for p in student.trainable_named_parameters().values():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    path = tmp_path_factory.mktemp(f"reg-{request.param}") / "student"
    st.save_student(student, path)
    with torch.no_grad():
        tiny.model(**tiny.singles[0])  # let transformers install its output-capturing hooks first
        base = tiny.model(**tiny.singles[0]).logits
    return tiny, path, base, hook_snapshot(tiny.model)


def _projector_inputs(model):
    store = []
    h = get_adapter(model).projector.register_forward_hook(lambda m, a, o: store.append(a[0].detach()))
    return store, h


def test_tower_runs_with_the_distilled_student_and_unwrap_restores(case):
    tiny, path, base, snap = case
    model = tiny.model
    ad = get_adapter(model)
    tower = ad.vision_tower
    params_before = {n: p for n, p in tower.named_parameters()}
    wrapped = vlm_tools.wrap(model, "registers", student=str(path))
    store, h = _projector_inputs(model)
    try:
        with torch.no_grad():
            out = wrapped(**tiny.singles[0]).logits
    finally:
        h.remove()
    assert out.shape == base.shape and not torch.equal(out, base)
    trace = wrapped.last_trace
    assert trace.tokens_after == trace.tokens_before == [ad.n_patches]
    # reference: the exported student on a copy of the tower, read at LLaVA's feature layer
    ref_student = st.load_student(path, tower)
    pv = tiny.singles[0]["pixel_values"]
    with torch.no_grad():
        hs = ref_student.vit(pixel_values=pv, output_hidden_states=True).hidden_states[ad.feature_layer]
    torch.testing.assert_close(store[0], hs[:, ad.n_prefix:], atol=1e-6, rtol=1e-6)
    # outside wrapped calls the tower is the base one
    assert {n: p for n, p in tower.named_parameters()} == params_before
    with wrapped.disabled(), torch.no_grad():
        assert torch.equal(wrapped(**tiny.singles[0]).logits, base)
    with torch.no_grad():
        assert torch.equal(model(**tiny.singles[0]).logits, base)
    assert wrapped.unwrap() is model
    wrapped.unwrap()
    assert find_hooks(model) == [] and hook_snapshot(model) == snap
    assert all(p is params_before[n] for n, p in tower.named_parameters())
    with torch.no_grad():
        assert torch.equal(model(**tiny.singles[0]).logits, base)


def test_stacks_with_a_pruner_and_registers_are_never_selected(case):
    tiny, path, _base, snap = case
    with vlm_tools.attached(tiny.model, [("registers", {"student": str(path)}), ("cls_topk", {"keep": 5})]) as w:
        with torch.no_grad():
            w(**tiny.batch)
            seq = w.generate(**tiny.singles[1], max_new_tokens=2, do_sample=False)
        assert w.method.name == "cls_topk"
        for kept in w.last_trace.kept:
            for k in kept:
                assert k.numel() == 5 and int(k.max()) < get_adapter(tiny.model).n_patches
    assert seq.shape[1] == tiny.singles[1]["input_ids"].shape[1] + 2
    assert find_hooks(tiny.model) == [] and hook_snapshot(tiny.model) == snap


def test_exception_inside_the_tower_leaves_the_base_tower(case):
    tiny, path, base, snap = case
    tower = get_adapter(tiny.model).vision_tower
    originals = {n: p for n, p in tower.named_parameters()}
    layers = tower.encoder.layers if hasattr(tower.encoder, "layers") else tower.encoder.layer

    def boom(*_a, **_k):
        raise RuntimeError("boom inside the tower")

    wrapped = vlm_tools.wrap(tiny.model, "registers", student=str(path))
    bad = layers[0].register_forward_pre_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom"), torch.no_grad():
            wrapped(**tiny.singles[0])
    finally:
        bad.remove()
    with torch.no_grad():  # a direct call while still wrapped puts the base parameters back first
        assert torch.equal(tiny.model(**tiny.singles[0]).logits, base)
    wrapped.unwrap()
    assert all(p is originals[n] for n, p in tower.named_parameters())
    assert hook_snapshot(tiny.model) == snap


def test_bad_exports_raise_clear_errors(case, tmp_path):
    tiny, _path, _base, snap = case
    with pytest.raises(FileNotFoundError, match="student_config.json"):
        vlm_tools.wrap(tiny.model, "registers", student=str(tmp_path / "nope"))
    import timm

    vit = timm.create_model("test_vit", pretrained=False, img_size=32, patch_size=4, embed_dim=32, depth=4,
                            num_heads=4, num_classes=0)
    st.save_student(st.build_student(vit, st.StudentConfig(num_registers=2)), tmp_path / "timm")
    with pytest.raises(st.StudentFormatError, match="does not fit"):
        vlm_tools.wrap(tiny.model, "registers", student=str(tmp_path / "timm"))
    assert find_hooks(tiny.model) == [] and hook_snapshot(tiny.model) == snap


def test_distill_the_tower_of_a_saved_llava_then_wrap(tmp_path):
    """End to end: `hf:<llava folder>` loads only its tower; distil at LLaVA's feature block; wrap with the export."""
    from PIL import Image

    from vlm_tools.registers import backbones, distill

    tiny = TinyCase("llava", "dinov2")
    tiny.model.save_pretrained(str(tmp_path / "llava"))
    tower = backbones.load_backbone(f"hf:{tmp_path / 'llava'}")
    ref = get_adapter(tiny.model).vision_tower.state_dict()
    assert tower.state_dict().keys() == ref.keys()
    assert all(torch.equal(v, ref[k]) for k, v in tower.state_dict().items())
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        Image.fromarray((torch.rand(40, 40, 3) * 255).byte().numpy()).save(images / f"{i}.png")
    ad = get_adapter(tiny.model)
    cfg = distill.DistillConfig(backbone=f"hf:{tmp_path / 'llava'}", images=str(images), out=str(tmp_path / "run"),
                                batch_size=2, n_views=2, num_registers=2, max_steps=2, target_block=ad.feature_block,
                                checkpoint_every=2)
    summary = distill.run_distillation(cfg, progress=False)
    with vlm_tools.attached(tiny.model, "registers", student=summary.student_dir) as wrapped, torch.no_grad():
        out = wrapped(**tiny.singles[0]).logits
    assert torch.isfinite(out).all()


class _Boom(RuntimeError):
    pass


def _boom(*_a, **_k):
    raise _Boom("raised mid-forward")


@pytest.mark.parametrize("stage", ["vision_block", "projector", "llm"])
def test_state_dict_is_the_base_one_right_after_an_exception(case, stage):
    """Issue 13.4: an exception anywhere in a wrapped call must not leave the student's tensors installed."""
    tiny, path, _base, snap = case
    model = tiny.model
    ad = get_adapter(model)
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    params = {n: p for n, p in model.named_parameters()}
    where = {"vision_block": ad.tower.blocks[0], "projector": ad.projector, "llm": ad.lm_layers[0]}[stage]
    wrapped = vlm_tools.wrap(model, "registers", student=str(path))
    bad = where.register_forward_pre_hook(_boom)
    try:
        with pytest.raises(_Boom), torch.no_grad():
            wrapped(**tiny.singles[0])
        state = model.state_dict()  # still wrapped: what save_pretrained() would write now
        assert state.keys() == ref.keys()
        assert [k for k in ref if not torch.equal(state[k], ref[k])] == []
        assert all(p is params[n] for n, p in model.named_parameters())
    finally:
        bad.remove()
        wrapped.unwrap()
    assert hook_snapshot(model) == snap


def test_concurrent_wrapped_and_plain_calls_each_see_their_own_tower(case):
    """The parameter swap is shared by all threads: a plain call in another thread must not restore the base weights
    in the middle of a wrapped call (nor a wrapped call swap the student in under a plain one)."""
    import threading

    tiny, path, base, _ = case
    model = tiny.model
    inputs = tiny.singles[0]
    with vlm_tools.attached(model, "registers", student=str(path)) as wrapped:
        with torch.no_grad():
            ref = wrapped(**inputs).logits
        errors: list[str] = []

        def run(call, expected, what):
            for i in range(25):
                with torch.no_grad():
                    out = call(**inputs).logits
                if not torch.equal(out, expected):
                    errors.append(f"{what} call {i}")

        threads = [threading.Thread(target=run, args=(wrapped, ref, "wrapped")),
                   threading.Thread(target=run, args=(model, base, "plain"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []
    assert find_hooks(model) == []
