"""flowcut against independent, plainly written references over eager-attention forwards.

Tower stage (LLaVA, batch of 2): per-block scores, adaptive counts and kept sets equal a loop that runs the eager
tower block by block, reads the attention weights the blocks return and the value projections, and prunes with the
official schedule. LLaVA-NeXT text-query stage: scores equal those from the eager attention weights of the pruning
layer, and the logits of forward and of every generate step equal a plain re-computation of the official semantics
(layers up to `llm_layer` on the full sequence, later layers on the kept tokens with contiguous positions).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

import vlm_tools
from vlm_tools.core.method import CallContext, ContextSlot
from vlm_tools.pruning.flowcut.config import FlowCutConfig
from vlm_tools.testing import TinyCase


def _sharpen(model, factor: float = 6.0) -> None:
    """Random towers attend almost uniformly (entropy ratio ~1, adaptive count ~0); sharpen q/k so it is not."""
    adapter = vlm_tools.get_adapter(model)
    with torch.no_grad():
        for block in range(adapter.n_layers):
            attn = adapter.vision_attention(block)
            attn.q_proj.weight.mul_(factor)
            attn.k_proj.weight.mul_(factor)


def _peaky_case(kind: str = "llava", vision: str = "clip", **kw) -> TinyCase:
    case = TinyCase(kind, vision, vision_layers=8, **kw)
    _sharpen(case.model, 6.0 if vision == "clip" else 12.0)
    return case


def _eager(model):
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    return eager


# ---------------------------------------------------------------------------------------------------------------
# an independent FlowCut tower loop (official semantics: one batch, one count = the max over its rows)
def _blocks(model):
    encoder = getattr(model.model.vision_tower, "vision_model", model.model.vision_tower).encoder
    if hasattr(encoder, "layers"):  # CLIP
        return [(layer, layer.self_attn) for layer in encoder.layers]
    return [(layer, layer.attention) for layer in encoder.layer]  # DINOv2


def _reference_tower(model, pixels: torch.Tensor, target: int):
    """Returns `(kept, scores, counts)`: kept patch indices per row, `{block: (index, S)}`, `{block: count}`."""
    blocks = _blocks(model)
    cfg = model.config
    feature_block = cfg.vision_feature_layer % (len(blocks) + 1) - 1
    heads = cfg.vision_config.num_attention_heads
    first = {}

    def grab(module, args):
        first.setdefault("h", args[0])

    hook = blocks[0][0].register_forward_pre_hook(grab)
    with torch.no_grad():
        model.model.vision_tower(pixels)
    hook.remove()
    h = first["h"]
    rows, length, _ = h.shape
    index = torch.arange(length - 1).expand(rows, -1)
    cum, scores, counts = None, {}, {}
    seen = {}

    def weights_hook(module, args, output):
        seen["weights"] = output[1]  # eager attention returns its probabilities

    def values_hook(module, args, output):
        seen["values"] = output

    for block, (layer, attn) in enumerate(blocks):
        h1 = attn.register_forward_hook(weights_hook)
        h2 = attn.v_proj.register_forward_hook(values_hook)
        with torch.no_grad():
            out = layer(h, None)
        h1.remove()
        h2.remove()
        n = h.shape[1] - 1
        if n > target:
            a = seen["weights"][:, :, 0, 1:].mean(1)  # (rows, n)
            v = seen["values"].view(rows, n + 1, heads, -1).transpose(1, 2)  # (rows, heads, L, d)
            s = torch.softmax(torch.einsum("bhd,bhld->bhl", v[:, :, 0], v), dim=-1).mean(1)[:, 1:]
            density = v.mean(1)[:, 1:].abs().sum(-1)
            score = (a / a.sum(-1, keepdim=True) + s / s.sum(-1, keepdim=True)) * density
            cum = score if cum is None else 0.5 * cum + 0.5 * score
            scores[block] = (index.clone(), score)
            rpl = feature_block - block - 1
            if rpl >= 0 and rpl % 2 == 0:
                if rpl == 0:
                    keep = target
                else:
                    p = a / a.sum(-1, keepdim=True)
                    entropy = -(p * torch.log(p + 1e-7)).sum(-1)
                    r = (n - target) / math.sqrt(rpl) * (1 - (entropy / math.log(n)) ** 2)
                    keep = max(n - int(torch.round(r.max())), target)
                top = torch.topk(cum, keep, dim=1).indices.sort(dim=1).values
                out = torch.cat([out[:, :1], torch.gather(out[:, 1:], 1, top[..., None].expand(-1, -1, out.shape[-1]))],
                                dim=1)
                cum = torch.gather(cum, 1, top)
                index = torch.gather(index, 1, top)
                counts[block] = keep
        h = out
    return index, scores, counts


def _run_method(model, pixels: torch.Tensor, **config):
    """Drive the registered Pruner by hand (attach, plan, tower, select) and return its kept sets and state."""
    info = vlm_tools.get_method("flowcut")
    method = info.cls(FlowCutConfig(**config))
    adapter = vlm_tools.get_adapter(model)
    slot = ContextSlot()
    handle = method.attach(model, adapter, slot)
    try:
        rows, plan = adapter.plan(pixels, None, list(range(pixels.shape[0])), config.get("keep"), None, True)
        ctx = CallContext(plan=plan)
        slot.ctx = ctx
        with torch.no_grad():
            out = adapter.vision_tower(rows, output_hidden_states=True, return_dict=True)
        kept = method.select(out.hidden_states[adapter.feature_layer][:, 1:], ctx, adapter)
    finally:
        slot.ctx = None
        handle.remove()
    return kept, ctx


@pytest.mark.parametrize("vision", ["clip", "dinov2"])
def test_tower_scores_counts_and_kept_sets_match_reference(vision):
    case = _peaky_case("llava", vision)
    eager = _eager(case.model)
    pixels = case.batch["pixel_values"]
    kept, ctx = _run_method(case.model, pixels, keep=9)
    history = ctx.state["flowcut"].history
    events = dict(ctx.state["flowcut"].events)
    counts_seen = []
    for r in range(2):  # count_scope="image": each image as the official code ran it, alone
        ref_kept, ref_scores, ref_counts = _reference_tower(eager, pixels[r:r + 1], 9)
        assert torch.equal(kept[r], ref_kept[0])
        assert sorted(ref_scores) == [block for block, *_ in history]
        for block, index, score, _ in history:
            ref_index, ref_score = ref_scores[block]
            n = ref_index.shape[1]
            assert torch.equal(index[r, :n], ref_index[0])
            torch.testing.assert_close(score[r, :n], ref_score[0], rtol=1e-4, atol=1e-6)
        assert {b: c[r] for b, c in events.items()} == ref_counts
        counts_seen.append(list(ref_counts.values()))
    # the test is only meaningful if the adaptive count did something and the two rows differ in length
    assert all(9 < c[0] < 64 for c in counts_seen) and counts_seen[0] != counts_seen[1]
    # the wrapped call (SDPA model, batch with left padding) keeps the same sets
    with vlm_tools.attached(case.model, "flowcut", keep=9) as wrapped, torch.no_grad():
        wrapped(**case.batch)
        trace = wrapped.last_trace
    assert all(torch.equal(a[0], b) for a, b in zip(trace.kept, kept))
    layers = dict(trace.layer_tokens)
    assert layers["vision.0"] == [64, 64] and layers["vision.5"] == [9, 9] and layers["projector"] == [9, 9]


def test_batch_count_scope_matches_reference_on_the_batch():
    case = _peaky_case()
    eager = _eager(case.model)
    pixels = case.batch["pixel_values"]
    kept, ctx = _run_method(case.model, pixels, keep=9, count_scope="batch")
    ref_kept, _, ref_counts = _reference_tower(eager, pixels, 9)  # one count for the batch: the max
    assert all(torch.equal(kept[r], ref_kept[r]) for r in range(2))
    assert {b: c[0] for b, c in ctx.state["flowcut"].events} == ref_counts
    assert ctx.state["flowcut"].key_mask is None  # rectangular rows: no padding mask needed


def test_later_blocks_run_on_fewer_tokens_and_hidden_states_are_shortened():
    case = _peaky_case()
    adapter = vlm_tools.get_adapter(case.model)
    lengths = []
    def grab(module, args):
        lengths.append(args[0].shape[1])

    hooks = [layer.register_forward_pre_hook(grab) for layer in adapter.vision_layers]
    try:
        with vlm_tools.attached(case.model, "flowcut", keep=9) as wrapped, torch.no_grad():
            wrapped(**case.singles[0])
            per_layer = dict(wrapped.last_trace.layer_tokens)
    finally:
        for h in hooks:
            h.remove()
    expect = [65] + [1 + per_layer[f"vision.{b}"][0] for b in range(7)]
    assert lengths == expect and lengths[-1] == 10 and lengths[2] < 65


def test_trailing_register_tokens_are_kept_and_skipped(tmp_path):
    """Stacked with the `registers` modifier (registers appended after the patches, `plan.n_suffix`)."""
    case = _peaky_case()
    registers = vlm_tools.get_method("registers").cls.example_config(case.model, str(tmp_path))
    with vlm_tools.attached(case.model, [("registers", registers), ("flowcut", {"keep": 9})]) as wrapped, \
            torch.no_grad():
        out = wrapped(**case.batch)
        batch = wrapped.last_trace
        for s, single in enumerate(case.singles):
            logits = wrapped(**single).logits[0]
            assert torch.equal(wrapped.last_trace.kept[0][0], batch.kept[s][0])
            torch.testing.assert_close(out.logits[s, -logits.shape[0]:], logits, atol=1e-4, rtol=1e-4)
    counts = dict(batch.layer_tokens)
    assert counts["vision.1"][0] != counts["vision.1"][1] and counts["vision.5"] == [9, 9]


def test_bf16_tower_scores_in_fp32_and_entropy_has_epsilon():
    from vlm_tools.pruning.flowcut.tower import removal_count

    case = _peaky_case()
    model = copy.deepcopy(case.model).to(torch.bfloat16)
    with vlm_tools.attached(model, "flowcut", ratio=0.75) as wrapped, torch.no_grad():
        wrapped(**case.singles[0])
    assert wrapped.last_trace.extra["scores"].dtype == torch.float32
    assert wrapped.last_trace.tokens_after == [16]
    relation = torch.tensor([[0.5, 0.5, 0.0, 0.0]])  # a zero probability: log(0) without the epsilon -> NaN
    count = removal_count(relation, torch.tensor([4]), torch.tensor([1]), rpl=4)
    assert torch.isfinite(count).all()


# ---------------------------------------------------------------------------------------------------------------
# LLaVA-NeXT: budgets, tower stage, text-query LLM stage
def test_llava_next_budget_rule_two_stage_and_tower_only():
    case = _peaky_case("llava_next", text_layers=4)
    adapter = vlm_tools.get_adapter(case.model)
    _, plan = adapter.plan(case.batch["pixel_values"], case.batch["image_sizes"], [0, 1], 12, None, True)
    with vlm_tools.attached(case.model, "flowcut", keep=12) as wrapped, torch.no_grad():
        wrapped(**case.batch)
        trace = wrapped.last_trace
    tower = dict(trace.layer_tokens)["projector"]
    valid = plan.valid.sum(1).tolist()
    assert tower == [max(min(6, v), int(b)) for v, b in zip(valid, plan.budget)]  # official budget // 2 per crop
    newlines = [t - v for t, v in zip(adapter.tokens_per_image(plan), [int(plan.valid[r].sum()) for r in
                                                                       plan.image_rows])]
    assert trace.tokens_after == [12 + newlines[0], 12 + newlines[1]]  # keep per image + every newline
    assert [k[0].numel() for k in trace.kept] == [12, 12]
    assert dict(trace.layer_tokens)["llm.1"] == trace.tokens_after
    with vlm_tools.attached(case.model, "flowcut", keep=12, llm_layer=None) as wrapped, torch.no_grad():
        wrapped(**case.batch)
        trace = wrapped.last_trace
    assert dict(trace.layer_tokens)["projector"] == plan.budget.tolist()  # the shared even split, in the tower
    assert trace.tokens_after == [12 + newlines[0], 12 + newlines[1]]
    for s, rows in enumerate(plan.image_rows):  # never a position that unpadding removes
        crops = trace.kept[s][0] // plan.n_patches
        patches = trace.kept[s][0] % plan.n_patches
        assert bool(plan.valid[torch.tensor(rows)[crops], patches].all())


def _capture_llm_inputs(model, layer: int):
    """Test hooks: the LLM-input ids, the embeddings, and the pruning layer's input / RoPE / mask per call."""
    seen = {"calls": []}

    def top(m, args, kwargs):
        if kwargs.get("input_ids") is not None and "ids" not in seen:
            seen["ids"] = kwargs["input_ids"]

    def lm(m, args, kwargs):
        seen["calls"].append({"embeds": kwargs.get("inputs_embeds")})

    def dec(m, args, kwargs):
        seen["calls"][-1].update(hidden=args[0] if args else kwargs["hidden_states"],
                                 pe=kwargs["position_embeddings"])

    lm_model = model.model.language_model
    return seen, [model.register_forward_pre_hook(top, with_kwargs=True),
                  lm_model.register_forward_pre_hook(lm, with_kwargs=True),
                  lm_model.layers[layer].register_forward_pre_hook(dec, with_kwargs=True)]


def _reference_llm_logits(eager, embeds: torch.Tensor, removed: list[int], n_prompt: int, llm_layer: int):
    """Official semantics without a cache: layers <= llm_layer see everything at positions 0..L-1, later layers see
    the kept tokens only at contiguous positions; returns the logits of the kept sequence."""
    lm = eager.model.language_model
    length = embeds.shape[1]

    def run(layers, h):
        n = h.shape[1]
        pos = torch.arange(n)[None]
        mask = torch.full((n, n), torch.finfo(h.dtype).min).triu(1)[None, None]
        pe = lm.rotary_emb(h, position_ids=pos)
        for layer in layers:
            h = layer(h, attention_mask=mask, position_ids=pos, position_embeddings=pe)
        return h

    with torch.no_grad():
        h = run(lm.layers[: llm_layer + 1], embeds)
        keep = [p for p in range(length) if p not in set(removed)]
        h = run(lm.layers[llm_layer + 1:], h[:, keep])
        return eager.lm_head(lm.norm(h))


def test_llm_stage_scores_and_logits_match_eager_reference():
    case = _peaky_case("llava_next", text_layers=4)
    model, single = case.model, case.singles[0]
    eager = _eager(model)
    cfg = model.config.text_config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    keep = 10
    wrapped = vlm_tools.wrap(model, "flowcut", keep=keep)
    seen, hooks = _capture_llm_inputs(model, 1)
    try:
        with torch.no_grad():
            out = wrapped(**single)
            gen = wrapped.generate(**single, max_new_tokens=3, do_sample=False, return_dict_in_generate=True,
                                   output_logits=True)
    finally:
        for h in hooks:
            h.remove()
        wrapped.unwrap()
    trace_kept = wrapped.last_trace.kept[0][0]
    prefill = seen["calls"][0]
    ids = seen["ids"][0]
    embeds = prefill["embeds"]
    vis = torch.nonzero(ids == model.config.image_token_id).flatten()
    newline = (embeds[0, vis] == model.model.image_newline).all(-1)
    patch_pos = vis[~newline]
    assert patch_pos.numel() > keep
    # relation from the eager attention weights of layer 1 at the last token, renormalised over the image's patches
    layer = eager.model.language_model.layers[1]
    hidden = prefill["hidden"]
    length = hidden.shape[1]
    with torch.no_grad():
        normed = layer.input_layernorm(hidden)
        mask = torch.full((length, length), torch.finfo(hidden.dtype).min).triu(1)[None, None]
        _, weights = layer.self_attn(hidden_states=normed, attention_mask=mask, position_embeddings=prefill["pe"])
        values = layer.self_attn.v_proj(normed)[0].view(length, kv_heads, -1).transpose(0, 1)
    d = values.shape[-1]
    values = values.repeat_interleave(heads // kv_heads, dim=0)  # (heads, L, d)
    rel = weights[0, :, -1, patch_pos]
    rel = (rel / rel.sum(-1, keepdim=True)).mean(0)
    sem = torch.softmax(values[:, -1:] @ values[:, patch_pos].transpose(1, 2) / math.sqrt(d), -1).mean(0)[0]
    density = values[:, patch_pos].mean(0).abs().sum(-1)
    score = (rel / rel.sum() + sem / sem.sum()) * density
    top = torch.topk(score, keep).indices
    removed = sorted(set(patch_pos.tolist()) - set(patch_pos[top].tolist()))
    assert len(removed) == patch_pos.numel() - keep
    # the trace's kept set is the same tokens (original patch indices of the kept LLM positions)
    assert trace_kept.numel() == keep
    # forward logits and every generate step equal the plain re-computation
    ref = _reference_llm_logits(eager, embeds, removed, length, 1)
    assert out.logits.shape[1] == length - len(removed)
    torch.testing.assert_close(out.logits, ref, atol=1e-4, rtol=1e-4)
    tokens = gen.sequences[0, single["input_ids"].shape[1]:]
    embed = eager.model.language_model.embed_tokens
    for step, logits in enumerate(gen.logits):
        full = torch.cat([embeds, embed(tokens[:step])[None]], dim=1) if step else embeds
        ref_step = _reference_llm_logits(eager, full, removed, length, 1)[:, -1]
        torch.testing.assert_close(logits, ref_step, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_llm_stage_batch_generate_equals_single_runs(attn):
    case = _peaky_case("llava_next", text_layers=4, attn_implementation=attn)
    with vlm_tools.attached(case.model, "flowcut", keep=10) as wrapped, torch.no_grad():
        batch = wrapped.generate(**case.batch, max_new_tokens=4, do_sample=False, return_dict_in_generate=True,
                                 output_logits=True)
        batch_trace = wrapped.last_trace
        for s, single in enumerate(case.singles):
            one = wrapped.generate(**single, max_new_tokens=4, do_sample=False, return_dict_in_generate=True,
                                   output_logits=True)
            assert torch.equal(one.sequences[0, -4:], batch.sequences[s, -4:])
            for a, b in zip(one.logits, batch.logits):
                torch.testing.assert_close(a[0], b[s], atol=1e-4, rtol=1e-4)
            assert torch.equal(wrapped.last_trace.kept[0][0], batch_trace.kept[s][0])
            assert wrapped.last_trace.tokens_after == [batch_trace.tokens_after[s]]


def test_errors_are_clear():
    case = TinyCase("llava_next")
    with pytest.raises(ValueError, match="count_scope must be one of"):
        FlowCutConfig(keep=4, count_scope="row")
    with pytest.raises(TypeError, match="llm_layer must be an int"):
        FlowCutConfig(keep=4, llm_layer=1.0)
    with pytest.raises(ValueError, match="llm_layer=5 but the language model has 2 decoder layers"):
        vlm_tools.wrap(case.model, "flowcut", keep=4, llm_layer=5)
    with vlm_tools.attached(case.model, "flowcut", keep=4) as wrapped, pytest.raises(ValueError, match="labels"):
        wrapped(**case.singles[0], labels=case.singles[0]["input_ids"])
    shallow = TinyCase("llava", feature_layer=1)
    with pytest.raises(ValueError, match="at least one vision block before the feature block"):
        vlm_tools.wrap(shallow.model, "flowcut", keep=4)
