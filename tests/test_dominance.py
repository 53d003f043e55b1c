"""Text dominance (MDI / AEI): recomputed rows during generate vs a hand computation from eager attention."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import vlm_tools
from vlm_tools.core.hooks import find_hooks
from vlm_tools.analysis import DominanceCollector, compute_stats, dominance, plot_comparison, stage_layers
from vlm_tools.pruning.fastv.config import FastVConfig
from vlm_tools.pruning.fastv.method import FastV
from vlm_tools.testing import PROMPTS, TinyCase

NEW = 4


@pytest.fixture(scope="module")
def eager() -> TinyCase:
    case = TinyCase("llava", text_layers=3, attn_implementation="eager")
    with torch.no_grad():  # peaked attention, so MDI is far from 1 and differs per layer
        for i, layer in enumerate(case.model.model.language_model.layers):
            layer.self_attn.q_proj.weight.mul_(10.0 + 5 * i)
            layer.self_attn.k_proj.weight.mul_(8.0)
    return case


def _hand(out, ids: torch.Tensor, mask: torch.Tensor, image_token_id: int, n_layers: int, sample: int = 0):
    """Per layer `(A_T, A_O, |T|, |O|)` from `generate(output_attentions=True)`: the last row of every step."""
    n = ids.shape[1]
    real = mask[sample].bool()
    is_img = (ids[sample] == image_token_id) & real
    is_txt = (ids[sample] != image_token_id) & real
    res = []
    for layer in range(n_layers):
        a_t = a_o = 0.0
        for step in out.attentions:
            row = step[layer][sample, :, -1, :n].sum(0)  # heads summed, prompt keys only
            a_t += float(row[is_txt].sum())
            a_o += float(row[is_img].sum())
        res.append((a_t, a_o, int(is_txt.sum()), int(is_img.sum())))
    return res


def _check(report_layers, hand):
    for st, (a_t, a_o, n_t, n_o) in zip(report_layers, hand):
        ref = compute_stats("x", [0], a_t, a_o, n_t, n_o)
        assert st.n_text == n_t and st.n_image == n_o
        assert st.mdi == pytest.approx(ref.mdi, rel=1e-5)
        assert st.aei_text == pytest.approx(ref.aei_text, rel=1e-5)
        assert st.aei_image == pytest.approx(ref.aei_image, rel=1e-5)
        assert st.text_attention == pytest.approx(a_t / (a_t + a_o), rel=1e-5)


def test_matches_hand_computation_from_eager_attention(eager):
    model = eager.model
    batch = eager.batch  # left-padded batch of two: padding keys excluded, each sample on its own
    with DominanceCollector(model) as col, torch.no_grad():
        out = model.generate(**batch, max_new_tokens=NEW, do_sample=False, output_attentions=True,
                             return_dict_in_generate=True)
    n_layers = len(model.model.language_model.layers)
    for s in range(2):
        hand = _hand(out, batch["input_ids"], batch["attention_mask"], model.config.image_token_id, n_layers, s)
        report = col.report(sample=s, boundaries=(1, 2))
        assert report.n_generated == NEW
        _check(report.layers, hand)
        # a stage sums the masses of its layers before normalising
        ref = compute_stats("late", [2], hand[2][0], hand[2][1], hand[2][2], hand[2][3])
        assert report.stages["late"].mdi == pytest.approx(ref.mdi, rel=1e-5)
        both = compute_stats("x", [0, 1], hand[0][0] + hand[1][0], hand[0][1] + hand[1][1], hand[0][2], hand[0][3])
        assert stage_layers(3, (0, 2))["middle"] == [0, 1]
        assert col.report(sample=s, boundaries=(0, 2)).stages["middle"].mdi == pytest.approx(both.mdi, rel=1e-5)
        assert max(abs(st.mdi - 1.0) for st in report.layers) > 0.1  # the check is not vacuous
    assert find_hooks(model) == []


def test_matches_hand_computation_after_cls_topk(eager):
    """Inside a wrapped call the LLM sees fewer image tokens; the metrics follow the shrunk sequence."""
    model = eager.model
    single = eager.singles[0]
    keep = 8
    with vlm_tools.attached(model, "cls_topk", keep=keep) as wrapped, torch.no_grad():
        with DominanceCollector(model, wrapper=wrapped) as col:
            out = wrapped.generate(**single, max_new_tokens=NEW, do_sample=False, output_attentions=True,
                                   return_dict_in_generate=True)
    ids = single["input_ids"]
    is_img = ids[0] == model.config.image_token_id
    start = int(torch.nonzero(is_img)[0])
    shrunk = torch.cat([ids[:, :start + keep], ids[:, start + is_img.sum():]], dim=1)
    hand = _hand(out, shrunk, torch.ones_like(shrunk), model.config.image_token_id, 3)
    report = col.report()
    assert report.layers[0].n_image == keep
    _check(report.layers, hand)


def test_dominance_api_with_fastv_counts_kept_tokens(eager):
    """With FastV the layers from K on see only the kept image tokens; the earlier layers equal the base run (one
    generated token, so the queries are the same)."""
    model = eager.model
    img = Image.fromarray((np.random.default_rng(1).random((32, 32, 3)) * 255).astype("uint8"))
    base = dominance(model, eager.processor, img, PROMPTS[0], max_new_tokens=1)
    pruned = dominance(model, eager.processor, img, PROMPTS[0], method=FastV(FastVConfig(keep=10)),
                       max_new_tokens=1)
    n_img = base.layers[0].n_image
    assert [s.n_image for s in pruned.layers] == [n_img, n_img, 10]
    for a, b in zip(base.layers[:2], pruned.layers[:2]):
        assert a.mdi == pytest.approx(b.mdi, rel=1e-5)
    assert pruned.method == "fastv" and pruned.method_config["keep"] == 10
    assert find_hooks(model) == []


def test_report_serialises_and_plots(eager, tmp_path):
    img = Image.fromarray((np.random.default_rng(2).random((32, 32, 3)) * 255).astype("uint8"))
    reports = {"base": dominance(eager.model, eager.processor, img, PROMPTS[1], max_new_tokens=2)}
    reports["cls_topk 0.75"] = dominance(eager.model, eager.processor, img, PROMPTS[1], "cls_topk", ratio=0.75,
                                         max_new_tokens=2)
    assert reports["cls_topk 0.75"].layers[0].n_image == 16  # 64 patches, 75% removed
    d = reports["base"].to_dict()
    assert set(d["stages"]) == {"early", "middle", "late"}
    json.loads(json.dumps(d, allow_nan=False))
    path = reports["base"].save(tmp_path / "r.json")
    assert json.loads(path.read_text())["n_generated"] == 2
    png = reports["base"].plot(tmp_path / "r.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_comparison(reports, tmp_path / "c.png").stat().st_size > 1000
    assert list(tmp_path.glob(".*tmp")) == []


def test_stage_boundaries_and_errors(eager):
    assert stage_layers(32) == {"early": list(range(11)), "middle": list(range(11, 21)),
                                "late": list(range(21, 32))}
    assert stage_layers(6, (2, 4))["late"] == [4, 5]
    with pytest.raises(ValueError, match="0 <= a <= b <= 3"):
        stage_layers(3, (2, 5))
    img = Image.new("RGB", (32, 32))
    with pytest.raises(ValueError, match="0 <= a <= b"):
        dominance(eager.model, eager.processor, img, PROMPTS[0], boundaries=(3, 1))
    with pytest.raises(ValueError, match="without a method"):
        dominance(eager.model, eager.processor, img, PROMPTS[0], ratio=0.5)
    with pytest.raises(ValueError, match="max_new_tokens"):
        dominance(eager.model, eager.processor, img, PROMPTS[0], max_new_tokens=0)
    with pytest.raises(ValueError, match="image placeholder"):
        dominance(eager.model, eager.processor, img, "no image here")
    assert find_hooks(eager.model) == []
    nan = compute_stats("x", [], 0.0, 0.0, 0, 0)
    assert nan.mdi != nan.mdi and nan.to_dict()["mdi"] is None


def test_cli_writes_json_and_png(tmp_path):
    from vlm_tools.cli import main

    img = tmp_path / "img.png"
    Image.fromarray((np.random.default_rng(3).random((32, 32, 3)) * 255).astype("uint8")).save(img)
    rc = main(["dominance", "--model", "tiny", "--image", str(img), "--prompt", "what is in the image ?",
               "--method", "cls_topk", "--ratios", "0.75,0.9", "--max-new-tokens", "2", "--out", str(tmp_path)])
    assert rc == 0
    data = json.loads((tmp_path / "dominance.json").read_text())
    assert [r["label"] for r in data["runs"]] == ["base", "cls_topk ratio=0.75", "cls_topk ratio=0.9"]
    assert data["runs"][1]["layers"][0]["n_image"] == 16
    assert (tmp_path / "dominance.png").read_bytes()[:4] == b"\x89PNG"


def test_dominance_with_flowcut_on_llava_next_counts_what_each_layer_saw():
    """FlowCut's LLaVA-NeXT stage shortens the sequence after decoder layer 1: every layer's |T| and |O| are the
    tokens it attended to (read from the published kept layout), equal to the trace and to a count by hand."""
    case = TinyCase("llava_next", text_layers=4)
    model, proc = case.model, case.processor
    img = Image.fromarray((np.random.default_rng(4).random((40, 60, 3)) * 255).astype("uint8"))
    inputs = proc(images=[img], text=[PROMPTS[0]], return_tensors="pt")
    n_text = int((inputs["input_ids"] != model.config.image_token_id).sum())
    seen: dict[int, int] = {}

    def grab(layer):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            seen.setdefault(layer, hidden.shape[1])  # the prefill: the first call of the generation
        return hook

    layers = model.model.language_model.layers
    handles = [lay.register_forward_pre_hook(grab(i), with_kwargs=True) for i, lay in enumerate(layers)]
    try:
        with vlm_tools.attached(model, "flowcut", keep=8) as wrapped:
            report = dominance(wrapped, proc, img, PROMPTS[0], max_new_tokens=2)
            trace = wrapped.last_trace
    finally:
        for h in handles:
            h.remove()
    by_hand = [seen[i] - n_text for i in range(len(layers))]
    after = dict(trace.layer_tokens)["llm.1"][0]
    assert by_hand[2] == by_hand[3] == after < by_hand[0] == by_hand[1]
    assert [s.n_image for s in report.layers] == by_hand
    assert [s.n_text for s in report.layers] == [n_text] * len(layers)
    assert find_hooks(model) == []


def test_json_rule_dollar_labels_and_captions(eager, tmp_path):
    """One JSON rule (non-finite -> null, valid JSON from save() and the CLI alike); user text with `$` is drawn
    literally (no mathtext); the chart shows the prompt and the answer."""
    img = Image.fromarray((np.random.default_rng(5).random((32, 32, 3)) * 255).astype("uint8"))
    rep = dominance(eager.model, eager.processor, img, PROMPTS[1], max_new_tokens=2)
    rep.layers[0].mdi = float("inf")
    rep.stages["early"].mdi = float("nan")
    data = json.loads(rep.save(tmp_path / "r.json").read_text())
    assert data["layers"][0]["mdi"] is None and data["stages"]["early"]["mdi"] is None
    rep.method, rep.method_config = "cls_topk", {"tag": "$x^2$ costs $5"}
    fig = rep.figure()
    texts = [t.get_text() for t in fig.texts] + [ax.get_title() for ax in fig.axes]
    assert any("prompt: <image> describe it" in t for t in texts) and any("answer:" in t for t in texts)
    from vlm_tools.core.io import figure_png

    assert figure_png(fig)[:4] == b"\x89PNG"  # `$` in the label did not go through mathtext
    both = {"$base$": rep, "a|b $1": rep}
    assert plot_comparison(both, tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_errors_are_one_line_with_status_2(tmp_path, capsys):
    from vlm_tools.cli import main

    img = tmp_path / "img.png"
    Image.new("RGB", (32, 32)).save(img)
    locked = tmp_path / "a_file"  # a file where the folder should be: not writable, also for root
    locked.write_text("x")
    assert main(["dominance", "--model", "tiny", "--image", str(img), "--prompt", "what ?",
                 "--out", str(locked / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot write to the output folder" in err and str(locked) in err
    assert main(["dominance", "--model", "tiny", "--image", str(tmp_path / "nope.png"), "--prompt", "x",
                 "--out", str(tmp_path / "o")]) == 2
    assert "nope.png" in capsys.readouterr().err
    assert main(["dominance", "--model", str(tmp_path / "no_model"), "--image", str(img), "--prompt", "x",
                 "--out", str(tmp_path / "o")]) == 2
    assert "no such folder" in capsys.readouterr().err
