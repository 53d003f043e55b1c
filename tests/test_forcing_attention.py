"""`teacher_force(..., attention_queries=...)`: fp32 attention rows recomputed from pre-hooks equal an eager forward's."""

from __future__ import annotations

import pytest
import torch

import vlm_tools
from vlm_tools.core.hooks import find_hooks
from vlm_tools.core.models import build_tiny_llava
from vlm_tools.core.wrapped import SequenceLayout
from vlm_tools.interpret.forcing import forced_inputs, generate_answers, teacher_force
from vlm_tools.testing import PROMPTS, make_images


@pytest.fixture(scope="module", params=["llava", "llava_next"])
def pair(request):
    """The same tiny model twice (same seed): SDPA (under test) and eager (the reference's output_attentions)."""
    sdpa, processor = build_tiny_llava(request.param)
    eager, _ = build_tiny_llava(request.param, attn_implementation="eager")
    return sdpa, eager, processor


def _queries(length: int) -> list[torch.Tensor]:
    return [torch.tensor([length - 1, length - 3, length - 7]), torch.tensor([length - 2, length - 1])]


def test_rows_equal_the_eager_head_mean_on_a_left_padded_batch(pair, one_thread):
    sdpa, eager, processor = pair
    imgs = make_images()
    answers = generate_answers(sdpa, processor, imgs, PROMPTS, max_new_tokens=4)
    batch = forced_inputs(processor, imgs, PROMPTS, answers)
    assert bool((batch["attention_mask"][:, 0] == 0).any())  # one sample is left-padded
    length = batch["input_ids"].shape[1]
    queries = _queries(length)
    forced = teacher_force(sdpa, processor, imgs, PROMPTS, answers, attention_queries=queries)
    assert sdpa.config.text_config._attn_implementation == "sdpa"  # the model keeps SDPA
    with torch.no_grad():
        ref = eager(**batch, output_attentions=True).attentions
    n_layers = len(ref)
    for s, q in enumerate(queries):
        got = forced.attentions[s]
        assert got.shape == (n_layers, q.numel(), length) and got.dtype == torch.float32
        for layer in range(n_layers):
            for j, pos in enumerate(q.tolist()):
                want = ref[layer][s, :, pos, :].mean(0)  # explicit: head mean of one eager row
                torch.testing.assert_close(got[layer, j], want, atol=1e-5, rtol=0)
    assert find_hooks(sdpa) == []


def test_masked_images_get_no_attention(pair, one_thread):
    sdpa, _, processor = pair
    imgs = make_images()
    answers = generate_answers(sdpa, processor, imgs, PROMPTS, max_new_tokens=3)
    plain = teacher_force(sdpa, processor, imgs, PROMPTS, answers)
    queries = [p - 1 for p in plain.answer_positions]
    masked = teacher_force(sdpa, processor, imgs, PROMPTS, answers, mask_images=True, attention_queries=queries)
    for s, rows in enumerate(masked.attentions):
        vis = masked.layouts[s].visual_positions()
        assert vis.numel() > 0
        assert float(rows[..., vis].abs().max()) == 0.0
        torch.testing.assert_close(rows.sum(-1), torch.ones(rows.shape[:2]))


def test_rows_after_a_fastv_drop_map_back_to_the_returned_positions(pair, one_thread):
    """FastV keeps the full length: layers after the drop attend to the kept slots only (zeros on dropped keys)."""
    sdpa, eager, processor = pair
    imgs = make_images()
    with vlm_tools.attached(sdpa, "fastv", keep=8, layer=1) as w, vlm_tools.attached(eager, "fastv", keep=8,
                                                                                       layer=1) as we:
        answers = generate_answers(w, processor, imgs, PROMPTS, max_new_tokens=3)
        batch = forced_inputs(processor, imgs, PROMPTS, answers)
        length = batch["input_ids"].shape[1]
        queries = _queries(length)
        forced = teacher_force(w, processor, imgs, PROMPTS, answers, attention_queries=queries)
        with torch.no_grad():
            ref = we(**batch, output_attentions=True, forced_tokens=[len(a) for a in answers]).attentions
    width = ref[-1].shape[-1]
    for s, q in enumerate(queries):
        kind = forced.layouts[s].kind
        kept = [p for p in range(length) if int(kind[p]) != SequenceLayout.DROPPED]  # slots, left-padded
        slot_of = {p: width - len(kept) + i for i, p in enumerate(kept)}
        assert int((kind == SequenceLayout.DROPPED).sum()) > 0
        for j, pos in enumerate(q.tolist()):
            torch.testing.assert_close(forced.attentions[s][0, j], ref[0][s, :, pos].mean(0), atol=1e-5, rtol=0)
            want = torch.zeros(length)
            row = ref[1][s, :, slot_of[pos]].mean(0)
            for p in kept:
                want[p] = row[slot_of[p]]
            torch.testing.assert_close(forced.attentions[s][1, j], want, atol=1e-5, rtol=0)
    assert find_hooks(sdpa) == [] and find_hooks(eager) == []


def test_bad_queries_raise_and_leave_no_hooks(pair):
    sdpa, _, processor = pair
    imgs = make_images()
    answers = [torch.tensor([5, 6]), torch.tensor([7])]
    with pytest.raises(ValueError, match="one 1-D tensor of positions per sample"):
        teacher_force(sdpa, processor, imgs, PROMPTS, answers, attention_queries=[torch.tensor([1])])
    with pytest.raises(ValueError, match="attention_queries\\[1\\]"):
        teacher_force(sdpa, processor, imgs, PROMPTS, answers, attention_queries=[torch.tensor([1]),
                                                                                 torch.tensor([10 ** 6])])
    with pytest.raises(ValueError, match="integer"):
        teacher_force(sdpa, processor, imgs, PROMPTS, answers, attention_queries=[torch.tensor([1.0]),
                                                                                 torch.tensor([2])])
    assert find_hooks(sdpa) == []
