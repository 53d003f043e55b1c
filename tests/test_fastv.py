"""FastV: recomputed ranking vs eager attention, and generation vs a hand-pruned reference (KV cache included)."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import vlm_tools
from vlm_tools.core.hooks import find_hooks
from vlm_tools.pruning.fastv.config import FastVConfig
from vlm_tools.core.attention import attention_rows, layer_inputs, rotated_keys, rotated_queries, visible_keys
from vlm_tools.pruning.fastv.method import FastV
from vlm_tools.testing import TinyCase

NEW = 5
RATIO = {"llava": 0.75, "llava_next": 0.5}


@pytest.fixture(scope="module", params=["llava", "llava_next"])
def case3(request) -> TinyCase:
    """Three decoder layers, so the default K=2 prunes the last one."""
    return TinyCase(request.param, text_layers=3)


@pytest.fixture(scope="module")
def eager3() -> TinyCase:
    case = TinyCase("llava", text_layers=3, attn_implementation="eager")
    with torch.no_grad():  # sharpen the attention so the ranking is not a near-tie
        for layer in case.model.model.language_model.layers:
            layer.self_attn.q_proj.weight.mul_(6.0)
    return case


def _embeds(model, inputs) -> torch.Tensor:
    """The LLM input embeddings the base model builds (image features scattered into the placeholders)."""
    got = {}

    def grab(_m, _a, kw):
        got["e"] = kw["inputs_embeds"]

    h = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        h.remove()
    return got["e"]


def _reference_generate(model, embeds: torch.Tensor, keep: torch.Tensor, k: int, n_new: int):
    """FastV by hand for one sample: layers < k on all tokens, layers >= k on `keep` (original rotary positions),
    greedy decoding with one DynamicCache whose layers >= k hold only the kept tokens. Returns (tokens, the logits
    of each step)."""
    lm = model.model.language_model
    layers = list(lm.layers)
    n = embeds.shape[1]
    cache = DynamicCache()
    pos = torch.arange(n)[None]
    h = embeds
    cos, sin = lm.rotary_emb(h, pos)
    causal = torch.tril(torch.ones(n, n, dtype=torch.bool))[None, None]
    eager = lm.config._attn_implementation == "eager"

    def as_mask(m):
        if not eager:
            return m
        return torch.zeros(m.shape).masked_fill(~m, torch.finfo(torch.float32).min)

    for layer in layers[:k]:
        h = layer(h, attention_mask=as_mask(causal), position_embeddings=(cos, sin), position_ids=pos, cache=cache,
                  use_cache=True)
    h = h[:, keep]
    s = keep.numel()
    short_causal = torch.tril(torch.ones(s, s, dtype=torch.bool))[None, None]
    for layer in layers[k:]:
        h = layer(h, attention_mask=as_mask(short_causal), position_embeddings=(cos[:, keep], sin[:, keep]),
                  position_ids=pos[:, keep], cache=cache, use_cache=True)
    logits = model.lm_head(lm.norm(h[:, -1]))
    tokens = [int(logits.argmax(-1))]
    steps = [logits[0]]
    for t in range(1, n_new):
        p = torch.tensor([[n + t - 1]])
        h = lm.embed_tokens(torch.tensor([[tokens[-1]]]))
        cos1, sin1 = lm.rotary_emb(h, p)
        for i, layer in enumerate(layers):
            kv = cache.get_seq_length(i) + 1
            h = layer(h, attention_mask=as_mask(torch.ones(1, 1, 1, kv, dtype=torch.bool)),
                      position_embeddings=(cos1, sin1), position_ids=p, cache=cache, use_cache=True)
        steps.append(model.lm_head(lm.norm(h[:, -1]))[0])
        tokens.append(int(steps[-1].argmax(-1)))
    return tokens, torch.stack(steps)


def _kept_positions(case, kept_patches: torch.Tensor, inputs) -> torch.Tensor:
    """Original LLM positions kept for a single-image input: all text, newline tokens and the kept patches."""
    ids = inputs["input_ids"][0]
    img = torch.nonzero(ids == case.model.config.image_token_id).flatten()
    start = int(img[0])
    keep = torch.ones(ids.numel(), dtype=torch.bool)
    keep[img] = False
    wanted = set(kept_patches.tolist())
    for j, pidx in enumerate(_layout_of(case, inputs).tolist()):
        if pidx < 0 or pidx in wanted:
            keep[start + j] = True
    return torch.nonzero(keep).flatten()


def _layout_of(case, inputs) -> torch.Tensor:
    """The placeholder layout (patch index or -1) of a single-image input, via the method's own helper."""
    from vlm_tools.core.adapters import get_adapter
    from vlm_tools.core.method import CallContext

    ad = get_adapter(case.model)
    _, plan = ad.plan(inputs["pixel_values"], inputs.get("image_sizes"), [0], None, None, prune=False)
    return CallContext(plan=plan).token_layout(ad, 0)


def test_generation_equals_hand_pruned_reference(case3):
    """Batch of two (left padding; on LLaVA-NeXT different kept counts, so dummy slots) and singles vs by hand."""
    model = case3.model
    with vlm_tools.attached(model, FastV(FastVConfig(ratio=RATIO[case3.kind]))) as wrapped, torch.no_grad():
        batch_out = wrapped.generate(**case3.batch, max_new_tokens=NEW, do_sample=False, output_logits=True,
                                     return_dict_in_generate=True)
        batch_seq, batch_logits = batch_out.sequences, torch.stack(batch_out.logits, dim=1)
        batch_trace = wrapped.last_trace
        width = case3.batch["input_ids"].shape[1]
        for i, single in enumerate(case3.singles):
            seq = wrapped.generate(**single, max_new_tokens=NEW, do_sample=False)
            trace = wrapped.last_trace
            logits = wrapped(**single).logits
            assert logits.shape[1] == single["input_ids"].shape[1]  # full length, pruned positions included
            keep = _kept_positions(case3, trace.kept[0][0], single)
            n_img = int((single["input_ids"] == model.config.image_token_id).sum())
            assert trace.tokens_before == [n_img]
            assert single["input_ids"].shape[1] - keep.numel() == n_img - trace.tokens_after[0]
            ref_tokens, ref_logits = _reference_generate(model, _embeds(model, single), keep, 2, NEW)
            assert seq[0, single["input_ids"].shape[1]:].tolist() == ref_tokens
            torch.testing.assert_close(logits[0, -1], ref_logits[0], atol=1e-5, rtol=1e-4)
            # the left-padded batch decides and generates the same, step by step
            assert torch.equal(batch_trace.kept[i][0], trace.kept[0][0])
            assert batch_seq[i, width:].tolist() == ref_tokens
            torch.testing.assert_close(batch_logits[i], ref_logits, atol=1e-5, rtol=1e-4)
    assert find_hooks(model) == []


def test_eager_attention_generation_equals_reference(eager3):
    model = eager3.model
    single = eager3.singles[0]
    with vlm_tools.attached(model, FastV(FastVConfig(keep=16))) as wrapped, torch.no_grad():
        seq = wrapped.generate(**single, max_new_tokens=NEW, do_sample=False)
        trace = wrapped.last_trace
    keep = _kept_positions(eager3, trace.kept[0][0], single)
    with torch.no_grad():
        ref_tokens, _ = _reference_generate(model, _embeds(model, single), keep, 2, NEW)
    assert seq[0, single["input_ids"].shape[1]:].tolist() == ref_tokens


def test_recomputed_row_equals_eager_attention(eager3):
    """The last token's recomputed row at layer K-1 equals the eager attention weights; FastV keeps their top-k."""
    model = eager3.model
    single = eager3.batch  # left-padded batch of two: padding keys must be excluded
    k = 2
    got = {}

    def grab(_m, args, kwargs):
        got["in"] = layer_inputs(args, kwargs)

    attn = model.model.language_model.layers[k - 1].self_attn
    h = attn.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            out = model(**single, output_attentions=True)
    finally:
        h.remove()
    hidden, pos, mask = got["in"]
    b, n, _ = hidden.shape
    rows = torch.full((b,), n - 1)
    with torch.no_grad():
        probs = attention_rows(rotated_queries(attn, hidden, pos, rows), rotated_keys(attn, hidden, pos),
                               attn.scaling, visible_keys(mask, rows, n, n), attn.num_key_value_groups)
    eager_rows = out.attentions[k - 1][:, :, -1, :]
    torch.testing.assert_close(probs, eager_rows, atol=1e-6, rtol=1e-5)

    keep = 16
    with vlm_tools.attached(model, FastV(FastVConfig(keep=keep, layer=k))) as wrapped, torch.no_grad():
        wrapped(**single)
        trace = wrapped.last_trace
    ids = single["input_ids"]
    for s in range(b):
        img = torch.nonzero(ids[s] == model.config.image_token_id).flatten()
        head_mean = eager_rows[s].mean(0)[img]
        expected = torch.sort(head_mean, descending=True, stable=True).indices[:keep].sort().values
        assert torch.equal(trace.kept[s][0], expected)


def test_uncached_generation_runs_and_agrees_on_the_first_token(case3):
    single = case3.singles[0]
    with vlm_tools.attached(case3.model, FastV(FastVConfig(ratio=0.75))) as wrapped, torch.no_grad():
        cached = wrapped.generate(**single, max_new_tokens=3, do_sample=False)
        uncached = wrapped.generate(**single, max_new_tokens=3, do_sample=False, use_cache=False)
    n = single["input_ids"].shape[1]
    assert uncached.shape == cached.shape
    assert uncached[0, n] == cached[0, n]  # same prompt, same decision at the prefill


def test_bad_configs_raise_clearly(case3):
    with pytest.raises(ValueError, match="layer"):
        FastVConfig(keep=8, layer=0)
    with pytest.raises(TypeError, match="layer"):
        FastVConfig(keep=8, layer=1.5)
    with pytest.raises(ValueError, match="token budget is required"):
        FastVConfig()
    with pytest.raises(ValueError, match="below the number of decoder layers"):
        vlm_tools.wrap(case3.model, FastV(FastVConfig(keep=8, layer=3)))
    assert find_hooks(case3.model) == []


def test_unsupported_attention_backend_raises():
    case = TinyCase("llava")
    case.model.model.language_model.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match="attn_implementation"):
        vlm_tools.wrap(case.model, FastV(FastVConfig(keep=8, layer=1)))
    assert find_hooks(case.model) == []
