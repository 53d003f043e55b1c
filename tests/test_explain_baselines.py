"""The captum baselines (integrated_gradients, occlusion) and attention_rollout, against references written here."""

from __future__ import annotations

import functools

import pytest
import torch

import vlm_tools
from vlm_tools._registry import get_explainer
from vlm_tools.core.hooks import HookHandle, find_hooks, hook_snapshot
from vlm_tools.core.models import build_tiny_llava
from vlm_tools.interpret.base import ExplainContext, ExplainSample
from vlm_tools.interpret.forcing import as_wrapped, forced_inputs, generate_answers, teacher_force
from vlm_tools.interpret.methods.integrated_gradients import position_attributions
from vlm_tools.testing import PROMPTS, make_images

# completeness tolerance of integrated gradients (fp32, 64 Gauss-Legendre steps): |sum - (f(x) - f(b))| <= TOL
REL_TOL, ABS_TOL = 1e-2, 1e-6


@pytest.fixture(scope="module", params=["llava", "llava_next"])
def case(request):
    """Tiny model (CLIP tower, SDPA), its processor, two images / prompts and their greedy answers (2 tokens)."""
    torch.manual_seed(0)
    model, processor = build_tiny_llava(request.param)
    imgs = make_images()
    answers = generate_answers(model, processor, imgs, PROMPTS, max_new_tokens=2)
    return request.param, model, processor, imgs, answers


def _ctx(wrapped, processor, imgs, answers, which=(0, 1)) -> ExplainContext:
    return ExplainContext(wrapped, processor, [ExplainSample(imgs[i], PROMPTS[i], answers[i],
                                                             torch.arange(len(answers[i]))) for i in which])


def _run(name, ctx, **cfg):
    info = get_explainer(name)
    return info.cls(info.config_cls.from_dict(cfg)).attribute(ctx)


def _zero_features_hook(module, args, kwargs, positions):
    """Reference baseline: the language model's input embeddings with the image-patch positions set to 0."""
    emb = kwargs["inputs_embeds"].clone()
    for s, pos in enumerate(positions):
        emb[s, pos] = 0
    return args, {**kwargs, "inputs_embeds": emb}


def _check_maps(attrs, ctx):
    for a, f, smp in zip(attrs, ctx.frames(), ctx.samples):
        assert a.maps.shape == (smp.targets.numel(), f.rows, f.cols) and a.maps.dtype == torch.float32
        assert bool(torch.isfinite(a.maps).all())
        assert float(a.maps[:, f.pruned].abs().sum()) == 0.0


@pytest.mark.parametrize("prune", [None, ("cls_topk", {"keep": 8})])
def test_integrated_gradients_completeness(case, prune, one_thread):
    kind, model, processor, imgs, answers = case
    if prune is not None and kind == "llava_next":
        pytest.skip("the pruned case runs on LLaVA-1.5")
    ctx_model = vlm_tools.attached(model, prune[0], **prune[1]) if prune else as_wrapped(model)
    with ctx_model as w:
        answers = generate_answers(w, processor, imgs, PROMPTS, max_new_tokens=3) if prune else answers
        ctx = _ctx(w, processor, imgs, answers)
        res = position_attributions(ctx, n_steps=64, internal_batch_size=64)
        # f(x), f(baseline) from separate passes: the real features, and the image patches zeroed by a hook here
        fx = teacher_force(w, processor, imgs, PROMPTS, answers).answer_logprobs()
        layouts = ctx.clean.layouts
        patch = [torch.nonzero(lay.patch >= 0).flatten() for lay in layouts]
        with HookHandle("test") as h:
            h.forward_pre_hook(w.adapter.language_model, functools.partial(_zero_features_hook, positions=patch),
                               with_kwargs=True)
            fb = teacher_force(w, processor, imgs, PROMPTS, answers).answer_logprobs()
    for s, r in enumerate(res):
        gap = fx[s] - fb[s]
        assert bool((gap.abs() > 1e-4).any())  # the image matters to the tiny model
        tol = REL_TOL * gap.abs() + ABS_TOL
        assert bool(((r.attributions.sum(1) - gap).abs() <= tol).all()), (r.attributions.sum(1), gap)
        assert bool((r.delta.abs() <= tol).all())
        torch.testing.assert_close(r.logprob, fx[s], atol=1e-5, rtol=0)
        off = torch.ones(r.attributions.shape[1], dtype=torch.bool)
        off[patch[s]] = False
        assert float(r.attributions[:, off].abs().max()) == 0.0  # only image features differ from the baseline
    assert find_hooks(model) == []


def test_occlusion_equals_a_loop_over_cells(case, one_thread):
    kind, model, processor, imgs, answers = case
    with as_wrapped(model) as w:
        ctx = _ctx(w, processor, imgs, answers)
        got = _run("occlusion", ctx, perturbations_per_eval=32)
        _check_maps(got, ctx)
        frames = ctx.frames()
        clean = teacher_force(w, processor, imgs, PROMPTS, answers).answer_logprobs()
        n_cells = max(f.rows * f.cols for f in frames)
        step = 1 if kind == "llava" else 3  # LLaVA-NeXT's 288 cells: every third one (time)
        for c in range(0, n_cells, step):  # cell c of every sample (batched), each masked alone
            masked = []
            for f in frames:
                cover = f.cells[:, c] if c < f.rows * f.cols else torch.zeros(f.positions.numel(), dtype=torch.bool)
                masked.append(f.positions[cover])
            lp = teacher_force(w, processor, imgs, PROMPTS, answers, mask_positions=masked).answer_logprobs()
            for s, f in enumerate(frames):
                if c < f.rows * f.cols:
                    torch.testing.assert_close(got[s].maps[:, c // f.cols, c % f.cols], clean[s] - lp[s],
                                               atol=1e-6, rtol=0)
    assert find_hooks(model) == []


def test_occlusion_2x2_windows(case, one_thread):
    kind, model, processor, imgs, answers = case
    if kind != "llava":
        pytest.skip("one family is enough for the window size")
    with as_wrapped(model) as w:
        ctx = _ctx(w, processor, imgs, answers)
        got = _run("occlusion", ctx, window=2, perturbations_per_eval=8)
        f = ctx.frames()[0]
        clean = teacher_force(w, processor, imgs[:1], PROMPTS[:1], answers[:1]).answer_logprobs()[0]
        for r0 in range(0, f.rows, 2):
            for c0 in range(0, f.cols, 2):
                grid = torch.zeros(f.rows, f.cols, dtype=torch.bool)
                grid[r0:r0 + 2, c0:c0 + 2] = True
                pos = f.positions[f.cells[:, grid.flatten()].any(1)]
                lp = teacher_force(w, processor, imgs[:1], PROMPTS[:1], answers[:1],
                                   mask_positions=[pos]).answer_logprobs()[0]
                want = (clean - lp)[:, None, None].expand(-1, *grid[r0:r0 + 2, c0:c0 + 2].shape)
                torch.testing.assert_close(got[0].maps[:, r0:r0 + 2, c0:c0 + 2], want, atol=1e-5, rtol=0)


def test_rollout_equals_a_hand_computation_from_eager_attentions(case, one_thread):
    kind, model, processor, imgs, answers = case
    eager, _ = build_tiny_llava(kind, attn_implementation="eager")
    with as_wrapped(model) as w:
        ctx = _ctx(w, processor, imgs, answers)
        got = _run("attention_rollout", ctx)
        _check_maps(got, ctx)
        frames = ctx.frames()
        layouts = ctx.clean.layouts
        pos = ctx.clean.answer_positions
    batch = forced_inputs(processor, imgs, PROMPTS, answers)
    with torch.no_grad():
        att = eager(**batch, output_attentions=True).attentions
    for s in range(2):
        real = torch.nonzero(batch["attention_mask"][s]).flatten()
        n = real.numel()
        rollout = torch.eye(n)
        for layer in att:  # R = Ã_n ... Ã_1, built from the first layer up
            a = layer[s].float().mean(0)[real][:, real]
            m = 0.5 * a + 0.5 * torch.eye(n)
            m = m / m.sum(-1, keepdim=True)
            rollout = m @ rollout
        for t, p in enumerate(pos[s].tolist()):
            row = torch.zeros(batch["input_ids"].shape[1])
            row[real] = rollout[int(torch.nonzero(real == p - 1))]
            torch.testing.assert_close(got[s].maps[t], frames[s].to_grid(row), atol=1e-5, rtol=0)
            text = ExplainContext.text_positions(layouts[s])
            torch.testing.assert_close(got[s].text[t], row[text], atol=1e-5, rtol=0)
            assert float(got[s].text[t][text >= p].abs().max()) == 0.0  # causal: nothing at or after the token


@pytest.mark.parametrize("name, cfg", [("integrated_gradients", {"n_steps": 4, "internal_batch_size": 3}),
                                       ("occlusion", {"window": 2, "perturbations_per_eval": 5}),
                                       ("attention_rollout", {})])
def test_batch_equals_single_calls(case, name, cfg, one_thread):
    kind, model, processor, imgs, answers = case
    with as_wrapped(model) as w:
        batch = _run(name, _ctx(w, processor, imgs, answers), **cfg)
        singles = [_run(name, _ctx(w, processor, imgs, answers, which=(i,)), **cfg)[0] for i in range(2)]
    for b, one in zip(batch, singles):
        torch.testing.assert_close(b.maps, one.maps, atol=1e-5, rtol=1e-4)
        assert b.scores.keys() == one.scores.keys()
        for k in b.scores:
            torch.testing.assert_close(torch.tensor(b.scores[k]), torch.tensor(one.scores[k]), atol=1e-5, rtol=1e-4)
    assert find_hooks(model) == []


def _raise_hook(module, args, when_grad: bool):
    if torch.is_grad_enabled() or not when_grad:
        raise RuntimeError("boom inside the forward pass")


@pytest.mark.parametrize("name, cfg, when_grad", [
    ("integrated_gradients", {"n_steps": 2}, True),  # raised while captum's interpolation hook is attached
    ("integrated_gradients", {"n_steps": 2}, False),  # raised while captum records the layer's input
    ("occlusion", {"window": 4}, False),
    ("attention_rollout", {}, False)])
def test_no_hooks_after_a_call_or_an_exception(case, name, cfg, when_grad, one_thread):
    kind, model, processor, imgs, answers = case
    before = hook_snapshot(model)
    with as_wrapped(model) as w:
        wrapped = hook_snapshot(model)  # the wrapper's own hooks
        ctx = _ctx(w, processor, imgs, answers)
        _run(name, ctx, **cfg)
        assert hook_snapshot(model) == wrapped
        ctx.clean  # noqa: B018  (the clean pass runs before the failing hook is attached)
        handle = HookHandle("test")
        handle.forward_pre_hook(w.adapter.lm_layers[-1], functools.partial(_raise_hook, when_grad=when_grad))
        try:
            with pytest.raises(RuntimeError, match="boom"):
                _run(name, ctx, **cfg)
        finally:
            handle.remove()
        assert hook_snapshot(model) == wrapped
    assert find_hooks(model) == []
    assert hook_snapshot(model) == before  # captum's own (unmarked) hooks are gone too
