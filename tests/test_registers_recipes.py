"""Registers: PH-Reg's CLIP recipe (NACLIP teacher, value-readout student; issue 14.2) and the modifier's feature-layer
warning (issue 14.5)."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import vlm_tools
from vlm_tools.core.adapters import get_adapter, get_tower
from vlm_tools.core.hooks import HookHandle, find_hooks
from vlm_tools.registers import clip_recipe, distill, student
from vlm_tools.testing import TinyCase

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_clip():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                           patch_size=8, image_size=32, attn_implementation="eager")
    return CLIPVisionModel(cfg).eval()


def pixels(b=2, size=32, seed=0):
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


def hand_omega(gh, gw, n_tokens, std):
    """NACLIP's window written out: CLS row/column 0, patches exp(-squared grid distance / (2 std^2))."""
    omega = torch.zeros(n_tokens, n_tokens)
    for p in range(gh * gw):
        for q in range(gh * gw):
            (i, j), (k, m) = divmod(p, gw), divmod(q, gw)
            omega[1 + p, 1 + q] = math.exp(-((i - k) ** 2 + (j - m) ** 2) / (2 * std ** 2))
    return omega


def hand_key_key(h, q_free_layer, std, grid, heads):
    """Key-key attention of an HF CLIP layer, from its weights: softmax(k k^T / sqrt(d) + Omega) v, then out_proj."""
    attn = q_free_layer.self_attn
    y = q_free_layer.layer_norm1(h)
    b, t, d_model = y.shape
    d = d_model // heads
    k = (y @ attn.k_proj.weight.T + attn.k_proj.bias).view(b, t, heads, d).transpose(1, 2)
    v = (y @ attn.v_proj.weight.T + attn.v_proj.bias).view(b, t, heads, d).transpose(1, 2)
    logits = k @ k.transpose(-1, -2) / math.sqrt(d) + hand_omega(*grid, t, std)
    probs = torch.softmax(logits, -1)
    merged = (probs @ v).transpose(1, 2).reshape(b, t, d_model)
    return merged @ attn.out_proj.weight.T + attn.out_proj.bias, probs


@pytest.mark.parametrize("std", [5.0, 0.7])
def test_naclip_teacher_last_block_is_hand_written_key_key_attention(std):
    model = tiny_clip()
    x = pixels()
    with torch.no_grad():
        out = model(pixel_values=x, output_hidden_states=True)
        plain = model.post_layernorm(out.last_hidden_state)
        h = out.hidden_states[-2]  # the input of the last block
        layer = model.encoder.layers[-1]
        ref_out, ref_probs = hand_key_key(h, layer, std, (4, 4), heads=2)
        ref = model.post_layernorm(ref_out)  # no residual, no MLP, then ln_post on every token
        ours_out, probs = clip_recipe.naclip_attention(layer.self_attn, layer.self_attn.out_proj,
                                                       layer.layer_norm1(h), (4, 4), 1, std, return_probs=True)
        torch.testing.assert_close(probs, ref_probs, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(ours_out, ref_out, atol=1e-5, rtol=1e-5)
        with HookHandle("test") as handle:
            clip_recipe.attach_naclip_teacher(model, handle, std=std)
            assert len(find_hooks(model)) == 2
            teacher = get_tower(model).tokens(x, None)
        torch.testing.assert_close(teacher, ref, atol=1e-5, rtol=1e-5)
        assert find_hooks(model) == []
        assert torch.equal(get_tower(model).tokens(x, None), plain)  # removed: the plain tower again
        no_window, _ = hand_key_key(h, layer, 1e9, (4, 4), heads=2)  # the window matters
        assert not torch.allclose(model.post_layernorm(no_window.float()), ref, atol=1e-4)
    with pytest.raises(ValueError, match="std must be positive"):
        clip_recipe.attach_naclip_teacher(model, HookHandle(), std=0.0)


def test_clip_student_reads_only_the_value_path_of_its_last_block():
    teacher = tiny_clip()
    s = student.build_student(teacher, student.StudentConfig(num_registers=3, recipe="clip"))
    x = pixels()
    store = {}
    layer = s.vit.encoder.layers[-1]
    h = layer.register_forward_pre_hook(lambda m, a: store.update({"in": a[0]}))
    try:
        out = s(x)
    finally:
        h.remove()
    hin = store["in"]
    assert hin.shape[1] == 17 + 3  # registers are in the sequence (at the end)
    attn = layer.self_attn
    value = attn.out_proj(attn.v_proj(layer.layer_norm1(hin)))  # per token: no mixing, residual or MLP
    ref = s.vit.post_layernorm(value)[:, 1:17]
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    out.pow(2).mean().backward()
    grads = {n: p.grad for n, p in s.vit.named_parameters() if n.startswith("encoder.layers.2.")}
    assert all(grads[f"encoder.layers.2.{k}"] is not None and grads[f"encoder.layers.2.{k}"].abs().sum() > 0
               for k in ("layer_norm1.weight", "self_attn.v_proj.weight", "self_attn.out_proj.weight"))
    assert all(grads[f"encoder.layers.2.{k}"] is None  # never used: AdamW skips them (no weight decay either)
               for k in ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "mlp.fc1.weight"))
    s.remove_hooks()
    with torch.no_grad():
        torch.testing.assert_close(s(x), get_tower(teacher).patch_tokens(x), atol=0, rtol=0)


def test_timm_clip_recipe_projects_with_the_head_and_uses_fused_qkv_rows():
    import timm

    torch.manual_seed(0)
    vit = timm.create_model("test_vit", pretrained=False, img_size=32, patch_size=8, embed_dim=32, depth=2,
                            num_heads=2, num_classes=8).eval()
    x = pixels()
    s = student.build_student(vit, student.StudentConfig(num_registers=2, recipe="clip"))
    with torch.no_grad():
        assert s(x).shape == (2, 16, 8)  # head = the projection of dense features
        feats = vit.forward_features(x)  # plain
        blk = vit.blocks[-1]
        store = {}
        hook = blk.register_forward_pre_hook(lambda m, a: store.update({"in": a[0]}))
        vit.forward_features(x)
        hook.remove()
        y = blk.norm1(store["in"])
        w, bias = blk.attn.qkv.weight, blk.attn.qkv.bias
        k = (y @ w[32:64].T + bias[32:64]).view(2, 17, 2, 16).transpose(1, 2)
        v = (y @ w[64:].T + bias[64:]).view(2, 17, 2, 16).transpose(1, 2)
        probs = torch.softmax(k @ k.transpose(-1, -2) / 4.0 + hand_omega(4, 4, 17, 5.0), -1)
        ref = blk.attn.proj((probs @ v).transpose(1, 2).reshape(2, 17, 32))
        ref = vit.head(vit.norm(ref))[:, 1:]
        with HookHandle() as handle:
            clip_recipe.attach_naclip_teacher(vit, handle)
            ours = clip_recipe.dense_projection(vit)(get_tower(vit).patch_tokens(x))
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
        assert torch.equal(vit.forward_features(x), feats)
    assert not clip_recipe.is_clip_tower(vit)  # test_vit: not CLIP by name, the recipe is opt-in


def test_recipe_resolution():
    from transformers import Dinov2Config, Dinov2Model

    clip = tiny_clip()
    dino = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
                                    patch_size=8, image_size=32)).eval()
    assert clip_recipe.resolve_recipe("auto", clip, None) == "clip"
    assert clip_recipe.resolve_recipe("auto", clip, 1) == "plain"  # a feature block (LLaVA): plain
    assert clip_recipe.resolve_recipe("auto", dino, None) == "plain"
    assert clip_recipe.resolve_recipe("plain", clip, None) == "plain"
    with pytest.raises(ValueError, match="target_block"):
        clip_recipe.resolve_recipe("clip", clip, 1)
    with pytest.raises(TypeError, match="CLIP recipe needs"):
        clip_recipe.resolve_recipe("clip", dino, None)
    with pytest.raises(ValueError, match="recipe"):
        distill.DistillConfig(backbone="timm:x", out="o", images="i", recipe="clip", target_block=1)
    with pytest.raises(ValueError, match="unknown recipe"):
        student.StudentConfig(recipe="naclip")


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray((np.kron(rng.random((10, 10, 3)), np.ones((4, 4, 1))) * 255).astype(np.uint8)).save(
            root / f"{i}.png")
    return root


@pytest.mark.parametrize("recipe", ["auto", "plain"])
def test_a_clip_job_records_its_recipe_in_the_export(tmp_path, image_dir, recipe):
    folder = tmp_path / "clip"
    tiny_clip().save_pretrained(str(folder))
    cfg = distill.DistillConfig(backbone=f"hf:{folder}", images=str(image_dir), out=str(tmp_path / "run"),
                                batch_size=2, n_views=2, num_registers=2, max_steps=2, checkpoint_every=2, lr=1e-3,
                                recipe=recipe)
    summary = distill.run_distillation(cfg, progress=False)
    meta = json.loads((tmp_path / "run" / "student" / student.STUDENT_CONFIG).read_text())
    expected = "clip" if recipe == "auto" else "plain"
    assert meta["recipe"] == meta["student"]["recipe"] == meta["extra"]["recipe"] == expected
    assert meta["extra"]["teacher"]["kind"] == ("naclip" if expected == "clip" else "plain")
    if expected == "clip":
        assert meta["extra"]["teacher"]["gaussian_std"] == 5.0 and meta["extra"]["teacher"]["projection"] is False
    base = tiny_clip()
    loaded = student.load_student(summary.student_dir, base)
    from vlm_tools.registers import checkpoint

    ref = checkpoint.student_from_checkpoint(summary.checkpoint, base)
    with torch.no_grad():
        assert torch.equal(loaded(pixels()), ref(pixels()))
    assert loaded.config.recipe == expected and find_hooks(base) == []


# --------------------------------------------------------------------------------------- 14.5 the modifier


@pytest.fixture(scope="module")
def llava_clip():
    return TinyCase("llava", "clip")


def _export(tower, path, **cfg):
    s = student.build_student(tower, student.StudentConfig(num_registers=2, **cfg))
    student.save_student(s, path)
    s.remove_hooks()
    return path


def test_the_modifier_warns_when_the_export_was_distilled_at_another_block(llava_clip, tmp_path):
    model = llava_clip.model
    ad = get_adapter(model)
    right = _export(ad.vision_tower, tmp_path / "right", target_block=ad.feature_block)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning for the matching block
        vlm_tools.wrap(model, "registers", student=str(right)).unwrap()
    final = _export(ad.vision_tower, tmp_path / "final")
    with pytest.warns(UserWarning, match=rf"final normalised output.*reads vision block {ad.feature_block}"):
        vlm_tools.wrap(model, "registers", student=str(final)).unwrap()
    other = _export(ad.vision_tower, tmp_path / "other", target_block=0)
    with pytest.warns(UserWarning, match=rf"block 0.*--target-block {ad.feature_block}"):
        vlm_tools.wrap(model, "registers", student=str(other)).unwrap()
    clip = _export(ad.vision_tower, tmp_path / "clip", recipe="clip")
    with pytest.raises(student.StudentFormatError, match="CLIP recipe.*--recipe plain"):
        vlm_tools.wrap(model, "registers", student=str(clip))
    assert find_hooks(model) == []
