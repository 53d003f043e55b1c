"""vlm_tools.interpret.metrics: each metric against an independently written reference (explicit loops)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vlm_tools.core.hooks import find_hooks
from vlm_tools.interpret import metrics
from vlm_tools.interpret.explanation import Explanation
from vlm_tools.interpret.forcing import generate_answers, teacher_force
from vlm_tools.interpret.frame import image_frame
from vlm_tools.testing import PROMPTS, TinyCase, make_images


# ----------------------------------------------------------------------------------------------- references
def ref_bilinear(grid, box, image_size, size):
    """Bilinear resize of a grid spanning `box` (pixels of `image_size`) to `size` pixels; border values are clamped,
    0 outside the box: written pixel by pixel."""
    rows, cols = grid.shape
    w_img, h_img = image_size
    w, h = size
    x0, y0, x1, y1 = box
    out = np.zeros((h, w))
    for i in range(h):
        y = (i + 0.5) * h_img / h
        for j in range(w):
            x = (j + 0.5) * w_img / w
            if not (x0 <= x <= x1 and y0 <= y <= y1):
                continue
            fy = min(max((y - y0) / (y1 - y0) * rows - 0.5, 0.0), rows - 1)
            fx = min(max((x - x0) / (x1 - x0) * cols - 0.5, 0.0), cols - 1)
            r0, c0 = math.floor(fy), math.floor(fx)
            r1, c1 = min(r0 + 1, rows - 1), min(c0 + 1, cols - 1)
            ay, ax = fy - r0, fx - c0
            out[i, j] = ((1 - ay) * ((1 - ax) * grid[r0, c0] + ax * grid[r0, c1])
                         + ay * ((1 - ax) * grid[r1, c0] + ax * grid[r1, c1]))
    return out


def ref_first_argmax(pix):
    best, where = -math.inf, None
    for i in range(pix.shape[0]):
        for j in range(pix.shape[1]):
            if pix[i, j] > best:
                best, where = pix[i, j], (i, j)
    return where


def ref_otsu(values, nbins=256):
    """Otsu over a `nbins` histogram of the value range: the split maximising w0 * w1 * (mu0 - mu1)^2, by a loop."""
    v = np.asarray(values, dtype=np.float64).ravel()
    lo, hi = v.min(), v.max()
    if lo == hi:
        return lo
    width = (hi - lo) / nbins
    counts = [0] * nbins
    for x in v:
        counts[min(int((x - lo) / width), nbins - 1)] += 1
    centers = [lo + (k + 0.5) * width for k in range(nbins)]
    best, thr = -1.0, None
    for split in range(nbins - 1):
        w0 = sum(counts[: split + 1])
        w1 = sum(counts[split + 1:])
        if w0 == 0 or w1 == 0:
            continue
        mu0 = sum(c * x for c, x in zip(counts[: split + 1], centers[: split + 1])) / w0
        mu1 = sum(c * x for c, x in zip(counts[split + 1:], centers[split + 1:])) / w1
        var = w0 * w1 * (mu0 - mu1) ** 2
        if var > best * (1 + 1e-9):
            best, thr = var, centers[split]
    return thr


def ref_iou(pix, mask, thr):
    inter = union = 0
    for a, b in zip((pix > thr).ravel().tolist(), mask.ravel().tolist()):
        inter += a and b
        union += a or b
    return inter / union


def ref_trapezoid(x, y):
    return sum((x[k + 1] - x[k]) * (y[k] + y[k + 1]) / 2 for k in range(len(x) - 1))


def make_explanation(case, maps_fn, n_tokens=2, seed=0, image_index=0):
    """An Explanation of the tiny model's greedy answer with maps from `maps_fn(rng, T, rows, cols)`."""
    image = make_images()[image_index]
    prompt = PROMPTS[0]
    answer = generate_answers(case.model, case.processor, [image], [prompt], max_new_tokens=n_tokens)[0]
    assert answer.numel() == n_tokens
    clean = teacher_force(case.model, case.processor, [image], [prompt], [answer], hidden_states=False)
    from vlm_tools.core.adapters import get_adapter

    frame = image_frame(get_adapter(case.model), case.processor.image_processor, clean.layouts[0], image.size,
                        clean.trace.grid)
    maps = maps_fn(np.random.default_rng(seed), n_tokens, frame.rows, frame.cols)
    tokens = [case.processor.tokenizer.decode([int(t)]) for t in answer]
    return Explanation(method="synthetic", config={}, prompt=prompt, answer="".join(tokens), answer_ids=answer.numpy(),
                       answer_tokens=tokens, targets=np.arange(n_tokens), tokens=tokens, maps=maps,
                       pruned=frame.pruned.numpy(), text_tokens=[], text_relevance=np.zeros((n_tokens, 0)),
                       box=frame.box, image_size=image.size, image=image), frame


def ref_curves(case, expl, frame, row, steps):
    """Deletion / insertion probabilities by one teacher-forced pass per point, masked positions found by loops."""
    values = expl.maps[row].ravel().tolist()
    pruned = expl.pruned.ravel().tolist()
    visible = [c for c in range(len(values)) if not pruned[c]]
    order = sorted(visible, key=lambda c: (-values[c], c))
    n = len(order)
    cover = frame.cells.tolist()
    pos = frame.positions.tolist()
    answer = torch.from_numpy(expl.answer_ids)
    clean = teacher_force(case.model, case.processor, [expl.image], [expl.prompt], [answer], hidden_states=False)
    kinds = clean.layouts[0].kind.tolist()
    every = [p for p, k in enumerate(kinds) if k == 2]  # SequenceLayout.VISUAL, newlines included
    out = {"deletion": [], "insertion": []}
    xs = []
    for k in range(steps + 1):
        c = round(k * n / steps)
        xs.append(c / n)
        chosen = set(order[:c])
        for kind, probs in out.items():
            masked = []
            for p, cells in zip(pos, cover):
                covered = [cell for cell, on in enumerate(cells) if on]
                if kind == "deletion" and any(cell in chosen for cell in covered):
                    masked.append(p)
                if kind == "insertion" and any(cell not in chosen for cell in covered):
                    masked.append(p)
            if (kind == "deletion" and c == n) or (kind == "insertion" and c == 0):
                masked = every  # no cell left: the image-masked condition
            forced = teacher_force(case.model, case.processor, [expl.image], [expl.prompt], [answer],
                                   hidden_states=False, mask_positions=[torch.tensor(masked, dtype=torch.long)])
            lp = torch.log_softmax(forced.logits[0, forced.answer_positions[0] - 1], -1)
            t = int(expl.targets[row])
            probs.append(math.exp(float(lp[t, int(answer[t])])))
    return xs, out


# ------------------------------------------------------------------------------------------------ pure metrics
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_otsu_numpy_equals_skimage_and_the_loop(seed):
    rng = np.random.default_rng(seed)
    values = np.concatenate([rng.normal(0.2, 0.05, 300), rng.normal(0.7, 0.1, 200)]).astype(np.float32)
    np_thr = metrics.otsu_threshold_numpy(values)
    skimage = pytest.importorskip("skimage.filters")
    assert np_thr == float(skimage.threshold_otsu(values.astype(np.float64)))
    assert metrics.otsu_threshold(values) == np_thr
    assert np_thr == pytest.approx(ref_otsu(values), abs=1e-9)
    assert metrics.otsu_threshold_numpy(np.full(7, 0.3)) == pytest.approx(0.3)


def test_map_on_mask_is_bilinear_over_the_box():
    rng = np.random.default_rng(0)
    grid = rng.random((3, 5))
    box = (-4.0, 2.0, 36.0, 22.0)
    got = metrics.map_on_mask(grid, np.zeros((12, 16), bool), box=box, image_size=(32, 24))
    np.testing.assert_allclose(got, ref_bilinear(grid, box, (32, 24), (16, 12)), atol=1e-5)
    # no box: the grid spans the whole mask
    got = metrics.map_on_mask(grid, np.zeros((9, 10), bool))
    np.testing.assert_allclose(got, ref_bilinear(grid, (0, 0, 10, 9), (10, 9), (10, 9)), atol=1e-5)


@pytest.mark.parametrize("seed", range(4))
def test_pointing_game_and_obj_iou_match_the_references(seed):
    rng = np.random.default_rng(seed)
    grid = rng.random((4, 4))
    mask = np.zeros((32, 32), bool)
    r, c = rng.integers(0, 24, 2)
    mask[r:r + 9, c:c + 12] = True
    pix = ref_bilinear(grid, (0, 0, 32, 32), (32, 32), (32, 32))
    i, j = ref_first_argmax(pix)
    assert metrics.pointing_game(grid, mask) == bool(mask[i, j])
    assert metrics.obj_iou(grid, mask) == pytest.approx(ref_iou(pix, mask, ref_otsu(pix)), abs=1e-9)


def test_pointing_game_hand_cases():
    grid = np.zeros((4, 4))
    grid[1, 2] = 1.0  # cell (1, 2) covers pixels rows 16..31, cols 32..47 of a 64 x 64 mask
    mask = np.zeros((64, 64), bool)
    mask[16:32, 32:48] = True
    assert metrics.pointing_game(grid, mask)
    assert not metrics.pointing_game(grid, ~mask)
    # ties: the first maximum in row-major order (a constant map points at the top-left pixel)
    corner = np.zeros((64, 64), bool)
    corner[0, 0] = True
    assert metrics.pointing_game(np.ones((4, 4)), corner)
    assert not metrics.pointing_game(np.ones((4, 4)), ~corner)
    # a map equal to the mask has IoU 1; a constant map binarises to nothing
    assert metrics.obj_iou(mask.astype(float), mask) == 1.0
    assert metrics.obj_iou(np.ones((4, 4)), mask) == 0.0
    with pytest.raises(ValueError, match="empty"):
        metrics.pointing_game(grid, np.zeros((64, 64), bool))
    with pytest.raises(ValueError, match="2-D"):
        metrics.obj_iou(grid, np.zeros((2, 64, 64), bool))
    with pytest.raises(ValueError, match="finite"):
        metrics.obj_iou(np.full((4, 4), np.nan), mask)


def test_explanation_maps_go_through_maps_in_pixels():
    rng = np.random.default_rng(3)
    maps = rng.random((2, 3, 3)).astype(np.float32)
    box = (-10.0, 0.0, 50.0, 40.0)  # a pad-to-square frame over a 40 x 40 image
    expl = Explanation(method="m", config={}, prompt="p", answer="a b", answer_ids=np.array([5, 6]),
                       answer_tokens=["a", " b"], targets=np.array([0, 1]), tokens=["a", " b"], maps=maps,
                       pruned=np.zeros((3, 3), bool), text_tokens=[], text_relevance=np.zeros((2, 0)), box=box,
                       image_size=(40, 40))
    mask = np.zeros((20, 20), bool)
    mask[2:9, 11:18] = True
    for token, row in ((0, 0), (1, 1), (" b", 1)):
        pix = ref_bilinear(maps[row].astype(np.float64), box, (40, 40), (20, 20))
        np.testing.assert_allclose(metrics.map_on_mask(expl, mask, token=token), pix, atol=1e-5)
        i, j = ref_first_argmax(pix)
        assert metrics.pointing_game(expl, mask, token=token) == bool(mask[i, j])
        assert metrics.obj_iou(expl, mask, token=token) == pytest.approx(ref_iou(pix, mask, ref_otsu(pix)),
                                                                         abs=1e-9)
    with pytest.raises(IndexError, match="2 explained tokens"):
        metrics.pointing_game(expl, mask, token=2)
    with pytest.raises(KeyError):
        metrics.pointing_game(expl, mask, token="zz")


# ------------------------------------------------------------------------------------------- through the model
@pytest.fixture(scope="module", params=["llava", "llava_next"])
def case(request):
    return TinyCase(request.param)


def test_deletion_insertion_curves_match_single_passes(case, one_thread):
    expl, frame = make_explanation(case, lambda rng, t, r, c: rng.random((t, r, c)).astype(np.float32))
    steps = 4
    res = metrics.faithfulness_curves(expl, case.model, case.processor, steps=steps)
    assert res.tokens == [0, 1] and res.deletion.shape == (2, steps + 1) and res.insertion.shape == (2, steps + 1)
    assert res.n_cells == int((~frame.pruned).sum())
    for row in range(2):
        xs, ref = ref_curves(case, expl, frame, row, steps)
        np.testing.assert_allclose(res.fractions, xs)
        for kind in ("deletion", "insertion"):
            got = getattr(res, kind)[row]
            np.testing.assert_allclose(got, ref[kind], rtol=1e-4, atol=1e-6)
            assert getattr(res, f"{kind}_auc")[row] == pytest.approx(ref_trapezoid(xs, ref[kind]), rel=1e-4)
    # end points: the clean probability and the image fully masked
    answer = torch.from_numpy(expl.answer_ids)
    clean = teacher_force(case.model, case.processor, [expl.image], [expl.prompt], [answer], hidden_states=False)
    gone = teacher_force(case.model, case.processor, [expl.image], [expl.prompt], [answer], hidden_states=False,
                         mask_images=True)
    p_clean = clean.answer_logprobs()[0].exp().numpy()
    p_gone = gone.answer_logprobs()[0].exp().numpy()
    np.testing.assert_allclose(res.deletion[:, 0], p_clean, rtol=1e-4)
    np.testing.assert_allclose(res.deletion[:, -1], p_gone, rtol=1e-4)
    np.testing.assert_allclose(res.insertion[:, 0], p_gone, rtol=1e-4)
    np.testing.assert_allclose(res.insertion[:, -1], p_clean, rtol=1e-4)
    one = metrics.deletion_auc(expl, case.model, case.processor, token=1, steps=steps)
    assert one == pytest.approx(float(res.deletion_auc[1]), rel=1e-5)
    ins = metrics.insertion_auc(expl, case.model, case.processor, token=0, steps=steps)
    assert ins == pytest.approx(float(res.insertion_auc[0]), rel=1e-5)
    assert find_hooks(case.model) == []


def test_a_map_on_a_finer_grid_is_area_averaged_onto_the_frame(tiny_llava, one_thread):
    coarse, _ = make_explanation(tiny_llava, lambda rng, t, r, c: rng.random((t, r, c)).astype(np.float32),
                                     n_tokens=1)
    fine = np.repeat(np.repeat(coarse.maps, 2, axis=1), 2, axis=2)
    fine_expl = Explanation(**{**coarse.__dict__, "maps": fine, "pruned": np.zeros(fine.shape[1:], bool)})
    a = metrics.faithfulness_curves(coarse, tiny_llava.model, tiny_llava.processor, steps=3)
    b = metrics.faithfulness_curves(fine_expl, tiny_llava.model, tiny_llava.processor, steps=3)
    np.testing.assert_allclose(a.deletion, b.deletion)
    np.testing.assert_allclose(a.insertion, b.insertion)


def test_faithfulness_bad_input(tiny_llava):
    expl, _ = make_explanation(tiny_llava, lambda rng, t, r, c: rng.random((t, r, c)).astype(np.float32),
                               n_tokens=1)
    m, p = tiny_llava.model, tiny_llava.processor
    with pytest.raises(ValueError, match="steps"):
        metrics.faithfulness_curves(expl, m, p, steps=0)
    with pytest.raises(ValueError, match="kinds"):
        metrics.faithfulness_curves(expl, m, p, kinds=("erase",))
    no_image = Explanation(**{**expl.__dict__, "image": None})
    with pytest.raises(TypeError, match="image="):
        metrics.deletion_auc(no_image, m, p)
    with pytest.raises(ValueError, match="image size"):
        metrics.deletion_auc(expl, m, p, image=make_images()[1])
    moved = Explanation(**{**expl.__dict__, "box": (5.0, 5.0, 20.0, 20.0)})
    with pytest.raises(ValueError, match="pixel box"):
        metrics.insertion_auc(moved, m, p)
    assert find_hooks(m) == []
