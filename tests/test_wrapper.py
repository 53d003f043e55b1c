"""The wrapper as an object: module-like pass-through, lifecycle (dropped wrappers, copies, pickling), threads."""

from __future__ import annotations

import copy
import gc
import pickle
import threading

import pytest
import torch

import vlm_tools
from vlm_tools.core.hooks import find_hooks
from vlm_tools.testing import TinyCase


@pytest.fixture(scope="module")
def case():
    return TinyCase("llava")


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def test_module_like_pass_through(case, tmp_path):
    base = case.model
    w = vlm_tools.wrap(base, "cls_topk", keep=16)
    try:
        assert w.eval().to("cpu") is w  # chainable calls keep the wrapper (and its pruning)
        assert w.train(False) is w and not base.training
        assert sum(p.numel() for p in w.parameters()) == sum(p.numel() for p in base.parameters())
        assert [n for n, _ in w.named_modules()] == [n for n, _ in base.named_modules()]
        assert w.device == base.device and w.dtype == base.dtype and w.config is base.config
        assert w.generation_config is base.generation_config
        assert list(w.state_dict()) == list(base.state_dict())
        assert not isinstance(w, torch.nn.Module)  # on purpose: see vlm_tools.core.wrapped
        text = repr(w)
        assert "cls_topk(keep=16)" in text and "LlavaForConditionalGeneration" in text and "attached" in text
        w.save_pretrained(tmp_path / "saved")  # the base model's own save, unchanged weights, no hooks saved
        from transformers import LlavaForConditionalGeneration

        loaded = LlavaForConditionalGeneration.from_pretrained(tmp_path / "saved").eval()
        assert find_hooks(loaded) == []
        torch.testing.assert_close(_logits(loaded, case.singles[0]), _logits(base, case.singles[0]), atol=0, rtol=0)
        with pytest.raises(AttributeError):
            w.no_such_attribute  # noqa: B018
    finally:
        w.unwrap()


def test_wrap_rejects_a_processor_with_the_supported_models(case):
    with pytest.raises(TypeError, match="supports: LlavaForConditionalGeneration"):
        vlm_tools.wrap(case.processor, "cls_topk", keep=4)


def test_stacking_a_method_twice_is_refused(case, tmp_path):
    student = vlm_tools.get_method("registers").cls.example_config(case.model, str(tmp_path))
    with pytest.raises(ValueError, match=r"\['registers'\] given more than once"):
        vlm_tools.wrap(case.model, [("registers", student), ("registers", student), ("cls_topk", {"keep": 4})])
    assert find_hooks(case.model) == []


def test_a_dropped_wrapper_removes_its_hooks(case):
    vlm_tools.wrap(case.model, "cls_topk", keep=8)(**case.singles[0])  # wrapper dropped right after the call
    gc.collect()
    assert find_hooks(case.model) == []
    vlm_tools.wrap(case.model, "random", keep=8).unwrap()  # and the model can be wrapped again


def test_unwrap_a_model_whose_wrapper_is_held_elsewhere(case):
    held = vlm_tools.wrap(case.model, "fastv", keep=8, layer=1)
    with pytest.raises(RuntimeError, match=r"vlm_tools\.unwrap\(model\)"):
        vlm_tools.wrap(case.model, "random", keep=8)
    assert vlm_tools.unwrap(case.model) is case.model
    assert find_hooks(case.model) == []
    held.unwrap()  # idempotent on an already cleaned model


def test_deepcopy_of_a_wrapped_model_can_be_wrapped_again(case):
    w = vlm_tools.wrap(case.model, "fastv", keep=8, layer=1)
    try:
        clone = copy.deepcopy(case.model)
        assert find_hooks(clone) != []  # the copied hooks are inert copies
        with pytest.warns(RuntimeWarning, match="stale vlm_tools hook"):
            w2 = vlm_tools.wrap(clone, "fastv", keep=8, layer=1)
        torch.testing.assert_close(_logits(w2, case.singles[0]), _logits(w, case.singles[0]))
        w2.unwrap()
        assert find_hooks(clone) == []
    finally:
        w.unwrap()


@pytest.mark.parametrize("name, cfg", [("fastv", {"keep": 8, "layer": 1}),
                                       ("zoo_prune", {"keep": 8, "estimator": "jacobian"})])
def test_pickle_and_deepcopy_of_a_wrapper(name, cfg):
    """A pickled / deep-copied wrapper loads as an independent wrapped copy with the same outputs. (Pickling needs a
    picklable base model: transformers adds local-function hooks to a model on its first forward pass.)"""
    fresh = TinyCase("llava")
    w = vlm_tools.wrap(fresh.model, name, **cfg)
    try:
        blob = pickle.dumps(w)  # before any forward pass
        ref = _logits(w, fresh.singles[0])
        for other in (pickle.loads(blob), copy.deepcopy(w)):
            assert other.model is not fresh.model and other.is_wrapped
            torch.testing.assert_close(_logits(other, fresh.singles[0]), ref)
            assert other.method.name == name
            other.unwrap()
            assert find_hooks(other.model) == []
    finally:
        w.unwrap()


@pytest.mark.parametrize("name, cfg", [("cls_topk", {"keep": 8}), ("fastv", {"keep": 8, "layer": 1}),
                                       ("flowcut", {"keep": 8})])
def test_two_threads_equal_sequential_calls(name, cfg):
    case = TinyCase("llava_next")
    inputs = case.singles
    with vlm_tools.attached(case.model, name, **cfg) as w:
        expected = [(_logits(w, x), [k.clone() for k in w.last_trace.kept[0]]) for x in inputs]
        errors, wrong = [], []

        def worker(i):
            try:
                for _ in range(30):
                    out = _logits(w, inputs[i])
                    kept = w.last_trace.kept[0]  # this thread's own last trace
                    if not (torch.allclose(out, expected[i][0], atol=1e-5)
                            and all(torch.equal(a, b) for a, b in zip(kept, expected[i][1]))):
                        wrong.append(i)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == [] and wrong == []
    assert find_hooks(case.model) == []


@pytest.mark.parametrize("kind", ["llava", "llava_next"])
def test_right_padded_generate_equals_left_padded(kind):
    """A right-padded batch (the tokenizer's default for many checkpoints) generates what the left-padded one does."""
    from vlm_tools.testing import PROMPTS, make_images

    case = TinyCase(kind)
    imgs = make_images()
    tok = case.processor.tokenizer
    tok.padding_side = "right"
    try:
        right = case.processor(images=imgs, text=PROMPTS, return_tensors="pt", padding=True)
    finally:
        tok.padding_side = "left"
    left = case.batch
    assert right["attention_mask"][:, -1].min() == 0  # the fixture really is right-padded
    for name, cfg in [("none", {}), ("cls_topk", {"keep": 8}), ("fastv", {"keep": 8, "layer": 1})]:
        with vlm_tools.attached(case.model, name, **cfg) as w, torch.no_grad():
            a = w.generate(**left, max_new_tokens=4, do_sample=False)
            b = w.generate(**right, max_new_tokens=4, do_sample=False)
            n = left["input_ids"].shape[1]
        assert torch.equal(b[:, :n], right["input_ids"])  # the caller's own prompt comes back
        assert torch.equal(a[:, n:], b[:, n:]), name
