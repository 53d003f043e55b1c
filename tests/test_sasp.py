"""READ similarity-as-points (vlm_tools.interpret.sasp): the map is a plain dot product on the image frame, the
points follow READ's thresholds / ordering / padding, sit in the cells they came from, and feed HF's SamModel."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import vlm_tools
from vlm_tools.cli import main
from vlm_tools.core.hooks import find_hooks
from vlm_tools.core.wrapped import SequenceLayout
from vlm_tools.interpret.forcing import teacher_force
from vlm_tools.interpret.frame import image_frame
from vlm_tools.interpret.sasp import Points, query_vector, refine_points, similarity_map_to_points, similarity_points
from vlm_tools.testing import PROMPTS, TinyCase

CASES = ["llava-clip", "llava-dinov2", "llava_next-clip"]
PROMPT = PROMPTS[0]  # "USER : <image> what is in the image ? ASSISTANT :"
ANSWER = "bottom show"


@pytest.fixture(scope="module", params=CASES)
def case(request) -> TinyCase:
    kind, vision = request.param.split("-")
    return TinyCase(kind, vision)


@pytest.fixture(scope="module")
def wide_image() -> Image.Image:
    """Non-square (60 x 40): LLaVA-1.5's centre crop cuts the sides, LLaVA-NeXT stitches tiles."""
    rng = np.random.default_rng(7)
    return Image.fromarray((rng.random((40, 60, 3)) * 255).astype("uint8"))


def _reference_pass(case, image, answer=ANSWER, model=None):
    ids = case.processor.tokenizer(answer, add_special_tokens=False)["input_ids"]
    forced = teacher_force(model or case.model, case.processor, [image], [PROMPT], [torch.tensor(ids)])
    return forced, forced.hidden_states[-1][0].float(), forced.layouts[0]


def _explicit_map(case, image, query_word="image", model=None):
    """The similarity map written out: the mean hidden state of the word's last occurrence, dot products position by
    position, placed on the grid by patch index (LLaVA-1.5) or averaged over the tokens covering a cell (NeXT)."""
    forced, h, lay = _reference_pass(case, image, model=model)
    word_id = case.processor.tokenizer.convert_tokens_to_ids(query_word)
    q = h[int(torch.nonzero(lay.ids == word_id).flatten()[-1])]
    adapter = (model.adapter if model is not None else vlm_tools.get_adapter(case.model))
    frame = image_frame(adapter, case.processor.image_processor, lay, image.size, forced.trace.grid)
    dots = {}
    for p in range(lay.ids.numel()):
        if int(lay.kind[p]) == SequenceLayout.VISUAL and int(lay.patch[p]) >= 0:
            dots[p] = sum(float(h[p, d]) * float(q[d]) for d in range(h.shape[1]))
    expected = torch.zeros(frame.rows, frame.cols, dtype=torch.float64)
    if case.kind == "llava":
        assert (frame.rows, frame.cols) == tuple(forced.trace.grid)
        for p, v in dots.items():
            r, c = divmod(int(lay.patch[p]), frame.cols)
            expected[r, c] = v
    else:
        pos = frame.positions.tolist()
        for cell in range(frame.rows * frame.cols):
            cover = [dots[pos[i]] for i in range(len(pos)) if bool(frame.cells[i, cell])]
            if cover:
                expected.view(-1)[cell] = sum(cover) / len(cover)
    return expected, frame


def test_similarity_map_equals_explicit_dot_product(case, wide_image, one_thread):
    pts = similarity_points(case.model, case.processor, wide_image, PROMPT, "image", answer=ANSWER, num_points=500)
    expected, frame = _explicit_map(case, wide_image)
    assert torch.allclose(pts.similarity.double(), expected, rtol=1e-4, atol=1e-4)
    # the min-max map (down_sample=1) is the explicit map min-maxed, inside the padding
    top, left = pts.pad[0], pts.pad[1]
    inner = pts.map[top:top + frame.rows, left:left + frame.cols].double()
    mm = (expected - expected.min()) / (expected.max() - expected.min())
    assert torch.allclose(inner, mm, atol=1e-5)
    assert pts.query == "image" and pts.answer == ANSWER
    assert find_hooks(case.model) == []


def test_points_sit_in_the_cells_they_came_from(case, wide_image, one_thread):
    pts = similarity_points(case.model, case.processor, wide_image, PROMPT, "image", answer=ANSWER, num_points=500)
    _, frame = _explicit_map(case, wide_image)
    assert len(pts) == frame.rows * frame.cols  # every cell of the frame is a point when num_points allows it
    w, h = wide_image.size
    for (x, y), (r, c) in zip(pts.points.tolist(), pts.cells.tolist()):
        assert 0 <= x <= w - 1 and 0 <= y <= h - 1 and x == int(x) and y == int(y)
        assert frame.cell_of(x, y) == (r, c)
    if case.kind == "llava":  # 60x40 centre-cropped to the middle 40x40: 8x8 cells of 5 px, 2 padded columns a side
        assert frame.box == (10.0, 0.0, 50.0, 40.0)
        assert pts.pad == (0, 2, 0, 2) and tuple(pts.map.shape) == (8, 12)
        assert bool((pts.map[:, :2] == -1).all()) and bool((pts.map[:, -2:] == -1).all())
    # downsampled by 2: each point sits in the coarse cell (box split into rows // 2 x cols // 2) it came from
    coarse = similarity_points(case.model, case.processor, wide_image, PROMPT, "image", answer=ANSWER,
                               down_sample=2, num_points=500)
    x0, y0, x1, y1 = frame.box
    rd, cd = frame.rows // 2, frame.cols // 2
    for (x, y), (r, c) in zip(coarse.points.tolist(), coarse.cells.tolist()):
        assert (math.floor((y - y0) * rd / (y1 - y0)), math.floor((x - x0) * cd / (x1 - x0))) == (r, c)


def test_map_to_points_hand_example():
    """3x3 frame over the middle 30 px of a 50x30 image: one padded column a side; thresholds inclusive."""
    raw = torch.tensor([[1.0, 9.0, 3.0], [11.0, 2.0, 7.0], [4.0, 10.6, 5.0]])
    # min-max: [[0, .8, .2], [1, .1, .6], [.3, .96, .4]]
    pts = similarity_map_to_points(raw, (10, 0, 40, 30), (50, 30), t_pos=0.8, t_neg=0.2, num_points=7)
    assert pts.cells.tolist() == [[1, 0], [2, 1], [0, 1],  # positives, descending (0.8 included)
                                  [0, 0], [1, 1], [0, 2],  # negatives, ascending (0.2 included)
                                  [1, 2]]  # neutral, row-major, cut at num_points
    assert pts.labels.tolist() == [1, 1, 1, 0, 0, 0, -1]
    assert pts.points.tolist() == [[15, 15], [25, 25], [25, 5], [15, 5], [25, 15], [35, 5], [35, 15]]
    assert pts.pad == (0, 1, 0, 1) and tuple(pts.map.shape) == (3, 5)
    assert pts.map[:, 0].tolist() == [-1, -1, -1] and pts.map[:, 4].tolist() == [-1, -1, -1]
    assert torch.allclose(pts.map[:, 1:4], torch.tensor([[0, .8, .2], [1, .1, .6], [.3, .96, .4]]))
    # all points: the three neutral cells in row-major order at the end
    every = similarity_map_to_points(raw, (10, 0, 40, 30), (50, 30), num_points=30)
    assert every.cells.tolist()[6:] == [[1, 2], [2, 0], [2, 2]] and every.labels.tolist()[6:] == [-1, -1, -1]
    # a pruned cell is never a point and shows -1; min-max over the valid cells only
    valid = torch.ones(3, 3, dtype=torch.bool)
    valid[1, 0] = False  # the maximum
    pr = similarity_map_to_points(raw, (10, 0, 40, 30), (50, 30), valid=valid, num_points=30)
    assert [1, 0] not in pr.cells.tolist() and len(pr) == 8
    assert float(pr.map[1, 1]) == -1 and pr.cells.tolist()[0] == [2, 1] and float(pr.map[2, 2]) == 1.0
    # a flat map carries no location: no points
    assert len(similarity_map_to_points(torch.ones(3, 3), (0, 0, 30, 30), (30, 30))) == 0


def test_map_to_points_downsample_and_outside_cells():
    raw = torch.arange(16, dtype=torch.float64).view(4, 4)
    pts = similarity_map_to_points(raw, (0, 0, 40, 40), (40, 40), down_sample=2, num_points=30)
    blocks = raw.view(2, 2, 2, 2).mean((1, 3))  # bilinear halving = the mean of each 2x2 block
    mm = (blocks - blocks.min()) / (blocks.max() - blocks.min())
    assert torch.allclose(pts.map.double(), mm, atol=1e-6)
    assert pts.points.tolist()[0] == [30, 30] and pts.labels.tolist() == [1, 1, 0, 0]  # 1, .8 | 0, .2
    # a frame padded to a square reaches below a 20x10 image: cells centred outside the image are never points
    out = similarity_map_to_points(torch.tensor([[0.0, 1.0], [5.0, 6.0]]), (0, -5, 20, 15), (20, 10))
    assert out.cells[:, 0].tolist() == [0, 0] and out.labels.tolist() == [1, 0]
    assert float(out.map[1].max()) == -1.0
    with pytest.raises(ValueError, match="t_neg must be below t_pos"):
        similarity_map_to_points(raw, (0, 0, 4, 4), (4, 4), t_pos=0.2, t_neg=0.5)
    with pytest.raises(ValueError, match="down_sample"):
        similarity_map_to_points(raw, (0, 0, 4, 4), (4, 4), down_sample=5)


def test_refine_points_equals_reads_loop():
    rng = np.random.default_rng(1)
    pm = torch.tensor(rng.random((7, 9)))
    pts = torch.tensor([[0.0, 0.0], [4.0, 3.0], [8.0, 6.0]])
    prob = torch.softmax(pm.flatten(), 0)
    expected = []
    for x, y in pts.tolist():  # READ's per-point loop over every pixel
        num_x = num_y = total = 0.0
        for gy in range(7):
            for gx in range(9):
                wgt = math.exp(-((gx - x) ** 2 + (gy - y) ** 2)) * float(prob[gy * 9 + gx])
                num_x, num_y, total = num_x + wgt * gx, num_y + wgt * gy, total + wgt
        expected.append([num_x / total, num_y / total])
    assert torch.allclose(refine_points(pts, pm), torch.tensor(expected, dtype=torch.float64), atol=1e-10)


def test_refine_moves_points_a_little_and_keeps_labels(tiny_llava, wide_image, one_thread):
    base = similarity_points(tiny_llava.model, tiny_llava.processor, wide_image, PROMPT, "image", answer=ANSWER)
    ref = similarity_points(tiny_llava.model, tiny_llava.processor, wide_image, PROMPT, "image", answer=ANSWER,
                            refine=True)
    assert ref.refined and torch.equal(ref.labels, base.labels) and torch.equal(ref.cells, base.cells)
    assert float((ref.points - base.points).abs().max()) < 2.0 and not torch.equal(ref.points, base.points)


def test_query_word_missing_lists_the_words_and_leaves_no_hooks(tiny_llava, wide_image, one_thread):
    with pytest.raises(ValueError, match="not a word of the sequence") as err:
        similarity_points(tiny_llava.model, tiny_llava.processor, wide_image, PROMPT, "zebra", answer=ANSWER)
    for word in ("what", "image", "ASSISTANT", "bottom", "show"):
        assert word in str(err.value)
    assert find_hooks(tiny_llava.model) == []
    with pytest.raises(ValueError, match="no \\[SEG\\]"):  # the tiny tokenizer has no [SEG] token
        similarity_points(tiny_llava.model, tiny_llava.processor, wide_image, PROMPT, answer=ANSWER)
    with pytest.raises(ValueError, match="no \\[SEG\\]"):
        similarity_points(tiny_llava.model, tiny_llava.processor, wide_image, PROMPT, "[SEG]", answer=ANSWER)
    with pytest.raises(TypeError, match="answer must be a string"):
        similarity_points(tiny_llava.model, tiny_llava.processor, wide_image, PROMPT, "image", answer=[3, 4])
    with pytest.raises(ValueError, match="answer is empty"):
        similarity_points(tiny_llava.model, tiny_llava.processor, wide_image, PROMPT, "image", answer="  ")
    with pytest.raises(ValueError, match="one word"):
        similarity_points(tiny_llava.model, tiny_llava.processor, wide_image, PROMPT, "two words", answer=ANSWER)
    assert find_hooks(tiny_llava.model) == []
    # generated answer (no answer=): the query may be a word of the prompt
    gen = similarity_points(tiny_llava.model, tiny_llava.processor, wide_image, PROMPT, "What", max_new_tokens=3)
    assert gen.answer and gen.query == "What" and find_hooks(tiny_llava.model) == []


def test_seg_token_query_is_the_position_that_predicts_it(tiny_llava):
    """READ / LISA's shifted `seg_token_mask`: the [SEG] query is the hidden state one position before it."""
    tok = copy.deepcopy(tiny_llava.processor.tokenizer)
    tok.add_tokens(["[SEG]"])
    seg = tok.convert_tokens_to_ids("[SEG]")
    word = tok.convert_tokens_to_ids("show")
    ids = torch.tensor([word, 5, seg, word, seg, 7])
    lay = SequenceLayout(ids=ids, kind=torch.full((6,), SequenceLayout.TEXT), patch=torch.full((6,), -1),
                         image=torch.full((6,), -1))
    hidden = torch.randn(6, 4)
    q, label, pos = query_vector(hidden, lay, tok, None)
    assert label == "[SEG]" and pos == [3] and torch.equal(q, hidden[3])  # the last [SEG], shifted by one
    q, label, pos = query_vector(hidden, lay, tok, "show")  # an explicit word wins over [SEG]
    assert pos == [3] and torch.equal(q, hidden[3])


@pytest.mark.parametrize("method, cfg", [("random", {"keep": 20, "seed": 0}), ("fastv", {"keep": 20, "layer": 1})])
def test_pruned_model_never_points_at_pruned_cells(tiny_llava, wide_image, one_thread, method, cfg):
    """Vision pruning removes positions; FastV marks them DROPPED (stale last-layer states): neither is a point."""
    with vlm_tools.attached(tiny_llava.model, method, **cfg) as wrapped:
        pts = similarity_points(wrapped, tiny_llava.processor, wide_image, PROMPT, "image", answer=ANSWER,
                                num_points=500)
        expected, frame = _explicit_map(tiny_llava, wide_image, model=wrapped)
    assert int(frame.pruned.sum()) == 64 - 20 and len(pts) == 20
    assert not any(bool(frame.pruned[r, c]) for r, c in pts.cells.tolist())
    inner = pts.map[:, pts.pad[1]:pts.pad[1] + frame.cols]
    assert bool((inner[frame.pruned] == -1).all())
    assert torch.allclose(pts.similarity.double()[~frame.pruned], expected[~frame.pruned], rtol=1e-4, atol=1e-4)
    assert find_hooks(tiny_llava.model) == []


def _tiny_sam():
    from transformers import SamConfig, SamImageProcessor, SamModel, SamProcessor

    vision = {"hidden_size": 32, "output_channels": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
              "image_size": 64, "patch_size": 16, "window_size": 2, "global_attn_indexes": [1], "num_pos_feats": 16,
              "mlp_dim": 64}
    prompt = {"hidden_size": 32, "image_size": 64, "patch_size": 16, "mask_input_channels": 4}
    decoder = {"hidden_size": 32, "mlp_dim": 64, "num_attention_heads": 2, "iou_head_hidden_dim": 32}
    cfg = SamConfig(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder)
    torch.manual_seed(0)
    model = SamModel(cfg).eval()
    proc = SamProcessor(image_processor=SamImageProcessor(size={"longest_edge": 64},
                                                          pad_size={"height": 64, "width": 64}))
    return model, proc


def test_hf_sam_model_accepts_the_prompts(tiny_llava, wide_image, one_thread):
    pts = similarity_points(tiny_llava.model, tiny_llava.processor, wide_image, PROMPT, "image", answer=ANSWER)
    sam, proc = _tiny_sam()
    hf = pts.to_hf_sam()
    n = int((pts.labels >= 0).sum())
    assert tuple(hf["input_points"].shape) == (1, 1, n, 2) and tuple(hf["input_labels"].shape) == (1, 1, n)
    inputs = proc(images=wide_image, input_points=hf["input_points"], input_labels=hf["input_labels"],
                  return_tensors="pt")
    # by hand: the same coordinates rescaled to the model's 64-px longest edge
    by_hand = pts.to_hf_sam(longest_edge=64)["input_points"]
    assert torch.allclose(inputs["input_points"].float(), by_hand, atol=1e-4)
    with torch.no_grad():
        out = sam(pixel_values=inputs["pixel_values"], input_points=by_hand, input_labels=hf["input_labels"],
                  multimask_output=False)
        kept = pts.to_hf_sam(keep_neutral=True, longest_edge=64)  # -1: HF's "not a point", READ's fixed length
        out_neutral = sam(pixel_values=inputs["pixel_values"], input_points=kept["input_points"],
                          input_labels=kept["input_labels"], multimask_output=False)
    assert int((kept["input_labels"] == -1).sum()) == int((pts.labels == -1).sum())
    for o in (out, out_neutral):
        masks = proc.image_processor.post_process_masks(o.pred_masks, inputs["original_sizes"],
                                                        inputs["reshaped_input_sizes"])
        assert tuple(masks[0].shape[-2:]) == (wide_image.size[1], wide_image.size[0])
    sam_prompt = pts.to_sam()
    assert sam_prompt["point_coords"].shape == (n, 2) and set(sam_prompt["point_labels"].tolist()) <= {0, 1}


def test_points_export_and_overlay(tmp_path):
    pts = similarity_map_to_points(torch.tensor([[1.0, 9.0, 3.0], [11.0, 2.0, 7.0]]), (0, 0, 30, 20), (30, 20))
    assert isinstance(pts, Points)
    d = json.loads(json.dumps(pts.to_dict()))
    assert d["labels"] == pts.labels.tolist() and d["image_size"] == [30, 20] and len(d["points"]) == len(pts)
    out = pts.save_overlay(tmp_path / "o.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    flat = similarity_map_to_points(torch.zeros(2, 2), (0, 0, 2, 2), (2, 2))
    with pytest.raises(ValueError, match="no point prompts"):
        flat.to_hf_sam()


def test_points_cli(tmp_path, wide_image):
    img = tmp_path / "img.png"
    wide_image.save(img)
    rc = main(["points", "--model", "tiny", "--image", str(img), "--prompt", "what is in the image ?", "--query",
               "image", "--max-new-tokens", "3", "--out", str(tmp_path / "out")])
    assert rc == 0
    payload = json.loads((tmp_path / "out" / "points.json").read_text())
    assert payload["query"] == "image" and len(payload["points"]) == len(payload["labels"]) > 0
    assert set(payload["sam"]) == {"point_coords", "point_labels"}
    assert (tmp_path / "out" / "overlay.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["points", "--model", "tiny", "--image", str(img), "--prompt", "what ?", "--query", "zebra",
                 "--max-new-tokens", "2", "--out", str(tmp_path / "o2")]) == 2
