"""tam / arc / msea on tiny models: shapes, exact scale-1 equality, same token ids at every scale, ECI / RBO / rank
filter against independent hand computations, batching, pruned cells, hook hygiene."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vlm_tools._registry import get_explainer, list_methods
from vlm_tools.core.hooks import find_hooks
from vlm_tools.core.wrapped import SequenceLayout, wrap
from vlm_tools.interpret import logit_lens
from vlm_tools.interpret.base import ExplainContext, ExplainSample
from vlm_tools.interpret.forcing import generate_answers
from vlm_tools.interpret.methods import msea as msea_mod
from vlm_tools.testing import PROMPTS, TinyCase, make_images

CASES = ["llava-clip", "llava-dinov2", "llava_next-clip"]


def _ctx(wrapped, processor, images, prompts, answers=None):
    if answers is None:
        answers = generate_answers(wrapped, processor, images, prompts, max_new_tokens=4)
    assert all(len(a) > 0 for a in answers)
    samples = [ExplainSample(im, p, a, torch.arange(len(a))) for im, p, a in zip(images, prompts, answers)]
    return ExplainContext(wrapped, processor, samples)


@pytest.fixture(scope="module", params=CASES)
def case(request):
    kind, vision = request.param.split("-")
    tc = TinyCase(kind, vision)
    wrapped = wrap(tc.model, "none")
    try:
        yield tc, wrapped
    finally:
        wrapped.unwrap()


def _run(name, ctx, **cfg):
    info = get_explainer(name)
    return info.cls(info.config_cls(**cfg)).attribute(ctx)


def test_registered():
    assert {"tam", "arc", "msea"} <= {m.name for m in list_methods("explain")}


@pytest.mark.parametrize("name", ["tam", "arc", "msea"])
def test_maps_on_frame_and_finite(case, name, one_thread):
    tc, wrapped = case
    ctx = _ctx(wrapped, tc.processor, make_images(), PROMPTS)
    out = _run(name, ctx)
    frames = ctx.frames()
    assert len(out) == 2
    for s, attr in enumerate(out):
        frame = attr.frame if name == "msea" else frames[s]
        t = len(ctx.samples[s].targets)
        assert attr.maps.shape == (t, frame.rows, frame.cols)
        assert bool(torch.isfinite(attr.maps).all())
        assert float(attr.maps.min()) >= 0 and float(attr.maps.max()) <= 1
        n_text = ExplainContext.text_positions(ctx.clean.layouts[s]).numel()
        assert attr.text.shape == (t, n_text) and bool(torch.isfinite(attr.text).all())
        assert len(attr.scores["prob"]) == t
    if name == "msea":
        f0 = frames[0]
        assert out[0].frame.shape == (2 * f0.rows, 2 * f0.cols)


def test_msea_single_scale_equals_tam(case, one_thread):
    tc, wrapped = case
    ctx = _ctx(wrapped, tc.processor, make_images(), PROMPTS)
    for weighting, other, cfg in [("tam", "tam", {}), ("irrelevance", "arc", {"variant": "irrelevance"}),
                                  ("relevance", "arc", {"variant": "relevance"})]:
        ms = _run("msea", ctx, scales=(1.0,), weighting=weighting)
        ref = _run(other, ctx, **cfg)
        for a, b in zip(ms, ref):
            assert torch.equal(a.maps, b.maps)
            assert torch.equal(a.text, b.text)
            assert a.scores["prob"] == b.scores["prob"]


def test_every_scale_same_token_ids(case, one_thread):
    tc, wrapped = case
    ctx = _ctx(wrapped, tc.processor, make_images(), PROMPTS)
    passes = msea_mod.scale_passes(ctx, (1.0, 1.5, 2.0))
    real = tc.kind == "llava" and tc.vision == "dinov2"
    assert msea_mod.interpolates(ctx.adapter) == real
    for sp in passes:
        for r, owner in enumerate(sp.sample):
            want = ctx.samples[owner].answer_ids
            assert torch.equal(sp.forced.answer_ids[r], want)
            assert torch.equal(sp.forced.layouts[r].ids[sp.forced.answer_positions[r]].long(), want)
        per_sample = [sp.sample.count(s) for s in range(2)]
        if real or sp.scale == 1.0:
            assert per_sample == [1, 1]
        else:
            assert per_sample == [4, 4]  # ceil(s)^2 tiles
    if real:  # 8x8 -> 12x12 -> 16x16 at real resolution
        assert [sp.frames[0].shape for sp in passes] == [(8, 8), (12, 12), (16, 16)]


# -- hand computations ---------------------------------------------------------------------------------------------

def _hand_context(layout, apos, q, skip):
    """(token position, score position) pairs, written as an explicit loop."""
    first = int(apos[0])
    last_image = max(p for p in range(len(layout.ids)) if int(layout.kind[p]) == SequenceLayout.VISUAL)
    pairs = []
    for p in range(len(layout.ids)):
        if int(layout.kind[p]) != SequenceLayout.TEXT:
            continue
        if last_image < p < first - 1 and int(layout.ids[p]) not in skip:
            pairs.append((p, p))
        elif p in [int(a) for a in apos] and p < q:
            pairs.append((p, p - 1))
    return pairs


def _hand_map(logits, frame, cls):
    """Raw map on a LLaVA-1.5 unpruned frame: cell k holds the k-th patch position."""
    m = torch.zeros(frame.rows * frame.cols, dtype=torch.float64)
    for i, pos in enumerate(frame.positions.tolist()):
        cell = int(torch.nonzero(frame.cells[i])[0])
        m[cell] = max(0.0, float(logits[pos, cls]))
    return m


def _hand_minmax(m):
    lo, hi = float(m.min()), float(m.max())
    return (m - lo) / (hi - lo) if hi > lo else m * 0


def _hand_rbo(a, b, p):
    total = 0.0
    for d in range(1, len(a) + 1):
        total += p ** (d - 1) * len(set(a[:d]) & set(b[:d])) / d
    return (1 - p) * total


@pytest.mark.parametrize("weighting", ["tam", "irrelevance", "relevance"])
def test_eci_and_arc_weights_equal_hand_computation(weighting, one_thread):
    tc = TinyCase("llava", "clip")
    wrapped = wrap(tc.model, "none")
    try:
        ctx = _ctx(wrapped, tc.processor, make_images()[:1], PROMPTS[:1])
        forced, frame = ctx.clean, ctx.frames()[0]
        layout, apos, ids = forced.layouts[0], forced.answer_positions[0], forced.answer_ids[0]
        skip = logit_lens.special_ids(tc.processor)
        logits = forced.logits[0].double()
        text_pos = ExplainContext.text_positions(layout).tolist()
        got = logit_lens.token_maps(forced, 0, frame, torch.arange(len(ids)), weighting=weighting,
                                    use_filter=False, skip=skip)
        for t in range(len(ids)):
            q, c = int(apos[t]), int(ids[t])
            top_t = torch.topk(logits[q - 1], 50).indices.tolist()
            a_t = _hand_map(logits, frame, c)
            weights, maps, text = [], [], [0.0] * len(text_pos)
            for tok, score in _hand_context(layout, apos, q, skip):
                base = max(0.0, float(logits[score, c]))
                r = _hand_rbo(torch.topk(logits[score], 50).indices.tolist(), top_t, 0.9)
                w = {"tam": base, "irrelevance": (1 - r) * base, "relevance": r}[weighting]
                text[text_pos.index(tok)] = w
                if int(layout.ids[tok]) != c:
                    weights.append(w)
                    maps.append(_hand_map(logits, frame, int(layout.ids[tok])))
            total = sum(weights) + 1e-8
            e = torch.zeros_like(a_t)
            for w, m in zip(weights, maps):
                e += (w / total) * m
            s = float((a_t * e).sum() / (e * e).sum()) if float((e * e).sum()) > 0 else 0.0
            want = torch.clamp(a_t - s * e, min=0)
            assert got.scale[t] == pytest.approx(s, rel=1e-4, abs=1e-6)
            torch.testing.assert_close(got.maps[t].flatten().double(), _hand_minmax(want), atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(got.text[t].double(), torch.tensor(text, dtype=torch.float64), atol=1e-5,
                                       rtol=1e-4)
            assert got.prob[t] == pytest.approx(float(torch.softmax(logits[q - 1], -1)[c]), rel=1e-5)
    finally:
        wrapped.unwrap()


def test_eci_small_example():
    target = torch.tensor([[4.0, 0.0], [2.0, 1.0]])
    ctx = torch.stack([torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([[0.0, 0.0], [0.0, 2.0]])])
    out, s = logit_lens.eci(target, ctx, torch.tensor([3.0, 1.0]))
    # E = 0.75 * A1 + 0.25 * A2 = [[.75, 0], [.75, .5]]; s = (3 + 1.5 + .5) / (.5625 + .5625 + .25)
    e = np.array([[0.75, 0.0], [0.75, 0.5]])
    s_ref = (4 * 0.75 + 2 * 0.75 + 1 * 0.5) / (0.75 ** 2 * 2 + 0.25)
    assert float(s) == pytest.approx(s_ref, rel=1e-5)
    np.testing.assert_allclose(out.numpy(), np.maximum(target.numpy() - s_ref * e, 0), rtol=1e-5, atol=1e-6)
    out, s = logit_lens.eci(target, torch.zeros(2, 2, 2), torch.tensor([0.0, 0.0]))
    assert float(s) == 0 and torch.equal(out, target)


def test_rbo_equals_hand_loop():
    g = torch.Generator().manual_seed(0)
    b = torch.randperm(200, generator=g)[:50]
    rows = [torch.randperm(200, generator=g)[:50] for _ in range(5)] + [b.clone(), b.flip(0)]
    got = logit_lens.rbo(torch.stack(rows), b, 0.9)
    for row, value in zip(rows, got):
        assert float(value) == pytest.approx(_hand_rbo(row.tolist(), b.tolist(), 0.9), rel=1e-5, abs=1e-7)
    assert float(got[5]) == pytest.approx(1 - 0.9 ** 50, rel=1e-6)  # identical lists: the truncated maximum
    assert float(logit_lens.rbo(torch.arange(3), torch.tensor([5, 6, 7]))) == 0.0


def _hand_rank_filter(img):
    """TAM's filter as an explicit loop (reflect padding), constant windows -> their value."""
    pad = np.pad(img, 1, mode="reflect")
    ax = np.arange(9) - 4
    out = np.zeros_like(img)
    for i in range(img.shape[0]):
        for j in range(img.shape[1]):
            win = np.sort(pad[i:i + 3, j:j + 3].flatten())
            mean = win.mean()
            if mean <= 0:
                continue
            sigma = win.std() / mean
            if sigma == 0:
                out[i, j] = win[4]
                continue
            k = np.exp(-(ax ** 2) / (2 * sigma ** 2))
            out[i, j] = (win * k / k.sum()).sum()
    return out


def test_rank_gaussian_filter_hand_example():
    rng = np.random.default_rng(0)
    img = rng.random((5, 6))
    img[0:3, 0:3] = 0.0  # zero windows
    img[3:, 3:] = 0.5  # constant windows
    got = logit_lens.rank_gaussian_filter(torch.tensor(img, dtype=torch.float32)).numpy()
    np.testing.assert_allclose(got, _hand_rank_filter(img), rtol=1e-5, atol=1e-6)
    assert got[0, 0] == 0.0 and got[4, 5] == pytest.approx(0.5)
    const = logit_lens.rank_gaussian_filter(torch.full((2, 4, 4), 3.0))
    assert torch.allclose(const, torch.full((2, 4, 4), 3.0))
    assert torch.equal(logit_lens.rank_gaussian_filter(torch.zeros(3, 3)), torch.zeros(3, 3))
    one_row = logit_lens.rank_gaussian_filter(torch.tensor([[1.0, 2.0, 0.0]]))
    assert bool(torch.isfinite(one_row).all())


def test_minmax_constant_and_pruned():
    assert torch.equal(logit_lens.minmax(torch.ones(2, 3, 3)), torch.zeros(2, 3, 3))
    pruned = torch.zeros(2, 2, dtype=torch.bool)
    pruned[0, 0] = True
    out = logit_lens.minmax(torch.tensor([[9.0, 1.0], [2.0, 3.0]]), pruned)
    torch.testing.assert_close(out, torch.tensor([[0.0, 0.0], [0.5, 1.0]]))


# -- batching, pruning, hooks, errors --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["tam", "arc", "msea"])
def test_batch_equals_single_calls(case, name, one_thread):
    tc, wrapped = case
    images = make_images()
    batch_ctx = _ctx(wrapped, tc.processor, images, PROMPTS)
    batch = _run(name, batch_ctx)
    for s in range(2):
        single_ctx = _ctx(wrapped, tc.processor, images[s:s + 1], PROMPTS[s:s + 1],
                          answers=[batch_ctx.samples[s].answer_ids])
        single = _run(name, single_ctx)[0]
        assert single.maps.shape == batch[s].maps.shape
        torch.testing.assert_close(single.maps, batch[s].maps, atol=2e-3, rtol=0)
        torch.testing.assert_close(single.text, batch[s].text, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("name", ["tam", "msea"])
def test_pruned_model_maps_are_zero_on_pruned_cells(case, name, one_thread):
    tc, _ = case
    pruned = wrap(TinyCase(tc.kind, tc.vision).model, "cls_topk", keep=4)
    try:
        ctx = _ctx(pruned, tc.processor, make_images(), PROMPTS)
        out = _run(name, ctx)
        frames = ctx.frames()
        for s, attr in enumerate(out):
            frame = attr.frame if attr.frame is not None else frames[s]
            assert attr.maps.shape[1:] == frame.shape
            assert bool(frame.pruned.any()) and not bool(frame.pruned.all())
            assert bool(torch.isfinite(attr.maps).all())
            assert float(attr.maps[:, frame.pruned].abs().max()) == 0.0
    finally:
        pruned.unwrap()


class _Boom(RuntimeError):
    pass


def _raise_on_second(counter, module, args, output):
    counter.append(1)
    if len(counter) == 2:
        raise _Boom("inside a forced pass")


def test_no_hooks_left_after_call_and_exception(one_thread):
    import functools

    tc = TinyCase("llava", "dinov2")
    wrapped = wrap(tc.model, "none")
    try:
        before = sorted(find_hooks(tc.model))
        ctx = _ctx(wrapped, tc.processor, make_images(), PROMPTS)
        for name in ("tam", "arc", "msea"):
            _run(name, ctx)
            assert sorted(find_hooks(tc.model)) == before
        ctx = _ctx(wrapped, tc.processor, make_images(), PROMPTS, answers=ctx.answers)
        layer = ctx.adapter.lm_layers[-1]
        handle = layer.register_forward_hook(functools.partial(_raise_on_second, []))
        try:
            with pytest.raises(_Boom):
                _run("msea", ctx)  # the clean pass runs, the scale-1.5 pass raises inside the model
        finally:
            handle.remove()
        assert sorted(find_hooks(tc.model)) == before
    finally:
        wrapped.unwrap()
    assert find_hooks(tc.model) == []


def test_config_errors():
    info = get_explainer("msea")
    with pytest.raises(ValueError, match=r"0\.0.*-1"):
        info.config_cls(scales=(1.0, 0.0, -1))
    with pytest.raises(ValueError, match="one weight per scale"):
        info.config_cls(scales=(1.0, 2.0), weights=(1.0,))
    with pytest.raises(ValueError, match="weighting"):
        info.config_cls(weighting="bogus")
    cfg = info.config_cls.from_dict({"scales": "1;2", "weighting": "tam"}, cast=True)
    assert cfg.scales == (1.0, 2.0)
    with pytest.raises(ValueError, match="variant"):
        get_explainer("arc").config_cls(variant="bogus")
    # the defaults chosen by benchmarks/explain_eval.py (RESULTS.md, explain_eval): relevance-gated ARC weights
    assert get_explainer("arc").config_cls().variant == "relevance"
    assert info.config_cls().weighting == "relevance" and info.config_cls().scales == (1.0, 1.5, 2.0)


def test_tiled_scale_below_one_is_refused(tiny_llava, one_thread):
    wrapped = wrap(tiny_llava.model, "none")
    try:
        ctx = _ctx(wrapped, tiny_llava.processor, make_images()[:1], PROMPTS[:1])
        with pytest.raises(ValueError, match="scale 0.5"):
            _run("msea", ctx, scales=(0.5, 1.0))
        assert sorted(find_hooks(tiny_llava.model)) == sorted(find_hooks(wrapped.model))
    finally:
        wrapped.unwrap()
    assert find_hooks(tiny_llava.model) == []


def test_tile_rects_cover_the_box():
    rects = msea_mod.tile_rects((10.0, 0.0, 50.0, 40.0), (60, 40), 1.5)
    assert len(rects) == 4 and rects[0][:2] == (10, 0) and rects[-1][2:] == (50, 40)
    assert all(math.isclose(r[2] - r[0], 40 / 1.5, abs_tol=1) for r in rects)
