"""ZOO-Prune: sensitivities vs plain loops, the Jacobian closed form vs Monte-Carlo, SADS, caching, contract bits."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from transformers.activations import ACT2FN

import vlm_tools
from vlm_tools.core.hooks import find_hooks
from vlm_tools.pruning.zoo_prune.config import ZooPruneConfig
from vlm_tools.pruning.zoo_prune.method import ZooPrune
from vlm_tools.pruning.zoo_prune.scores import (
    activation_derivative,
    jacobian_frobenius_sq,
    jacobian_sensitivity,
    minmax,
    projector_parts,
    random_directions,
    sads_select,
    zeroth_order_sensitivity,
)


class _Projector(nn.Module):
    """Same structure as HF LLaVA's multi_modal_projector."""

    def __init__(self, d_in: int, hidden: int, act: str = "gelu", seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.linear_1 = nn.Linear(d_in, hidden)
        self.act = ACT2FN[act]
        self.linear_2 = nn.Linear(hidden, hidden)

    def forward(self, x):
        return self.linear_2(self.act(self.linear_1(x)))


def _features(model, inputs) -> torch.Tensor:
    """Feature-layer patch tokens of the first image (what `select` receives)."""
    with torch.no_grad():
        out = model.model.vision_tower(inputs["pixel_values"].view(-1, *inputs["pixel_values"].shape[-3:]),
                                       output_hidden_states=True)
    return out.hidden_states[model.config.vision_feature_layer][0, 1:]


def test_zeroth_order_equals_plain_loop(tiny_llava):
    """Batched, chunked central differences == one projector call per token, direction and sign."""
    proj = tiny_llava.model.model.multi_modal_projector
    x = _features(tiny_llava.model, tiny_llava.singles[0])[:7]
    u = random_directions(5, x.shape[1], seed=3)
    h = 0.01
    with torch.no_grad():
        got = zeroth_order_sensitivity(proj, x, u, h, max_rows=20)  # 2 tokens per chunk
        ref = torch.zeros(x.shape[0])
        for i in range(x.shape[0]):
            norms = []
            for j in range(u.shape[0]):
                plus = proj((x[i] + h * u[j])[None])[0]
                minus = proj((x[i] - h * u[j])[None])[0]
                norms.append(float(((plus - minus) / (2 * h)).norm()))
            ref[i] = sum(norms) / len(norms)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)
    # the bank: unit rows, reproducible from the seed, different for another seed
    torch.testing.assert_close(u.norm(dim=1), torch.ones(5))
    assert torch.equal(u, random_directions(5, x.shape[1], seed=3))
    assert not torch.equal(u, random_directions(5, x.shape[1], seed=4))


def _plain_sads(scores: list[float], z: torch.Tensor, k: int) -> list[int]:
    picked = [max(range(len(scores)), key=lambda i: (scores[i], -i))]
    while len(picked) < k:
        best, best_val = None, -math.inf
        for i in range(len(scores)):
            if i in picked:
                continue
            d = min(1.0 - float(torch.nn.functional.cosine_similarity(z[i], z[p], dim=0)) for p in picked)
            val = scores[i] * max(d, 0.0)
            if val > best_val:
                best, best_val = i, val
        picked.append(best)
    return picked


def test_sads_equals_plain_greedy():
    gen = torch.Generator().manual_seed(0)
    s = minmax(torch.rand(40, generator=gen))
    z = torch.randn(40, 12, generator=gen)
    assert sads_select(s, z, 15).tolist() == _plain_sads(s.tolist(), z, 15)
    assert minmax(torch.full((4,), 2.0)).tolist() == [1.0] * 4


def test_wrapped_selection_equals_reference(tiny_llava):
    """The kept indices of a wrapped call == sensitivities + min-max + SADS computed by hand."""
    model = tiny_llava.model
    keep = 10
    cfg = ZooPruneConfig(keep=keep, directions=16, seed=5)
    with vlm_tools.attached(model, ZooPrune(cfg)) as wrapped, torch.no_grad():
        wrapped(**tiny_llava.singles[0])
        kept = wrapped.last_trace.kept[0][0]
    x = _features(model, tiny_llava.singles[0])
    proj = model.model.multi_modal_projector
    with torch.no_grad():
        s = minmax(zeroth_order_sensitivity(proj, x, random_directions(16, x.shape[1], 5), 0.01))
        expected = sorted(_plain_sads(s.tolist(), proj(x), keep))
    assert kept.tolist() == expected


def test_jacobian_expectation_matches_monte_carlo():
    """||J||_F^2 / d == E||Ju||^2 (exact) and sqrt of it ~ E||Ju|| (Jensen gap); MC = zeroth order, many dirs."""
    torch.manual_seed(0)
    proj = _Projector(48, 64).double()
    x = torch.randn(6, 48, dtype=torch.float64)
    l1, act, l2 = projector_parts(proj)
    gram = (l2.weight.T @ l2.weight) * (l1.weight @ l1.weight.T)
    with torch.no_grad():
        fro2 = jacobian_frobenius_sq(x, l1, act, gram)
    # exact identity against autograd's Jacobian
    for i in range(2):
        jac = torch.autograd.functional.jacobian(proj, x[i])
        torch.testing.assert_close(fro2[i], (jac ** 2).sum(), rtol=1e-8, atol=1e-10)
    u = random_directions(6000, 48, seed=1).double()
    with torch.no_grad():
        mc = zeroth_order_sensitivity(proj, x, u, 1e-4, max_rows=12000)
        sq = torch.stack([(((proj(x[i] + 1e-4 * u) - proj(x[i] - 1e-4 * u)) / 2e-4) ** 2).sum(-1).mean()
                          for i in range(x.shape[0])])
        closed = jacobian_sensitivity(x, l1, act, gram)
    assert ((sq - fro2 / 48).abs() / sq).max() < 0.05
    assert ((mc - closed).abs() / mc).max() < 0.05
    assert bool((closed >= mc * 0.999).all())  # sqrt(E X) >= E sqrt(X), up to Monte-Carlo noise


@pytest.mark.parametrize("act", ["gelu", "gelu_pytorch_tanh", "silu", "quick_gelu"])
def test_activation_derivative(act):
    fn = ACT2FN[act]
    z = torch.linspace(-6, 6, 301, dtype=torch.float64, requires_grad=True)
    (auto,) = torch.autograd.grad(fn(z).sum(), z)
    torch.testing.assert_close(activation_derivative(fn, z.detach()), auto, rtol=1e-7, atol=1e-8)
    got32 = activation_derivative(fn, z.detach().float())
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32, auto.float(), rtol=1e-5, atol=1e-6)


def test_rank_agreement_on_tiny_model(tiny_llava):
    """With enough directions the zeroth-order ranking follows the closed form (Spearman close to 1)."""
    model = tiny_llava.model
    proj = model.model.multi_modal_projector
    x = _features(model, tiny_llava.singles[0])
    l1, act, l2 = projector_parts(proj)
    with torch.no_grad():
        closed = jacobian_sensitivity(x, l1, act, (l2.weight.T @ l2.weight) * (l1.weight @ l1.weight.T))
        zo = zeroth_order_sensitivity(proj, x, random_directions(512, x.shape[1], 0), 0.01)

    def ranks(v):
        return torch.argsort(torch.argsort(v)).double()

    rho = torch.corrcoef(torch.stack([ranks(closed), ranks(zo)]))[0, 1]
    assert rho > 0.9


def test_gram_is_cached_per_projector_and_refreshed_on_weight_change():
    method = ZooPrune(ZooPruneConfig(keep=4, estimator="jacobian"))
    a, b = _Projector(8, 16, seed=1), _Projector(8, 16, seed=2)
    attrs = set(a.__dict__)
    ga = method.gram(a)
    assert method.gram(a) is ga  # cached
    gb = method.gram(b)
    assert gb is not ga and not torch.equal(ga, gb)
    with torch.no_grad():
        a.linear_2.weight.mul_(2.0)  # in-place update bumps the version counter
    ga2 = method.gram(a)
    torch.testing.assert_close(ga2, 4.0 * ga)
    assert set(a.__dict__) == attrs  # nothing stored on the module
    del a
    import gc

    gc.collect()
    assert len(method._grams) == 1  # weak keys: the dead projector's entry is gone


@pytest.mark.parametrize("kind", ["llava", "llava_next"])
def test_jacobian_estimator_contract(kind, tiny_llava, tiny_llava_next):
    """Batch with left padding == single runs; keep-all == base model; unwrap leaves nothing behind."""
    case = tiny_llava if kind == "llava" else tiny_llava_next
    model = case.model
    with torch.no_grad():
        base = model(**case.singles[0]).logits
    with vlm_tools.attached(model, ZooPrune(ZooPruneConfig(keep=9, estimator="jacobian"))) as wrapped, \
            torch.no_grad():
        out = wrapped(**case.batch).logits
        batch_trace = wrapped.last_trace
        for i, single in enumerate(case.singles):
            logits = wrapped(**single).logits[0]
            for a, b in zip(batch_trace.kept[i], wrapped.last_trace.kept[0]):
                assert torch.equal(a, b) and a.numel() <= 9
            torch.testing.assert_close(out[i, -logits.shape[0]:], logits, atol=1e-4, rtol=1e-4)
        assert wrapped.last_trace.extra["scores"].shape[0] >= 1
    with vlm_tools.attached(model, ZooPrune(ZooPruneConfig(keep=100_000, estimator="jacobian"))) as wrapped, \
            torch.no_grad():
        assert torch.equal(wrapped(**case.singles[0]).logits, base)
    assert find_hooks(model) == []


def test_bad_configs_raise_clearly():
    with pytest.raises(ValueError, match="estimator"):
        ZooPruneConfig(keep=8, estimator="adam")
    with pytest.raises(ValueError, match="directions"):
        ZooPruneConfig(keep=8, directions=0)
    with pytest.raises(ValueError, match="step"):
        ZooPruneConfig(keep=8, step=0.0)
    with pytest.raises(TypeError, match="directions"):
        ZooPruneConfig(keep=8, directions=2.5)
    with pytest.raises(TypeError, match="linear_1 -> act -> linear_2"):
        projector_parts(nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.Linear(4, 4)))


def test_bf16_projector_is_differenced_in_fp32(tiny_llava):
    """upcast: the bf16 projector's own forward on cached fp32 weight copies == an fp32 copy of the module."""
    import copy

    proj32 = copy.deepcopy(tiny_llava.model.model.multi_modal_projector).to(torch.bfloat16).float()
    proj16 = copy.deepcopy(proj32).to(torch.bfloat16)
    x = _features(tiny_llava.model, tiny_llava.singles[0]).to(torch.bfloat16)
    method = ZooPrune(ZooPruneConfig(keep=4, directions=16))
    with torch.no_grad():
        got = method.sensitivity(proj16, x)
        ref = zeroth_order_sensitivity(proj32, x.float(), method.directions(x.shape[1]), 0.01)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)
    assert method.fp32_params(proj16) is method.fp32_params(proj16)  # cached
    assert all(p.dtype == torch.bfloat16 for p in proj16.parameters())  # the module itself is untouched
    raw = ZooPrune(ZooPruneConfig(keep=4, directions=16, upcast=False))
    assert raw.fp32_params(proj16) is None
    with torch.no_grad():
        assert not torch.allclose(raw.sensitivity(proj16, x), ref, rtol=1e-2)  # bf16 rounding dominates
