"""cls_topk's recomputed [CLS] scores against an eager-attention forward; random's determinism; loading path."""

from __future__ import annotations

import copy

import pytest
import torch

import vlm_tools
from vlm_tools.testing import PROMPTS, TinyCase, make_images


@pytest.mark.parametrize("vision", ["clip", "dinov2"])
def test_cls_scores_match_eager_attention(vision):
    case = TinyCase("llava", vision)
    eager = copy.deepcopy(case.model)
    eager.set_attn_implementation("eager")
    pv = case.batch["pixel_values"]
    with torch.no_grad():
        out = eager.model.vision_tower(pv, output_attentions=True, return_dict=True)
    adapter = vlm_tools.get_adapter(case.model)
    ref = out.attentions[adapter.feature_block][:, :, 0, 1:].mean(1)
    with vlm_tools.attached(case.model, "cls_topk", keep=7) as wrapped, torch.no_grad():
        wrapped(**case.batch)
        scores = wrapped.last_trace.extra["scores"]
        kept = wrapped.last_trace.kept
    torch.testing.assert_close(scores, ref.float(), atol=1e-5, rtol=0)
    for s in range(2):
        expect = torch.topk(ref[s], 7).indices.sort().values
        assert torch.equal(kept[s][0], expect)


def test_cls_scores_in_bf16_are_fp32(tiny_llava):
    model = copy.deepcopy(tiny_llava.model).to(torch.bfloat16)
    with vlm_tools.attached(model, "cls_topk", ratio=0.75) as wrapped, torch.no_grad():
        wrapped(**tiny_llava.singles[0])
    assert wrapped.last_trace.extra["scores"].dtype == torch.float32
    assert wrapped.last_trace.tokens_after[0] == 16  # 64 patches, 75% removed


def test_random_is_seeded_and_batch_invariant(tiny_llava):
    with torch.no_grad():
        with vlm_tools.attached(tiny_llava.model, "random", keep=9, seed=3) as w:
            w(**tiny_llava.batch)
            a = w.last_trace.kept
            w(**tiny_llava.batch)
            b = w.last_trace.kept
        with vlm_tools.attached(tiny_llava.model, "random", keep=9, seed=4) as w:
            w(**tiny_llava.batch)
            c = w.last_trace.kept
    assert all(torch.equal(x[0], y[0]) for x, y in zip(a, b))
    assert not all(torch.equal(x[0], y[0]) for x, y in zip(a, c))
    assert not torch.equal(a[0][0], a[1][0])  # different images, different choices


def test_save_and_load_through_from_pretrained(tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from vlm_tools.core.models import build_tiny_llava

    model, processor = build_tiny_llava("llava", "dinov2", seed=5)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    proc = AutoProcessor.from_pretrained(tmp_path)
    inputs = proc(images=make_images()[:1], text=PROMPTS[:1], return_tensors="pt")
    with torch.no_grad():
        ref = model(**inputs).logits
        assert torch.equal(loaded(**inputs).logits, ref)
        with vlm_tools.attached(loaded, "cls_topk", keep=5) as wrapped:
            out = wrapped.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 2
    assert wrapped.last_trace.tokens_after == [5]


def test_llava_next_budget_rule(tiny_llava_next):
    """keep is per image over all crops (newlines excluded), split evenly; newlines are all kept."""
    from vlm_tools.core.adapters import split_budget

    assert split_budget(10, [64, 64, 64]) == [4, 3, 3]
    assert split_budget(100, [64, 10, 64]) == [45, 10, 45]
    assert split_budget(5, [0, 64]) == [0, 5]
    with pytest.raises(ValueError, match="exceeds"):
        split_budget(200, [64, 64])
    case = tiny_llava_next
    with vlm_tools.attached(case.model, "cls_topk", keep=20) as wrapped, torch.no_grad():
        wrapped(**case.batch)
        trace = wrapped.last_trace
    for s in range(2):
        assert sum(k.numel() for k in trace.kept[s]) == 20
        newlines = trace.tokens_before[s] - _valid(case, s)
        assert newlines > 0
        assert trace.tokens_after[s] == 20 + newlines


def _valid(case, sample):
    adapter = vlm_tools.get_adapter(case.model)
    rows, plan = adapter.plan(case.batch["pixel_values"], case.batch["image_sizes"], [0, 1], None, None, prune=False)
    return int(plan.valid[plan.image_rows[sample]].sum())


def test_forward_with_labels_shrinks_labels(tiny_llava):
    """labels follow the shrunk placeholder run; the loss equals a hand computation on the shrunk sequence."""
    import torch.nn.functional as F

    case = tiny_llava
    batch = dict(case.batch)
    labels = batch["input_ids"].clone()
    labels[batch["attention_mask"] == 0] = -100
    labels[labels == case.model.config.image_token_id] = -100
    with vlm_tools.attached(case.model, "cls_topk", keep=6) as wrapped, torch.no_grad():
        out = wrapped(**batch, labels=labels)
    logits = out.logits
    assert logits.shape[1] == batch["input_ids"].shape[1] - (64 - 6)  # each row loses 58 placeholders
    # rebuild the shrunk labels by hand: text labels in order, left-padded, image run of 6 ignored
    ref = []
    for s in range(2):
        img_id = case.model.config.image_token_id
        text = labels[s][(batch["attention_mask"][s] == 1) & (batch["input_ids"][s] != img_id)]
        ids = batch["input_ids"][s][batch["attention_mask"][s] == 1]
        first = int((ids == case.model.config.image_token_id).nonzero()[0])
        row = torch.cat([text[:first], torch.full((6,), -100), text[first:]])
        ref.append(torch.cat([torch.full((logits.shape[1] - row.numel(),), -100), row]))
    ref = torch.stack(ref)
    expect = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ref[:, 1:].reshape(-1),
                             ignore_index=-100)
    torch.testing.assert_close(out.loss, expect, atol=1e-5, rtol=1e-5)


def test_grid_comes_from_the_pixels_not_the_config():
    """A DINOv2 tower run at another resolution than its config (as the default model is): the call's grid rules."""
    case = TinyCase("llava", "dinov2")
    proc = case.processor.image_processor
    proc.size, proc.crop_size = {"shortest_edge": 48}, {"height": 48, "width": 48}
    inputs = case.processor(images=make_images()[:1], text=PROMPTS[:1], return_tensors="pt")
    assert inputs["pixel_values"].shape[-1] == 48
    with vlm_tools.attached(case.model, "cls_topk", keep=10) as wrapped, torch.no_grad():
        wrapped(**inputs)
    assert wrapped.last_trace.grid == (12, 12)
    assert wrapped.last_trace.tokens_before == [144] and wrapped.last_trace.tokens_after == [10]
    assert int(wrapped.last_trace.kept[0][0].max()) < 144
