"""`vlm-tools eval`: grid specs (flags and run YAMLs), the comparison table, re-runs that skip finished cells,
rank-0-only writing, and bad input failing before any model loads."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from vlm_tools import cli
from vlm_tools.integrations.eval_cli import spec_from_args
from vlm_tools.integrations.grid import GridSpec, MethodSpec, build_table, parse_methods, render_markdown
from vlm_tools.integrations.model_args import DistInfo

REPO = Path(__file__).resolve().parents[1]
STANDARD_TASKS = {"gqa", "mme", "pope", "scienceqa_img", "textvqa_val", "mmbench_en_dev_static", "seedbench"}


def _args(*argv: str):
    return cli.build_parser().parse_args(["eval", *argv])


@pytest.fixture(scope="session")
def eval_fixture(tmp_path_factory):
    from vlm_tools.integrations.testing import build_eval_fixture

    return build_eval_fixture(tmp_path_factory.getbasetemp() / "vlmt_eval")


# -- specs -----------------------------------------------------------------------------------------------------
def test_spec_from_flags_and_runs():
    spec = spec_from_args(_args("--model", "m", "--methods", "cls_topk,random:seed=1", "--keep", "64,128",
                                "--tasks", "pope, gqa", "--limit", "10", "--batch-size", "4"))
    assert spec.methods == [MethodSpec("cls_topk"), MethodSpec("random", (("seed", 1),))]
    assert (spec.tasks, spec.keep, spec.limit, spec.batch_size) == (["pope", "gqa"], [64, 128], 10, 4)
    runs = spec.validate()
    assert [r.run_id for r in runs] == ["none_full", "cls_topk_keep64", "cls_topk_keep128", "random-seed1_keep64",
                                        "random-seed1_keep128"]
    assert runs[3].method_kwargs == {"seed": 1, "keep": 64}
    assert len(spec_from_args(_args("--model", "m", "--methods", "cls_topk", "--ratio", "0.5", "--tasks", "t",
                                     "--no-baseline")).validate()) == 1


@pytest.mark.parametrize("argv, pattern", [
    (["--methods", "flowcutt", "--keep", "64"], r"unknown method 'flowcutt'; registered methods: .*cls_topk"),
    (["--methods", "cls_topk", "--keep", "0"], "keep must be a positive"),
    (["--methods", "cls_topk"], "needs a budget"),
    (["--methods", "cls_topk", "--ratio", "1.5"], r"must lie in \(0, 1\)"),
    (["--methods", "random:sead=1", "--keep", "8"], r"unknown model_args sead.*fields: keep, ratio, seed"),
])
def test_bad_grid_fails_before_loading(argv, pattern, capsys, monkeypatch):
    from vlm_tools.integrations import lmms_eval as plugin

    monkeypatch.setattr(plugin, "load_pretrained", lambda *a, **k: pytest.fail("no model may load on bad input"))
    rc = cli.main(["eval", "--model", "/does/not/exist", "--tasks", "pope", *argv])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("vlm-tools eval: error:")
    assert __import__("re").search(pattern, err), err


def test_shipped_grids_cover_the_standard_benchmarks():
    budgets = {"llava15_7b.yaml": [192, 128, 64], "llava_next_7b.yaml": [640, 320, 160]}
    for name, keep in budgets.items():
        spec = spec_from_args(_args("--config", str(REPO / "eval_configs" / "grids" / name)))
        assert spec.keep == keep and set(spec.tasks) == STANDARD_TASKS
        runs = spec.validate(check_methods=False)
        assert {r.method.name for r in runs} >= {"none", "cls_topk", "flowcut", "vtc_cls", "zoo_prune", "fastv"}
        assert len(runs) == 1 + 3 * len(spec.methods)
        # flags override the YAML
        small = spec_from_args(_args("--config", str(REPO / "eval_configs" / "grids" / name), "--limit", "5",
                                     "--keep", "32"))
        assert small.limit == 5 and small.keep == [32] and small.tasks == spec.tasks


def test_table_retention_and_formats(tmp_path):
    from vlm_tools.integrations.grid import write_table

    cells = [
        {"task": "pope", "metric": "pope_f1_score", "method": "cls_topk", "budget": "keep=64", "score": 0.8,
         "visual_tokens": 64.0, "visual_tokens_before": 576.0, "prefill_ms": 10.0, "peak_memory_mb": 100.0,
         "n_samples": 4},
        {"task": "pope", "metric": "pope_f1_score", "method": "none", "budget": "full", "score": 0.85,
         "visual_tokens": 576.0, "visual_tokens_before": 576.0, "prefill_ms": 20.0, "peak_memory_mb": 120.0,
         "n_samples": 4},
        {"task": "pope", "metric": "pope_f1_score", "method": "cls_topk", "budget": "keep=128", "score": 0.84,
         "visual_tokens": 128.0, "visual_tokens_before": 576.0, "prefill_ms": 12.0, "peak_memory_mb": 100.0,
         "n_samples": 4},
    ]
    rows = build_table(cells, ["cls_topk"])
    assert [(r["method"], r["budget"]) for r in rows] == [("none", "full"), ("cls_topk", "keep=128"),
                                                          ("cls_topk", "keep=64")]
    assert rows[0]["retention"] == 1.0 and rows[2]["retention"] == pytest.approx(0.8 / 0.85, abs=1e-4)
    md = render_markdown(rows)
    assert "| pope | pope_f1_score | cls_topk | keep=64 | 0.8 | 94.1% | 64 | 576 | 10 | 100 | 4 |" in md
    paths = write_table(rows, tmp_path, {"model": "m"})
    assert len(list(csv.DictReader(paths["csv"].open()))) == 3
    assert json.loads(paths["json"].read_text())["rows"][0]["method"] == "none"


def test_parse_methods_from_yaml_entries():
    assert parse_methods(["cls_topk", {"name": "random", "seed": 2}]) == [MethodSpec("cls_topk"),
                                                                          MethodSpec("random", (("seed", 2),))]
    with pytest.raises(ValueError, match="name:key=value"):
        parse_methods("random:seed")


# -- the grid on a local task ----------------------------------------------------------------------------------
def test_eval_grid_writes_table_and_rerun_skips(eval_fixture, tmp_path, monkeypatch, capsys):
    out = tmp_path / "grid"
    argv = ["eval", "--model", str(eval_fixture.checkpoint), "--methods", "random,cls_topk", "--keep", "8,16",
            "--tasks", eval_fixture.gen_task, "--include-path", str(eval_fixture.task_dir), "--limit", "4",
            "--batch-size", "2", "--device", "cpu", "--out", str(out)]
    assert cli.main(argv) == 0
    table = json.loads((out / "comparison.json").read_text())["rows"]
    assert [(r["method"], r["budget"]) for r in table] == [
        ("none", "full"), ("random", "keep=16"), ("random", "keep=8"), ("cls_topk", "keep=16"), ("cls_topk", "keep=8")]
    tokens = {(r["method"], r["budget"]): r["visual_tokens"] for r in table}
    assert tokens[("none", "full")] == 64 and tokens[("random", "keep=8")] == 8
    assert tokens[("cls_topk", "keep=16")] == 16
    assert all(r["n_samples"] == 4 and r["metric"] == "exact_match" and r["prefill_ms"] > 0 for r in table)
    assert table[0]["retention"] in (1.0, None)  # None only when the baseline scored 0
    md = (out / "comparison.md").read_text()
    assert "| task | metric | method | budget | score | retention |" in md
    assert len(list(csv.DictReader((out / "comparison.csv").open()))) == 5
    # lmms-eval's own outputs, per run
    for run_id in ("none_full", "random_keep8", "cls_topk_keep16"):
        assert list((out / "runs" / run_id).rglob("*_results.json"))
        assert list((out / "runs" / run_id).rglob(f"*_samples_{eval_fixture.gen_task}.jsonl"))
    cell = json.loads((out / "cells" / "cls_topk_keep8" / f"{eval_fixture.gen_task}.json").read_text())
    assert cell["visual_tokens"] == 8 and cell["visual_tokens_before"] == 64 and cell["method_kwargs"] == {"keep": 8}

    # re-run: every cell is finished, nothing is loaded or evaluated
    import lmms_eval.evaluator

    from vlm_tools.integrations import lmms_eval as plugin

    monkeypatch.setattr(plugin, "load_pretrained", lambda *a, **k: pytest.fail("re-run must not load the model"))
    monkeypatch.setattr(lmms_eval.evaluator, "simple_evaluate", lambda *a, **k: pytest.fail("re-run must skip"))
    capsys.readouterr()
    assert cli.main(argv) == 0
    assert "5 of 5 cells already finished, skipped" in capsys.readouterr().err
    assert json.loads((out / "comparison.json").read_text())["rows"] == table


def test_only_rank_zero_writes(eval_fixture, tmp_path):
    """A non-zero rank evaluates its shard but writes neither cells nor the table."""
    from vlm_tools.integrations.eval_cli import run_grid

    spec = GridSpec(model=str(eval_fixture.checkpoint), methods=[MethodSpec("cls_topk")], keep=[8],
                    tasks=[eval_fixture.gen_task], include_path=[str(eval_fixture.task_dir)], limit=2, baseline=False,
                    device="cpu", out=str(tmp_path / "rank1"))
    report = run_grid(spec, dist=DistInfo(rank=1, local_rank=1, world_size=2))
    assert report["ran"] == [("cls_topk_keep8", eval_fixture.gen_task)] and report["table"] == {}
    assert not (tmp_path / "rank1").exists()


def test_uncached_task_fails_before_loading(tmp_path, capsys, monkeypatch, eval_fixture):
    from vlm_tools.integrations import lmms_eval as plugin

    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "hub.yaml").write_text("task: vlmt_hub_task\ndataset_path: vlm-tools-test/NotCachedEither\n"
                                                 "test_split: test\ndoc_to_text: question\ndoc_to_target: answer\n")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(plugin, "load_pretrained", lambda *a, **k: pytest.fail("no model may load"))
    rc = cli.main(["eval", "--model", str(eval_fixture.checkpoint), "--methods", "cls_topk", "--keep", "8",
                   "--tasks", "vlmt_hub_task", "--include-path", str(tmp_path / "tasks"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "vlm-tools-test/NotCachedEither" in err and "--cache-data --tasks vlmt_hub_task" in err


def test_cache_data_on_a_local_task(eval_fixture, capsys):
    """`--cache-data` prepares the datasets only: no model, no methods needed."""
    rc = cli.main(["eval", "--cache-data", "--tasks", eval_fixture.gen_task, "--include-path",
                   str(eval_fixture.task_dir)])
    assert rc == 0 and f"data of task '{eval_fixture.gen_task}' is cached" in capsys.readouterr().err


def test_shipped_local_benchmarks_load_offline():
    """eval_configs/tasks: shapes_vqa / photos_yesno through the asset task class, documents with images."""
    from lmms_eval.tasks import TaskManager, get_task_dict

    spec = spec_from_args(_args("--config", str(REPO / "eval_configs" / "grids" / "default_local.yaml")))
    assert spec.validate() and spec.include_path == [str(REPO / "eval_configs" / "tasks")]
    tm = TaskManager("WARNING", include_path=spec.include_path, include_defaults=False)
    assert {"shapes_vqa", "shapes_vqa_1000", "photos_yesno", "photos_yesno_ll"} <= set(tm.all_tasks)
    assert all(tm.task_index[t]["type"] == "python_task" for t in ("shapes_vqa", "photos_yesno"))
    tasks = get_task_dict(["photos_yesno", "photos_yesno_ll"], tm)
    spec_file = REPO / "eval_configs" / "data" / "photos_yesno" / "questions.json"
    n_questions = len(json.loads(spec_file.read_text())["questions"])
    for task in tasks.values():
        docs = task.test_docs()
        assert len(docs) == n_questions and task.doc_to_visual(docs[0])[0].mode == "RGB"
        assert task.doc_to_text(docs[0]).startswith("Question: ") and task.doc_to_target(docs[0]) in ("yes", "no")
    assert tasks["photos_yesno_ll"].OUTPUT_TYPE == "loglikelihood"
