"""`vlm-tools explain-eval` (vlm_tools.interpret.evaluation): method variants, the tables against direct calls."""

from __future__ import annotations

import csv
import json
import math

import pytest

from vlm_tools.cli import main
from vlm_tools.interpret import metrics
from vlm_tools.interpret.evaluation import (
    PHOTOS_CAPTION,
    eval_items,
    parse_method_specs,
)


def test_method_variants_parse_and_cast():
    specs = parse_method_specs("random,center, random[seed=3],random[ seed = 4 ]")
    assert [s.label for s in specs] == ["random", "center", "random[seed=3]", "random[seed=4]"]
    assert [s.name for s in specs] == ["random", "center", "random", "random"]
    assert specs[2].config == {"seed": 3} and isinstance(specs[2].config["seed"], int)
    assert parse_method_specs(["center", "random[seed=1]"])[1].config == {"seed": 1}
    with pytest.raises(KeyError, match="registered"):
        parse_method_specs("nosuch")
    with pytest.raises(ValueError, match="random\\[bogus=1\\]"):
        parse_method_specs("random[bogus=1]")
    with pytest.raises(ValueError, match="expected an int"):
        parse_method_specs("random[seed=x]")
    with pytest.raises(ValueError, match="name\\[key=value"):
        parse_method_specs("random[seed=1")
    with pytest.raises(ValueError, match="twice"):
        parse_method_specs("center,center")
    with pytest.raises(ValueError, match="not key=value"):
        parse_method_specs("random[3]")


def test_tuple_fields_take_semicolon_items():
    spec = parse_method_specs("msea[scales=1;2]")[0]
    assert tuple(spec.config["scales"]) == (1.0, 2.0)


def test_explain_eval_cli_on_a_tiny_model_folder(tiny_folder, tmp_path, one_thread):
    out = tmp_path / "out"
    rc = main(["explain-eval", "--model", str(tiny_folder), "--methods", "center,random[seed=3]", "--limit", "2",
               "--photos-limit", "1", "--steps", "2", "--batch-size", "2", "--faithfulness-limit", "1",
               "--no-progress", "--out", str(out)])
    assert rc == 0
    md = (out / "comparison.md").read_text()
    assert "**shapes_vqa** (2 answers, deletion / insertion on the first 1;" in md and "**photos_yesno** (1 answers" in md and PHOTOS_CAPTION in md
    assert "| random[seed=3] |" in md
    rows = list(csv.DictReader((out / "comparison.csv").open()))
    assert [(r["set"], r["method"]) for r in rows] == [("shapes_vqa", "center"), ("shapes_vqa", "random[seed=3]"),
                                                        ("photos_yesno", "center"), ("photos_yesno", "random[seed=3]")]
    data = json.loads((out / "comparison.json").read_text())
    assert data["model"] == str(tiny_folder) and data["steps"] == 2

    # every number against a direct explain + metrics call on the same items and answers
    from vlm_tools.interpret.api import explain
    from vlm_tools.loading import load_model

    model, processor = load_model(str(tiny_folder))
    assert not getattr(processor, "chat_template", None)
    items = eval_items("quick", 2, photos_limit=1)
    for set_name, set_items in items.items():
        records = data["sets"][set_name]["items"]
        assert len(records) == len(set_items)
        for label, name, cfg in (("center", "center", {}), ("random[seed=3]", "random", {"seed": 3})):
            got = next(r for r in rows if r["set"] == set_name and r["method"] == label)
            pg, iou, dels, ins = [], [], [], []
            for k, (it, rec) in enumerate(zip(set_items, records)):
                prompt = f"<image> {it.question}"  # the tiny processor has no chat template
                ids = rec["answer_ids"]
                token = rec["explained"] if rec["explained"] != "first token" else 0
                expl = explain(model, processor, [it.image], [prompt], name, answers=[ids], tokens=[[token]],
                               **cfg)[0]
                pix = metrics.map_on_mask(expl, it.mask)
                flat = pix.ravel()
                best = max(range(flat.size), key=lambda k: (flat[k], -k))  # first maximum
                pg.append(float(it.mask.ravel()[best]))
                iou.append(metrics.obj_iou(expl, it.mask))
                if k == 0:  # --faithfulness-limit 1
                    curves = metrics.faithfulness_curves(expl, model, processor, steps=2)
                    dels.append(float(curves.deletion_auc[0]))
                    ins.append(float(curves.insertion_auc[0]))
                else:
                    assert math.isnan(rec["methods"][label]["deletion_auc"])
                assert rec["methods"][label]["pointing_game"] == pg[-1]
            for key, vals in (("pointing_game", pg), ("obj_iou", iou), ("deletion_auc", dels),
                              ("insertion_auc", ins)):
                assert float(got[key]) == pytest.approx(sum(vals) / len(vals), rel=1e-4, abs=1e-7), (set_name, key)
            assert float(got["ms_per_answer"]) > 0 and int(got["n"]) == len(set_items)


def test_explain_eval_bad_input(tiny_folder, tmp_path, capsys):
    base = ["explain-eval", "--model", str(tiny_folder), "--out", str(tmp_path / "o"), "--limit", "1"]
    assert main([*base, "--methods", "nosuch"]) == 2
    assert "nosuch" in capsys.readouterr().err
    assert main([*base, "--methods", "random[seed=x]"]) == 2
    assert "expected an int" in capsys.readouterr().err
    assert main([*base, "--methods", "random", "--steps", "0"]) == 2
    assert "--steps" in capsys.readouterr().err
    assert main([*base, "--methods", "random", "--kinds", "shape,bogus"]) == 2
    assert "bogus" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_kinds_keep_shape_and_colour_questions():
    items = eval_items("quick", 3, photos=False, kinds=["shape", "color"])["shapes_vqa"]
    assert len(items) == 3 and all(it.word == it.expected for it in items)
    assert all(it.mask.shape == (64, 64) and it.mask.any() for it in items)


def test_a_set_without_answers_prints_na():
    from vlm_tools.interpret.evaluation import EvalResult, MethodRow, MethodSpec, SetResult, comparison_markdown

    row = MethodRow("m", 0, math.nan, math.nan, math.nan, math.nan, math.nan)
    res = EvalResult(methods=[MethodSpec("m", "m")], steps=4, batch_size=1,
                     sets={"photos_yesno": SetResult(0, 0, [row], [])})
    assert "| m | n/a | n/a | n/a | n/a | n/a |" in comparison_markdown(res)
