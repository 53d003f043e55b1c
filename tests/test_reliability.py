"""Grounding reliability (vlm_tools.interpret.reliability) on tiny LLaVA / LLaVA-NeXT models, against hand computations."""

from __future__ import annotations

import functools
import json
import math
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from PIL import Image

import vlm_tools
from vlm_tools.core.adapters import get_adapter
from vlm_tools.core.hooks import HookHandle, find_hooks, hook_snapshot
from vlm_tools.core.models import build_tiny_llava
from vlm_tools.interpret.forcing import forced_inputs, teacher_force
from vlm_tools.interpret.reliability import GROUNDING_FEATURES, Combiner, Reliability, reliability
from vlm_tools.testing import PROMPTS, make_images

ANSWERS = ["bottom show bottom", "photo right"]


@pytest.fixture(scope="module", params=["llava", "llava_next"])
def pair(request):
    """The same tiny model twice (same seed): SDPA (under test) and eager (hand-computed attention)."""
    sdpa, processor = build_tiny_llava(request.param)
    eager, _ = build_tiny_llava(request.param, attn_implementation="eager")
    return sdpa, eager, processor


def _mismatched(seed: int = 7) -> list[Image.Image]:
    return [im.transpose(Image.Transpose.ROTATE_180) for im in make_images(seed)]


def _count_hook(module, args, kwargs, counter):
    counter.append(1)


@contextmanager
def counting(model):
    """Count language-model calls with a plain (unmarked) torch hook: a vlm_tools-marked one would be taken for a
    stale hook by `wrap`."""
    calls: list = []
    handle = get_adapter(model).language_model.register_forward_pre_hook(
        functools.partial(_count_hook, counter=calls), with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


def _capture_hook(module, args, kwargs, store):
    store.append(kwargs["inputs_embeds"].detach().clone())


def test_exactly_three_forward_passes(pair, one_thread):
    model, _, processor = pair
    with counting(model) as calls:
        out = reliability(model, processor, make_images(), PROMPTS, ANSWERS, mismatched=_mismatched())
    assert len(calls) == 3
    assert [len(r.tokens) for r in out] == [3, 2]
    assert find_hooks(model) == []


def test_masked_pass_equals_removing_the_image_positions(pair, one_thread):
    """Masking = the same sequence with the image positions deleted and the original position ids kept."""
    model, _, processor = pair
    imgs = make_images()
    answers = [torch.tensor(processor.tokenizer(a, add_special_tokens=False)["input_ids"]) for a in ANSWERS]
    masked = teacher_force(model, processor, imgs, PROMPTS, answers, mask_images=True)
    batch = forced_inputs(processor, imgs, PROMPTS, answers)
    store: list = []
    lm = get_adapter(model).language_model
    with HookHandle("capture") as h, torch.no_grad():
        h.forward_pre_hook(lm, functools.partial(_capture_hook, store=store), with_kwargs=True)
        model(**batch)
    embeds = store[0]
    image_id = model.config.image_token_id
    for s in range(2):
        ids, mask = batch["input_ids"][s], batch["attention_mask"][s]
        keep = torch.nonzero(ids != image_id).flatten()
        assert keep.numel() < ids.numel()
        with torch.no_grad():
            hidden = lm(inputs_embeds=embeds[s:s + 1, keep], attention_mask=mask[None, keep],
                        position_ids=keep[None]).last_hidden_state
            logits = model.lm_head(hidden)[0]
        real = mask[keep].bool()
        assert torch.isfinite(masked.logits[s, keep][real]).all()
        torch.testing.assert_close(masked.logits[s, keep][real], logits[real], atol=1e-4, rtol=1e-4)


def _hand_pass(model, processor, image, prompt, ids, mask_image=False):
    """One explicit forward of prompt + answer (no padding): logits and hidden states, eager attention."""
    enc = processor(images=[image], text=[prompt], return_tensors="pt")
    input_ids = torch.cat([enc["input_ids"][0], ids])[None]
    attn = torch.ones_like(input_ids)
    if mask_image:
        attn = (input_ids != model.config.image_token_id).long()
    extra = {"image_sizes": enc["image_sizes"]} if "image_sizes" in enc else {}
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=attn, pixel_values=enc["pixel_values"],
                    output_hidden_states=True, output_attentions=True, **extra)
    return input_ids[0], out


def test_features_equal_a_hand_computation_from_three_forwards(pair, one_thread):
    sdpa, eager, processor = pair
    imgs, mis = make_images(), _mismatched()
    got = reliability(sdpa, processor, imgs, PROMPTS, ANSWERS, mismatched=mis)
    image_id = sdpa.config.image_token_id
    for s in range(2):
        ids = torch.tensor(processor.tokenizer(ANSWERS[s], add_special_tokens=False)["input_ids"])
        seq, clean = _hand_pass(eager, processor, imgs[s], PROMPTS[s], ids)
        _, masked = _hand_pass(eager, processor, imgs[s], PROMPTS[s], ids, mask_image=True)
        seq_x, mism = _hand_pass(eager, processor, mis[s], PROMPTS[s], ids)
        n, t_len = seq.numel(), ids.numel()
        feats = got[s].features
        assert got[s].token_ids == ids.tolist()
        for t in range(t_len):
            pos = n - t_len + t - 1  # the row predicting answer token t
            y = int(ids[t])
            lp = [float(torch.log_softmax(o.logits[0, pos].double(), -1)[y]) for o in (clean, masked, mism)]
            lg = [float(o.logits[0, pos, y]) for o in (clean, masked, mism)]
            s_log = lp[0] - math.log(max(math.exp(lp[1]), math.exp(lp[2])))
            assert feats["s_log"][t] == pytest.approx(s_log, abs=1e-4)
            assert feats["s_logit"][t] == pytest.approx(lg[0] - max(lg[1], lg[2]), abs=1e-4)
            assert feats["s_prob"][t] == pytest.approx(1 / (1 + math.exp(-s_log)), abs=1e-4)
            assert feats["d_clean"][t] == pytest.approx(math.exp(lp[0]) - math.exp(lp[1]), abs=1e-5)
            assert feats["d_mis"][t] == pytest.approx(math.exp(lp[0]) - math.exp(lp[2]), abs=1e-5)
            assert feats["p_clean"][t] == pytest.approx(math.exp(lp[0]), abs=1e-5)
            a = clean.hidden_states[-1][0, pos].double()
            b = masked.hidden_states[-1][0, pos].double()
            cos = float(a @ b / (a.norm() * b.norm()))
            assert feats["s_hid"][t] == pytest.approx(math.acos(min(1.0, cos)) / math.pi, abs=2e-4)
            mass = []
            for out, sq in ((clean, seq), (mism, seq_x)):
                img_pos = (sq == image_id)
                per_layer = [float(layer[0, :, pos][:, img_pos].sum(-1).mean()) for layer in out.attentions]
                mass.append(sum(per_layer) / len(per_layer))
            assert feats["attn_diff"][t] == pytest.approx(mass[0] - mass[1], abs=1e-5)
        assert got[s].perplexity == pytest.approx(
            math.exp(-np.mean([math.log(feats["p_clean"][t]) for t in range(t_len)])), rel=1e-6)


def test_sentence_score_is_the_tail_mean(pair, one_thread):
    model, _, processor = pair
    r = reliability(model, processor, make_images()[0], PROMPTS[0], max_new_tokens=14)
    values = sorted(float(x) for x in r.reliability)
    assert len(values) > 10  # ceil(0.1 T) = 2: a real tail, not the minimum
    k = math.ceil(0.1 * len(values))
    assert r.sentence_score == pytest.approx(sum(values[:k]) / k, abs=1e-12)
    assert all(0.0 <= v <= 1.0 for v in values)
    d = r.to_dict()
    for key in ("tokens", "reliability", "sentence_score", *GROUNDING_FEATURES, "confidence", "entropy"):
        assert key in d
    json.dumps(d)


def test_a_batch_equals_single_calls(pair, one_thread):
    model, _, processor = pair
    imgs, mis = make_images(), _mismatched()
    batch = reliability(model, processor, imgs, PROMPTS, mismatched=mis, max_new_tokens=4)
    for s in range(2):
        one = reliability(model, processor, imgs[s], PROMPTS[s], mismatched=mis[s], max_new_tokens=4)
        assert one.token_ids == batch[s].token_ids
        np.testing.assert_allclose(one.reliability, batch[s].reliability, atol=1e-5)
        for name in GROUNDING_FEATURES:
            np.testing.assert_allclose(one.features[name], batch[s].features[name], atol=1e-4)
        assert one.sentence_score == pytest.approx(batch[s].sentence_score, abs=1e-5)


def test_bad_input_raises_clearly_and_leaves_no_hooks(pair):
    model, _, processor = pair
    imgs = make_images()
    before = hook_snapshot(model)
    small = imgs[0].resize((10, 10))
    with pytest.raises(ValueError, match="10x10 RGB .* clean image is 60x40 RGB"):
        reliability(model, processor, imgs[0], PROMPTS[0], "bottom", mismatched=small)
    with pytest.raises(ValueError, match="60x40 L .* clean image is 60x40 RGB"):
        reliability(model, processor, imgs[0], PROMPTS[0], "bottom", mismatched=imgs[0].convert("L"))
    with pytest.raises(ValueError, match="no reference image has the clean image's size"):
        reliability(model, processor, imgs[0], PROMPTS[0], "bottom", reference=[small])
    with pytest.raises(ValueError, match="empty"):
        reliability(model, processor, imgs[0], PROMPTS[0], "")
    with pytest.raises(TypeError, match="answer must be a string"):
        reliability(model, processor, imgs[0], PROMPTS[0], [5, 6])
    with pytest.raises(TypeError, match="unsupported model"):
        reliability(get_adapter(model).language_model, processor, imgs[0], PROMPTS[0], "bottom")
    with pytest.raises(ValueError, match="layer must be"):
        reliability(model, processor, imgs[0], PROMPTS[0], "bottom", layer=99)
    assert hook_snapshot(model) == before and find_hooks(model) == []


def test_reference_draw_is_deterministic_and_needs_no_mismatched(pair, one_thread):
    model, _, processor = pair
    img = make_images()[0]
    pool = [make_images(seed)[0] for seed in (1, 2, 3)]
    a = reliability(model, processor, img, PROMPTS[0], "bottom show", reference=pool)
    b = reliability(model, processor, img, PROMPTS[0], "bottom show", reference=list(reversed(pool))[::-1])
    np.testing.assert_array_equal(a.reliability, b.reliability)
    default = reliability(model, processor, img, PROMPTS[0], "bottom show")  # seeded noise image
    again = reliability(model, processor, img, PROMPTS[0], "bottom show")
    np.testing.assert_array_equal(default.reliability, again.reliability)


def test_pruned_wrapped_model_runs(pair, one_thread):
    model, _, processor = pair
    with vlm_tools.attached(model, "cls_topk", keep=4) as wrapped, counting(model) as calls:
        out = reliability(wrapped, processor, make_images(), PROMPTS, ANSWERS, mismatched=_mismatched())
        assert wrapped.last_trace.tokens_after[0] < wrapped.last_trace.tokens_before[0]
    assert len(calls) == 3
    full = reliability(model, processor, make_images(), PROMPTS, ANSWERS, mismatched=_mismatched())
    assert not np.allclose(out[0].features["s_log"], full[0].features["s_log"])
    for r in out:
        assert np.isfinite(r.reliability).all() and ((r.reliability >= 0) & (r.reliability <= 1)).all()
    assert find_hooks(model) == []


def test_mean_colour_masking_is_a_mean_colour_image_pass(pair, one_thread):
    model, _, processor = pair
    img = make_images()[0]
    r = reliability(model, processor, img, PROMPTS[0], "bottom show", masked="mean_color")
    mean = tuple(int(round(v)) for v in np.asarray(img, dtype=np.float64).reshape(-1, 3).mean(0))
    ids = torch.tensor(processor.tokenizer("bottom show", add_special_tokens=False)["input_ids"])
    forced = teacher_force(model, processor, [Image.new("RGB", img.size, mean)], PROMPTS[:1], [ids])
    p = forced.answer_logprobs()[0].exp().double().numpy()
    np.testing.assert_allclose(r.features["p_masked"], p, atol=1e-6)


def _results(model, processor, n=6):
    imgs = [make_images(seed)[seed % 2] for seed in range(n)]
    prompts = [PROMPTS[seed % 2] for seed in range(n)]
    return reliability(model, processor, imgs, prompts, max_new_tokens=3)


def test_combiners_fit_save_load_and_rescore(pair, tmp_path, one_thread):
    model, _, processor = pair
    results = _results(model, processor)
    ref = Combiner.from_reference(results)
    assert ref.kind == "unsupervised" and len(ref.attn_quantiles) == 101
    raw = np.concatenate([r.features["attn_diff"] for r in results])
    scaled = ref.scale_attention(raw)
    assert scaled.min() >= 0 and scaled.max() <= 1 and np.all(np.diff(scaled[np.argsort(raw)]) >= -1e-12)
    labels = [0, 1, 0, 1, 1, 0]
    for meta in (False, True):
        fitted = Combiner.fit(results, labels, meta=meta, reference=ref)
        assert fitted.kind == ("meta" if meta else "fitted")
        path = fitted.save(tmp_path / f"c{meta}.json")
        loaded = Combiner.load(path)
        assert loaded == fitted
        r = results[0].rescored(loaded)
        # hand: sigmoid(w . z + b) per token, z from the stored mean / std
        feats = r.features
        z = sum(loaded.weights[f] * (feats[f] - loaded.mean[f]) / loaded.std[f] for f in loaded.features)
        np.testing.assert_allclose(r.reliability, 1 / (1 + np.exp(-(z + loaded.bias))), atol=1e-12)
    # the unsupervised score by hand: sigmoid of the mean z-score of the seven features
    r = results[1].rescored(ref)
    z = np.mean([(r.features[f] - ref.mean[f]) / ref.std[f] for f in GROUNDING_FEATURES], axis=0)
    np.testing.assert_allclose(r.reliability, 1 / (1 + np.exp(-z)), atol=1e-12)
    with pytest.raises(ValueError, match="both classes"):
        Combiner.fit(results, [1] * 6)
    with pytest.raises(ValueError, match="unknown Combiner field"):
        Combiner.from_dict({**ref.to_dict(), "bogus": 1})


def test_strip_outputs_escape_tokens(pair, tmp_path):
    model, _, processor = pair
    r = reliability(model, processor, make_images()[0], PROMPTS[0], "bottom show")
    from dataclasses import replace

    odd = replace(r, tokens=["<script>", "a&b"])
    text = odd.strip_html()
    assert "<script>" not in text and "&lt;script&gt;" in text and "a&amp;b" in text
    path = odd.strip_png(tmp_path / "strip.png")
    assert Image.open(path).size[0] > 50
    assert isinstance(r, Reliability)


@pytest.mark.parametrize("extra", [[], ["--prune", "cls_topk", "--keep", "4", "--answer", "bottom <b>"]])
def test_cli_writes_json_png_and_html(tmp_path, extra, one_thread):
    from vlm_tools.cli import main

    img = tmp_path / "img.png"
    make_images()[0].save(img)
    out = tmp_path / "out"
    rc = main(["reliability", "--model", "tiny", "--image", str(img), "--prompt", "what is in the image ?",
               "--max-new-tokens", "3", "--out", str(out), *extra])
    assert rc == 0
    data = json.loads((out / "reliability.json").read_text())
    assert len(data["tokens"]) == len(data["reliability"]) == len(data["s_log"]) > 0
    assert 0 <= data["sentence_score"] <= 1
    assert (data["prune"] is None) == (not extra)
    page = (out / "strip.html").read_text()
    assert "<b>" not in page.replace("<body>", "")
    assert Image.open(out / "strip.png").size[0] > 50


def test_cli_usage_errors(tmp_path, capsys):
    from vlm_tools.cli import main

    img = tmp_path / "img.png"
    make_images()[0].save(img)
    assert main(["reliability", "--model", "tiny", "--image", str(img), "--prompt", "x", "--prune", "cls_topk",
                 "--out", str(tmp_path / "o")]) == 2
    assert "--keep N go together" in capsys.readouterr().err
    assert main(["reliability", "--model", "tiny", "--image", str(tmp_path / "nope.png"), "--prompt", "x",
                 "--out", str(tmp_path / "o")]) == 2
    assert "nope.png" in capsys.readouterr().err
    assert main(["reliability", "--model", "tiny", "--image", str(img), "--prompt", "x", "--answer", "",
                 "--out", str(tmp_path / "o")]) == 2
    assert "empty" in capsys.readouterr().err
