"""`vlm_tools.explain(...)`: assembly of Explanations, bad input, hooks, batching, pruning, and `vlm-tools explain`."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import vlm_tools
from vlm_tools import _registry
from vlm_tools._registry import register_explainer
from vlm_tools.core.config import ConfigError
from vlm_tools.core.hooks import HookHandle, find_hooks
from vlm_tools.interpret.base import Attribution, ExplainConfig, Explainer
from vlm_tools.interpret.explanation import Explanation
from vlm_tools.interpret.frame import ImageFrame
from vlm_tools.testing import PROMPTS, make_images

pytestmark = pytest.mark.usefixtures("one_thread")

ANSWERS = ["bottom show red circle", "three are short"]


def expected_frame_shape(case, image) -> tuple[int, int]:
    """The map frame's shape, written from HF's own pieces: LLaVA-1.5 the patch grid; LLaVA-NeXT the stitched anyres
    tiles after HF's unpadding."""
    vcfg = case.model.config.vision_config
    g = vcfg.image_size // vcfg.patch_size
    if case.kind == "llava":
        return g, g
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

    nph, npw = get_anyres_image_grid_shape((image.height, image.width), case.model.config.image_grid_pinpoints,
                                           vcfg.image_size)
    return tuple(unpad_image(torch.zeros(1, nph * g, npw * g), (image.height, image.width)).shape[1:])


def test_maps_have_the_frame_shape_and_are_finite(tiny):
    imgs = make_images()
    for method in ("center", "random"):
        exps = vlm_tools.explain(tiny.model, tiny.processor, imgs, PROMPTS, method, max_new_tokens=3)
        assert isinstance(exps, list) and len(exps) == 2
        for exp, img in zip(exps, imgs):
            assert exp.maps.shape == (len(exp.tokens), *expected_frame_shape(tiny, img))
            assert exp.maps.dtype == np.float32 and np.isfinite(exp.maps).all()
            assert exp.pruned.shape == exp.maps.shape[1:] and not exp.pruned.any()
            assert exp.text_relevance.shape == (len(exp.tokens), len(exp.text_tokens))
            assert exp.tokens == exp.answer_tokens and exp.targets.tolist() == list(range(len(exp.answer_ids)))
            assert exp.image_size == img.size and exp.image is not None
            assert exp.metadata["method"] == method and exp.metadata["model"] == type(tiny.model).__name__
            assert set(exp.metadata["versions"]) == {"torch", "transformers", "vlm_tools"}
            if tiny.kind == "llava":
                assert exp.metadata["kept_tokens"] == [exp.maps.shape[1] * exp.maps.shape[2]]
            assert exp.metadata["time_ms"] > 0
    assert find_hooks(tiny.model) == []


def test_one_image_and_prompt_give_one_explanation(tiny_llava):
    exp = vlm_tools.explain(tiny_llava.model, tiny_llava.processor, make_images()[0], PROMPTS[0], "center",
                            answers=ANSWERS[0])
    assert isinstance(exp, Explanation)
    ids = tiny_llava.processor.tokenizer(ANSWERS[0], add_special_tokens=False)["input_ids"]
    assert exp.answer_ids.tolist() == ids and exp.answer == ANSWERS[0]
    assert exp.answer_tokens == ANSWERS[0].split()
    assert exp.metadata["answer_generated"] is False
    # the text tokens are the prompt's words (BOS included) and the answer, in order; no image placeholder
    assert exp.text_tokens[-len(ids):] == ANSWERS[0].split() and "<image>" not in exp.text_tokens
    assert np.all(exp.text_relevance == 0)  # center has no text branch


def test_center_is_a_gaussian_in_image_pixels(tiny_llava_next):
    """Explicit loop over the cells: pixel centre from the box, distance to the box centre, exp(-d^2 / 2s^2)."""
    img = make_images()[0]  # 60 x 40: non-square cells on LLaVA-NeXT's stitched frame
    sigma = 0.3
    exp = vlm_tools.explain(tiny_llava_next.model, tiny_llava_next.processor, img, PROMPTS[0], "center",
                            answers="red circle", sigma=sigma)
    rows, cols = exp.grid
    x0, y0, x1, y1 = exp.box
    s = sigma * min(x1 - x0, y1 - y0)
    ref = np.zeros((rows, cols))
    for r in range(rows):
        for c in range(cols):
            x = x0 + (c + 0.5) * (x1 - x0) / cols
            y = y0 + (r + 0.5) * (y1 - y0) / rows
            ref[r, c] = math.exp(-((x - (x0 + x1) / 2) ** 2 + (y - (y0 + y1) / 2) ** 2) / (2 * s * s))
    assert (x1 - x0) / cols != pytest.approx((y1 - y0) / rows)  # the cells are not square: pixels matter
    for t in range(len(exp.tokens)):
        np.testing.assert_allclose(exp.maps[t], ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("method, cfg", [("random", {"seed": 3}), ("center", {"sigma": 0.4})])
def test_a_batch_equals_single_calls(tiny, method, cfg):
    imgs = make_images()
    batch = vlm_tools.explain(tiny.model, tiny.processor, imgs, PROMPTS, method, answers=ANSWERS,
                              tokens=[[0, "circle"], None], **cfg)
    for s in range(2):
        one = vlm_tools.explain(tiny.model, tiny.processor, imgs[s], PROMPTS[s], method, answers=ANSWERS[s],
                                tokens=[0, "circle"] if s == 0 else None, **cfg)
        assert one.tokens == batch[s].tokens
        assert np.array_equal(one.maps, batch[s].maps)
        assert np.array_equal(one.text_relevance, batch[s].text_relevance)
        assert np.array_equal(one.pruned, batch[s].pruned)
    assert batch[0].tokens == ["bottom", "circle"]
    assert find_hooks(tiny.model) == []


def test_random_depends_on_seed_and_content_and_only_sees_earlier_text(tiny_llava):
    imgs = make_images()
    a = vlm_tools.explain(tiny_llava.model, tiny_llava.processor, imgs, PROMPTS, "random", answers=ANSWERS, seed=0)
    b = vlm_tools.explain(tiny_llava.model, tiny_llava.processor, imgs, PROMPTS, "random", answers=ANSWERS, seed=1)
    assert not np.array_equal(a[0].maps, b[0].maps)
    assert not np.array_equal(a[0].maps[:, :8, :8], a[1].maps[:, :8, :8])  # another sample, other values
    for exp in a:
        n_prompt = len(exp.text_tokens) - len(exp.answer_ids)
        for t, target in enumerate(exp.targets):  # relevance only for text before the explained token
            assert (exp.text_relevance[t, n_prompt + target:] == 0).all()
            assert (exp.text_relevance[t, : n_prompt + target] > 0).all()
        assert ((exp.maps >= 0) & (exp.maps < 1)).all()


def test_tokens_by_index_and_by_string(tiny_llava):
    args = (tiny_llava.model, tiny_llava.processor, make_images()[0], PROMPTS[0], "center")
    exp = vlm_tools.explain(*args, answers=ANSWERS[0], tokens=["red circle", -4])  # a run of two tokens + index
    assert exp.targets.tolist() == [0, 2, 3] and exp.tokens == ["bottom", "red", "circle"]
    assert exp.token_index("circle") == 2
    exp = vlm_tools.explain(*args, answers=ANSWERS[0], tokens="CIRCLE")  # case-insensitive fallback
    assert exp.targets.tolist() == [3]


def test_pruned_model_marks_the_pruned_cells(tiny_llava):
    m, proc = tiny_llava.model, tiny_llava.processor
    keep = 20
    with vlm_tools.attached(m, "cls_topk", keep=keep) as wrapped:
        hooks_before = find_hooks(m)
        exp = vlm_tools.explain(wrapped, proc, make_images()[0], PROMPTS[0], "random", answers=ANSWERS[0])
        kept = wrapped.last_trace.kept[0][0]
        assert find_hooks(m) == hooks_before  # the caller's wrapper stays as it was
    g = exp.grid
    ref = np.ones(g[0] * g[1], dtype=bool)
    ref[kept.numpy()] = False
    assert np.array_equal(exp.pruned, ref.reshape(g))
    assert int(exp.pruned.sum()) == g[0] * g[1] - keep
    assert (exp.maps[:, exp.pruned] == 0).all() and (exp.maps[:, ~exp.pruned] > 0).all()
    assert exp.metadata["kept_tokens"] == [keep] and exp.metadata["pruning"][0]["method"] == "cls_topk"
    assert find_hooks(m) == []


def test_pruned_llava_next_maps_are_zero_on_pruned_cells(tiny_llava_next):
    with vlm_tools.attached(tiny_llava_next.model, "cls_topk", keep=24) as wrapped:
        exp = vlm_tools.explain(wrapped, tiny_llava_next.processor, make_images()[1], PROMPTS[1], "center",
                                answers=ANSWERS[1])
    assert 0 < exp.pruned.sum() < exp.pruned.size
    assert (exp.maps[:, exp.pruned] == 0).all() and (exp.maps[:, ~exp.pruned] > 0).all()
    assert find_hooks(tiny_llava_next.model) == []


def test_bad_input_is_clear_and_leaves_no_hooks(tiny_llava, tmp_path):
    m, proc = tiny_llava.model, tiny_llava.processor
    imgs = make_images()
    bad = tmp_path / "broken_image.png"
    bad.write_bytes(b"not an image")
    kept = []  # the tracebacks stay alive (as in a notebook): hooks must be gone without garbage collection

    def check(exc, match, *args, **kwargs):
        with pytest.raises(exc, match=match) as raised:
            vlm_tools.explain(*args, **kwargs)
        kept.append(raised)
        assert find_hooks(m) == [], match

    check(TypeError, "unsupported model Linear.*supports", nn.Linear(2, 2), proc, imgs[0], PROMPTS[0], "center")
    # the method is checked before the image is read
    check(KeyError, "unknown explain method 'nope'.*center.*random", m, proc, bad, PROMPTS[0], "nope")
    check(ValueError, "broken_image.png", m, proc, [bad], [PROMPTS[0]], "center")
    check(ValueError, "2 images and 1 prompts", m, proc, imgs, PROMPTS[:1], "center")
    check(ValueError, "2 image placeholders", m, proc, imgs[0], "<image> <image> what", "center")
    # a plain question goes through the chat template, which the tiny processor lacks
    check(ValueError, "no image placeholder", m, proc, imgs[0], "what is it", "center")
    one = (m, proc, imgs[0], PROMPTS[0], "center")
    check(ValueError, r"token 'dog' is not in the answer.*\['bottom', 'show', 'red', 'circle'\]", *one,
          answers=ANSWERS[0], tokens=["circle", "dog"])
    check(ValueError, "token index 4 is outside the answer", *one, answers=ANSWERS[0], tokens=4)
    check(ConfigError, "unknown config field.*sigmaa.*valid fields: sigma", *one, sigmaa=1.0)
    check(ValueError, "sigma must be > 0.*-1", m, proc, imgs[0], PROMPTS[0], "center", sigma=-1.0)
    check(ValueError, "got 1 answers for 2 samples", m, proc, imgs, PROMPTS, "center", answers=["red"])
    check(ValueError, "max_new_tokens", m, proc, imgs[0], PROMPTS[0], "center", max_new_tokens=0)
    assert find_hooks(m) == []


def _register_probe(monkeypatch, attribute):
    """Register a throwaway explainer for this test only (the registry is restored afterwards)."""
    _registry.list_methods("explain")  # load the built-in methods into the real registry first
    monkeypatch.setattr(_registry, "_EXPLAINERS", dict(_registry._EXPLAINERS))

    @register_explainer("test_probe", config=ExplainConfig, description="test only")
    class Probe(Explainer):
        def attribute(self, ctx):
            return attribute(self, ctx)

    return Probe


def test_an_exception_inside_a_method_leaves_no_hooks(tiny, monkeypatch):
    m = tiny.model
    seen = []

    def attribute(self, ctx):
        assert ctx.clean.logits.shape[0] == 2  # a pass through the wrapper: its hooks are on the model now
        seen.append(len(find_hooks(m)))

        def boom(module, args):
            raise RuntimeError("boom inside a forward pass")

        with HookHandle("probe") as handle:
            handle.forward_pre_hook(ctx.adapter.language_model, boom)
            ctx.force(hidden_states=False)
        return []

    _register_probe(monkeypatch, attribute)
    with pytest.raises(RuntimeError, match="boom inside a forward pass") as raised:
        vlm_tools.explain(m, tiny.processor, make_images(), PROMPTS, "test_probe", answers=ANSWERS)
    assert seen and seen[0] > 0
    # the traceback (kept here, as a notebook keeps it) holds the call's frames: the hooks must be gone regardless
    assert raised.tb is not None and find_hooks(m) == []


def test_maps_on_another_frame_come_with_it(tiny_llava, monkeypatch):
    """A method whose maps lie on a finer frame (multi-scale) returns it as `Attribution.frame`: the Explanation
    takes its pruned cells and box; maps off the clean frame without it: a clear error."""
    give = []

    def attribute(self, ctx):
        out = []
        for sample, frame in zip(ctx.samples, ctx.frames()):
            t = int(sample.targets.numel())
            rows, cols = 2 * frame.rows, 2 * frame.cols
            pruned = torch.zeros(rows, cols, dtype=torch.bool)
            pruned[0, 0] = True
            fine = ImageFrame(rows=rows, cols=cols, positions=torch.zeros(0, dtype=torch.long),
                              weight=torch.zeros(rows * cols, 0), pruned=pruned,
                              cells=torch.zeros(0, rows * cols, dtype=torch.bool), box=(1.0, 2.0, 30.0, 40.0),
                              image_size=frame.image_size)
            maps = torch.ones(t, rows, cols)
            maps[:, pruned] = 0
            out.append(Attribution(maps=maps, frame=fine if give else None))
        return out

    _register_probe(monkeypatch, attribute)
    args = (tiny_llava.model, tiny_llava.processor, make_images()[0], PROMPTS[0], "test_probe")
    with pytest.raises(RuntimeError, match=r"\(16, 16\), not on the clean pass's frame.*Attribution.frame.*\(8, 8\)"):
        vlm_tools.explain(*args, answers=ANSWERS[0])
    give.append(True)
    exp = vlm_tools.explain(*args, answers=ANSWERS[0])
    assert exp.grid == (16, 16) and exp.pruned[0, 0] and exp.pruned.sum() == 1
    assert exp.box == (1.0, 2.0, 30.0, 40.0)
    assert find_hooks(tiny_llava.model) == []


def test_the_registry_is_restored_after_a_probe():
    assert "test_probe" not in [i.name for i in _registry.list_methods("explain")]


def test_methods_lists_the_explain_methods(capsys):
    from vlm_tools.cli import main

    assert main(["methods", "--kind", "explain"]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = {line.split()[0]: line.split()[1] for line in lines}
    assert {"center", "random"} <= set(names) and set(names.values()) == {"explain"}


def test_cli_explains_a_saved_model_folder(tiny_folder, tmp_path):
    from vlm_tools.cli import build_parser
    from vlm_tools.interpret.cli import explain_from_args

    img = tmp_path / "img.png"
    make_images()[0].save(img)
    args = build_parser().parse_args(
        ["explain", "--model", str(tiny_folder), "--image", str(img), "--prompt", PROMPTS[0], "--method", "random",
         "--answer", ANSWERS[0], "--tokens", "circle", "0", "--set", "seed=5", "--prune", "cls_topk", "--keep", "16",
         "--out", str(tmp_path / "out")])
    exp = explain_from_args(args)
    assert exp.tokens == ["bottom", "circle"] and exp.config == {"seed": 5}
    assert int(exp.pruned.sum()) == 64 - 16 and exp.metadata["model_path"] == str(tiny_folder)


def test_cli_writes_the_explanation_folder(tiny_folder, tmp_path, capsys):
    """`vlm-tools explain` end to end: the folder loads back as the Explanation the call made."""
    from vlm_tools.cli import build_parser, main
    from vlm_tools.interpret.cli import explain_from_args

    img = tmp_path / "img.png"
    make_images()[1].save(img)
    argv = ["explain", "--model", str(tiny_folder), "--image", str(img), "--prompt", PROMPTS[1], "--method",
            "center", "--max-new-tokens", "3", "--out", str(tmp_path / "out")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "answer:" in out and str(tmp_path / "out") in out
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"maps.npz", "explanation.json", "report.html", "summary.png"} <= files
    loaded = Explanation.load(tmp_path / "out")
    again = explain_from_args(build_parser().parse_args(argv))  # the same call in-process
    assert loaded.prompt == PROMPTS[1] == again.prompt
    assert loaded.tokens == again.tokens and np.array_equal(loaded.maps, again.maps)
    assert loaded.metadata["model_path"] == str(tiny_folder)


def test_cli_tiny_model_takes_a_plain_question(tmp_path):
    from vlm_tools.cli import build_parser
    from vlm_tools.interpret.cli import explain_from_args

    img = tmp_path / "img.png"
    make_images()[0].save(img)
    exp = explain_from_args(build_parser().parse_args(
        ["explain", "--model", "tiny_next", "--image", str(img), "--prompt", "what colour", "--method", "random",
         "--answer", "red", "--out", str(tmp_path / "out")]))
    assert exp.prompt == "<image> what colour" and exp.tokens == ["red"]
    assert exp.maps.shape[1:] == (10, 16)  # LLaVA-NeXT's stitched frame of the 60 x 40 image


def test_cli_bad_input_exits_2(tiny_folder, tmp_path, capsys):
    from vlm_tools.cli import main

    img = tmp_path / "img.png"
    make_images()[0].save(img)
    common = ["explain", "--model", str(tiny_folder), "--image", str(img), "--prompt", PROMPTS[0],
              "--out", str(tmp_path / "out")]
    for extra, msg in [(["--method", "nope"], "unknown explain method 'nope'"),
                       (["--method", "center", "--set", "sigma=zero"], "sigma='zero': expected a float"),
                       (["--method", "center", "--set", "sigma"], "--set expects key=value"),
                       (["--method", "center", "--keep", "8"], "need --prune"),
                       (["--method", "center", "--answer", "red", "--tokens", "dog"], "token 'dog' is not in")]:
        assert main(common + extra) == 2
        assert msg in capsys.readouterr().err


@pytest.mark.parametrize("entry", ["explain", "reliability", "similarity_points"])
def test_every_entry_point_reads_prompts_the_same_way(tiny_llava, entry):
    """explain, reliability and similarity_points share one prompt rule: a plain question goes through the chat
    template (`format_prompt`), a prompt must hold exactly one image placeholder."""
    import copy

    call = getattr(vlm_tools, entry)
    proc = copy.copy(tiny_llava.processor)
    image = make_images()[0]
    kwargs = {"query_token": "image"} if entry == "similarity_points" else {}
    with pytest.raises(ValueError, match="holds 2 image placeholders"):
        call(tiny_llava.model, proc, image, "<image> <image> what is it ?", **kwargs)
    with pytest.raises(ValueError, match="no chat template"):
        call(tiny_llava.model, proc, image, "what is in the image ?", **kwargs)
    proc.chat_template = "{% for m in messages %}USER : <image> {{ m['content'][1]['text'] }} ASSISTANT :{% endfor %}"
    plain = call(tiny_llava.model, proc, image, "what is in the image ?", max_new_tokens=2, **kwargs)
    formatted = call(tiny_llava.model, proc, image, "USER : <image> what is in the image ? ASSISTANT :",
                     max_new_tokens=2, **kwargs)
    if entry == "explain":
        assert plain.prompt == formatted.prompt and np.array_equal(plain.maps, formatted.maps)
    elif entry == "reliability":
        assert plain.to_dict() == formatted.to_dict()
    else:
        assert np.array_equal(np.asarray(plain.points), np.asarray(formatted.points))
    assert find_hooks(tiny_llava.model) == []
