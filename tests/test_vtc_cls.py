"""vtc_cls: kept indices against the [CLS] rows of an eager-attention forward (`output_attentions=True`)."""

from __future__ import annotations

import copy

import pytest
import torch

import vlm_tools
from vlm_tools.pruning.vtc_cls.config import VtcClsConfig
from vlm_tools.testing import TinyCase


def _eager_cls_sum(case: TinyCase, pixel_rows: torch.Tensor, start: int, end: int) -> torch.Tensor:
    eager = copy.deepcopy(case.model)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        out = eager.model.vision_tower(pixel_rows, output_attentions=True, return_dict=True)
    # the official code: torch.stack([attn.mean(heads)[0, 1:] for attn in attentions[layer:-1]]).sum(0)
    rows = [a[:, :, 0, 1:].mean(1) for a in out.attentions[start:end + 1]]
    return torch.stack(rows).sum(0)


@pytest.mark.parametrize("vision", ["clip", "dinov2"])
def test_kept_indices_match_eager_attention_sum(vision):
    case = TinyCase("llava", vision, vision_layers=6)
    ref = _eager_cls_sum(case, case.batch["pixel_values"], 2, 4)  # default: three blocks ending at L-2 = 4
    with vlm_tools.attached(case.model, "vtc_cls", keep=11) as wrapped, torch.no_grad():
        wrapped(**case.batch)
        trace = wrapped.last_trace
    torch.testing.assert_close(trace.extra["scores"], ref.float(), atol=1e-5, rtol=0)
    for s in range(2):
        expect = torch.topk(ref[s], 11).indices.sort().values
        assert torch.equal(trace.kept[s][0], expect)
    assert trace.tokens_after == [11, 11]
    assert not torch.equal(trace.kept[0][0], trace.kept[1][0])


def test_layer_range_is_configurable(tiny_llava):
    pv = tiny_llava.batch["pixel_values"]
    for start, end in [(0, 0), (1, 3), (-3, -1)]:
        ref = _eager_cls_sum(tiny_llava, pv, start % 4, end % 4)
        cfg = {"keep": 5, "start_layer": start, "end_layer": end}
        with vlm_tools.attached(tiny_llava.model, "vtc_cls", **cfg) as wrapped, torch.no_grad():
            wrapped(**tiny_llava.batch)
        torch.testing.assert_close(wrapped.last_trace.extra["scores"], ref.float(), atol=1e-5, rtol=0)


def test_per_crop_on_llava_next(tiny_llava_next):
    case = tiny_llava_next
    adapter = vlm_tools.get_adapter(case.model)
    with vlm_tools.attached(case.model, "vtc_cls", keep=12) as wrapped, torch.no_grad():
        wrapped(**case.batch)
        trace = wrapped.last_trace
    rows, plan = adapter.plan(case.batch["pixel_values"], case.batch["image_sizes"], [], 12, None, True)
    ref = _eager_cls_sum(case, rows, 0, 2)
    for img, crops in enumerate(plan.image_rows):
        expect = []
        for j, r in enumerate(crops):
            score = ref[r].masked_fill(~plan.valid[r], float("-inf"))
            expect.append(torch.topk(score, int(plan.budget[r])).indices.sort().values + j * plan.n_patches)
        assert torch.equal(trace.kept[img][0], torch.cat(expect))
        assert trace.kept[img][0].numel() == 12


def test_bad_layer_ranges_raise_clear_errors(tiny_llava):
    with pytest.raises(ValueError, match="end_layer=7 is outside"):
        vlm_tools.wrap(tiny_llava.model, "vtc_cls", keep=4, end_layer=7)
    with pytest.raises(ValueError, match="start_layer=3 must lie in"):
        vlm_tools.wrap(tiny_llava.model, "vtc_cls", keep=4, start_layer=3, end_layer=1)
    with pytest.raises(TypeError, match="start_layer must be an int"):
        VtcClsConfig(keep=4, start_layer=1.5)
    assert VtcClsConfig(keep=4).block_range(24) == (20, 22)  # the paper's best: --layer 20 on CLIP-L
