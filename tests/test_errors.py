"""Bad input gets a clear error and leaves the model untouched."""

from __future__ import annotations

import pytest
import torch

import vlm_tools
from vlm_tools.core.hooks import find_hooks, hook_snapshot


@pytest.fixture()
def clean(tiny_llava):
    with torch.no_grad():
        tiny_llava.model(**tiny_llava.singles[0])  # installs transformers' own capture hooks first
    snap = hook_snapshot(tiny_llava.model)
    yield tiny_llava
    assert find_hooks(tiny_llava.model) == []
    assert hook_snapshot(tiny_llava.model) == snap


@pytest.mark.parametrize("cfg, err, msg", [
    ({"keep": 0}, ValueError, "keep must be a positive"),
    ({"keep": -3}, ValueError, "keep must be a positive"),
    ({"keep": 4, "ratio": 0.5}, ValueError, "not both"),
    ({"ratio": 0.0}, ValueError, r"\(0, 1\)"),
    ({"ratio": 1.0}, ValueError, r"\(0, 1\)"),
    ({"ratio": 1.5}, ValueError, r"\(0, 1\)"),
    ({}, ValueError, "budget is required"),
    ({"keep": 2.5}, TypeError, "keep must be an int"),
    ({"keep": 4, "bogus": 1}, TypeError, "valid fields"),
])
def test_bad_budget(clean, cfg, err, msg):
    with pytest.raises(err, match=msg):
        vlm_tools.wrap(clean.model, "cls_topk", **cfg)


def test_unknown_method_lists_registered(clean):
    with pytest.raises(KeyError, match="registered methods: .*cls_topk.*random"):
        vlm_tools.wrap(clean.model, "no_such_method", keep=4)


def test_wrapping_twice(clean):
    wrapped = vlm_tools.wrap(clean.model, "cls_topk", keep=4)
    try:
        with pytest.raises(RuntimeError, match="already wrapped"):
            vlm_tools.wrap(clean.model, "random", keep=4)
        with pytest.raises(RuntimeError, match="already wrapped"):
            vlm_tools.wrap(wrapped, "random", keep=4)
    finally:
        wrapped.unwrap()
    with pytest.raises(RuntimeError, match="unwrapped"):
        wrapped(**clean.singles[0])


def test_missing_pixel_values(clean):
    inputs = dict(clean.singles[0])
    inputs.pop("pixel_values")
    with vlm_tools.attached(clean.model, "cls_topk", keep=4) as wrapped:
        with pytest.raises(ValueError, match="pixel_values is missing"):
            wrapped(**inputs)


def test_mismatched_images_and_placeholders(clean):
    two_images = clean.batch["pixel_values"]
    with vlm_tools.attached(clean.model, "cls_topk", keep=4) as wrapped:
        with pytest.raises(ValueError, match="image placeholder tokens"):
            wrapped(input_ids=clean.singles[0]["input_ids"], attention_mask=clean.singles[0]["attention_mask"],
                    pixel_values=two_images)


def test_unsupported_model_names_supported_families():
    from transformers import LlamaConfig, LlamaForCausalLM

    lm = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2))
    with pytest.raises(TypeError, match="LlavaForConditionalGeneration.*LlavaNextForConditionalGeneration"):
        vlm_tools.wrap(lm, "cls_topk", keep=4)
    assert find_hooks(lm) == []


def test_attach_failure_removes_partial_hooks(clean):
    from vlm_tools.core.hooks import HookHandle
    from vlm_tools.core.config import BudgetConfig
    from vlm_tools.pruning.base import Pruner

    class Half(Pruner):
        name, kind = "half", "vision"

        def attach(self, model, adapter, slot):
            handle = HookHandle("half")
            handle.forward_hook(adapter.projector, lambda *a: None)
            raise RuntimeError("attach failed after one hook")

    with pytest.raises(RuntimeError, match="attach failed"):
        vlm_tools.wrap(clean.model, Half(BudgetConfig(keep=4)))
