"""Teacher forcing (vlm_tools.interpret.forcing) and the core's `forced_tokens`: one answer, scored like generation."""

from __future__ import annotations

import pytest
import torch

import vlm_tools
from vlm_tools.core.hooks import find_hooks
from vlm_tools.core.wrapped import SequenceLayout
from vlm_tools.interpret.forcing import generate_answers, teacher_force
from vlm_tools.testing import PROMPTS, TinyCase, make_images

LLM_STAGE = [("fastv", {"keep": 8, "layer": 1}), ("flowcut", {"keep": 8})]


@pytest.fixture(scope="module")
def next_case():
    return TinyCase("llava_next")


@pytest.mark.parametrize("name, cfg", LLM_STAGE)
def test_forced_pass_decides_at_the_prompt_end_like_generation(next_case, name, cfg):
    """FastV / FlowCut's LLM stage rank with the last prompt token: the forced pass keeps what generation kept."""
    imgs = make_images()
    with vlm_tools.attached(next_case.model, name, **cfg) as wrapped:
        answers = generate_answers(wrapped, next_case.processor, imgs, PROMPTS, max_new_tokens=4)
        generated = wrapped.last_trace.kept
        forced = teacher_force(wrapped, next_case.processor, imgs, PROMPTS, answers)
    for g, f in zip(generated, forced.trace.kept):
        for a, b in zip(g, f):
            assert torch.equal(a, b)
    assert find_hooks(next_case.model) == []


def test_without_the_offset_the_last_answer_token_would_decide(next_case):
    """Guards the offset: the same forward without `forced_tokens` ranks with the last answer token instead."""
    imgs = make_images()
    with vlm_tools.attached(next_case.model, "fastv", keep=8, layer=1) as wrapped:
        answers = generate_answers(wrapped, next_case.processor, imgs, PROMPTS, max_new_tokens=4)
        generated = wrapped.last_trace.kept
        from vlm_tools.interpret.forcing import forced_inputs

        batch = forced_inputs(next_case.processor, imgs, PROMPTS, answers)
        with torch.no_grad():
            wrapped(**batch)
        plain = wrapped.last_trace.kept
    assert any(not torch.equal(a, b) for g, p in zip(generated, plain) for a, b in zip(g, p))


def test_forced_logits_reproduce_the_greedy_answer_and_layout(next_case):
    imgs = make_images()
    answers = generate_answers(next_case.model, next_case.processor, imgs, PROMPTS, max_new_tokens=4)
    forced = teacher_force(next_case.model, next_case.processor, imgs, PROMPTS, answers)
    image_id = next_case.model.config.image_token_id
    for s, (pos, ids) in enumerate(zip(forced.answer_positions, answers)):
        logits = forced.logits[s, pos - 1]
        logits[:, image_id] = float("-inf")  # generation never emits the placeholder
        assert logits.argmax(-1).tolist() == ids.tolist()
        lay = forced.layouts[s]
        assert torch.equal(lay.ids[pos], ids)
        assert bool((lay.kind[pos] == SequenceLayout.TEXT).all())
        n_visual = int((lay.kind == SequenceLayout.VISUAL).sum())
        assert n_visual == forced.trace.tokens_after[s]
    assert len(forced.hidden_states) == len(next_case.model.model.language_model.layers) + 1
    logp = forced.answer_logprobs()
    assert all(bool((lp <= 0).all()) for lp in logp)


def test_masked_images_change_the_answer_scores_not_the_positions(next_case):
    imgs = make_images()
    answers = generate_answers(next_case.model, next_case.processor, imgs, PROMPTS, max_new_tokens=3)
    clean = teacher_force(next_case.model, next_case.processor, imgs, PROMPTS, answers)
    masked = teacher_force(next_case.model, next_case.processor, imgs, PROMPTS, answers, mask_images=True)
    assert clean.logits.shape == masked.logits.shape
    assert not torch.allclose(clean.logits, masked.logits)
    # the text before the image is unaffected by masking the image (causal attention)
    lay = clean.layouts[0]
    first_visual = int(lay.visual_positions()[0])
    torch.testing.assert_close(clean.logits[0, :first_visual], masked.logits[0, :first_visual])


def test_bad_inputs_are_clear(next_case, tmp_path):
    from vlm_tools.interpret.forcing import load_images

    bad = tmp_path / "not_an_image.png"
    bad.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not_an_image.png"):
        load_images([bad])
    image_id = next_case.model.config.image_token_id
    with pytest.raises(ValueError, match="image placeholder"):
        teacher_force(next_case.model, next_case.processor, make_images(), PROMPTS,
                      [torch.tensor([image_id]), torch.tensor([5])])
    with pytest.raises(ValueError, match="one of each"):
        teacher_force(next_case.model, next_case.processor, make_images(), PROMPTS, [torch.tensor([5])])
    with pytest.raises(ValueError, match="forced_tokens"):
        with vlm_tools.attached(next_case.model, "none") as wrapped, torch.no_grad():
            wrapped(**next_case.singles[0], forced_tokens=[10_000])
    assert find_hooks(next_case.model) == []


def test_mask_positions_masks_exactly_the_given_visual_positions(next_case):
    """All visual positions given == mask_images; a subset changes the scores less; non-visual positions raise."""
    imgs = make_images()
    answers = generate_answers(next_case.model, next_case.processor, imgs, PROMPTS, max_new_tokens=3)
    clean = teacher_force(next_case.model, next_case.processor, imgs, PROMPTS, answers, hidden_states=False)
    full = teacher_force(next_case.model, next_case.processor, imgs, PROMPTS, answers, hidden_states=False,
                         mask_images=True)
    every = [lay.visual_positions() for lay in clean.layouts]
    same = teacher_force(next_case.model, next_case.processor, imgs, PROMPTS, answers, hidden_states=False,
                         mask_positions=every)
    assert torch.equal(same.logits, full.logits)
    half = [v[: v.numel() // 2] for v in every]
    part = teacher_force(next_case.model, next_case.processor, imgs, PROMPTS, answers, hidden_states=False,
                         mask_positions=half)
    assert not torch.allclose(part.logits, clean.logits) and not torch.allclose(part.logits, full.logits)
    text = [torch.nonzero(lay.kind == SequenceLayout.TEXT).flatten()[:1] for lay in clean.layouts]
    with pytest.raises(ValueError, match="visual positions"):
        teacher_force(next_case.model, next_case.processor, imgs, PROMPTS, answers, mask_positions=text)
    assert find_hooks(next_case.model) == []


def test_mask_positions_refuse_a_sequence_shortened_inside_the_llm(next_case):
    """FlowCut's LLaVA-NeXT stage returns only the kept slots: positions of the returned sequence are not the language
    model's input positions, so masking them would hide the wrong tokens; refused with a clear error."""
    imgs = make_images()
    with vlm_tools.attached(next_case.model, "flowcut", keep=8) as wrapped:
        answers = generate_answers(wrapped, next_case.processor, imgs, PROMPTS, max_new_tokens=2)
        clean = teacher_force(wrapped, next_case.processor, imgs, PROMPTS, answers, hidden_states=False)
        first = [lay.visual_positions()[:1] for lay in clean.layouts]  # the same index in both coordinates
        with pytest.raises(ValueError, match="shortens the sequence inside the language model"):
            teacher_force(wrapped, next_case.processor, imgs, PROMPTS, answers, mask_positions=first)
    assert find_hooks(next_case.model) == []
