"""Issue 13, evaluation part: lmms-eval's own flags next to model_args (13.1), results that were not written
(13.5), stale and colliding cells (13.6), table escaping and argument parsing (13.13), an unwritable --out (13.11).

Each test here failed on the code before its fix (checked by running it against the parent commit)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from vlm_tools import cli
from vlm_tools.integrations.grid import GridSpec, MethodSpec, build_table, parse_methods, render_markdown

pytest.importorskip("lmms_eval")


@pytest.fixture(scope="session")
def eval_fixture(tmp_path_factory):
    from vlm_tools.integrations.testing import build_eval_fixture

    return build_eval_fixture(tmp_path_factory.getbasetemp() / "vlmt_eval")


# -- 13.1: lmms-eval's --batch_size / --device next to model_args ----------------------------------------------
def test_merge_cli_args_precedence():
    """model_args wins; a flag fills what model_args leaves out; lmms-eval's default --batch_size 1 is not reported,
    an explicit disagreeing flag (a string, as argparse gives it) is."""
    from vlm_tools.integrations.model_args import merge_cli_args

    merged, ignored = merge_cli_args({"batch_size": "2"}, {"batch_size": 1, "max_batch_size": None, "device": None})
    assert merged == {"batch_size": "2"} and ignored == {}
    merged, ignored = merge_cli_args({"batch_size": "2", "device": "cpu"}, {"batch_size": "4", "device": "cuda"})
    assert merged == {"batch_size": "2", "device": "cpu"}
    assert ignored == {"batch_size": ("2", "4"), "device": ("cpu", "cuda")}
    merged, ignored = merge_cli_args({"method": "none"}, {"batch_size": "4", "device": "cpu", "max_batch_size": None})
    assert merged == {"method": "none", "batch_size": "4", "device": "cpu"} and ignored == {}


def test_create_from_arg_string_accepts_lmms_eval_flags(eval_fixture):
    """What lmms-eval's CLI calls: `create_from_arg_string(model_args, {"batch_size", "max_batch_size", "device"})`."""
    from loguru import logger

    from vlm_tools.integrations.lmms_eval import VlmToolsModel

    ckpt = eval_fixture.checkpoint
    cli_default = {"batch_size": 1, "max_batch_size": None, "device": None}
    lm = VlmToolsModel.create_from_arg_string(f"pretrained={ckpt},method=cls_topk,keep=8,batch_size=2", cli_default)
    assert (lm.batch_size, lm.args.method_kwargs, lm.device.type) == (2, {"keep": 8}, "cpu")
    lm.clean()
    # the flag fills what model_args leaves out
    lm = VlmToolsModel.create_from_arg_string(f"pretrained={ckpt}", {"batch_size": "4", "device": "cpu"})
    assert (lm.batch_size, lm.args.device) == (4, "cpu")
    lm.clean()
    # both given: model_args wins, and the ignored flag is logged
    messages: list[str] = []
    sink = logger.add(lambda m: messages.append(str(m)), level="WARNING")
    try:
        lm = VlmToolsModel.create_from_arg_string(f"pretrained={ckpt},batch_size=2,device=cpu", {"batch_size": "3"})
    finally:
        logger.remove(sink)
    assert lm.batch_size == 2 and any("batch_size=2 wins over lmms-eval's --batch_size 3" in m for m in messages)
    lm.clean()
    with pytest.raises(ValueError, match="auto is not supported"):
        VlmToolsModel.create_from_arg_string(f"pretrained={ckpt}", {"batch_size": "auto"})


# -- 13.13: arguments -----------------------------------------------------------------------------------------
def test_duplicate_model_args_key_is_an_error(eval_fixture):
    """lmms-eval's parser keeps the last of two `keep=` silently; the plugin names both values."""
    from vlm_tools.integrations.lmms_eval import VlmToolsModel

    with pytest.raises(ValueError, match=r"gives keep twice \(keep=8, keep=16\)"):
        VlmToolsModel.create_from_arg_string(f"pretrained={eval_fixture.checkpoint},method=cls_topk,keep=8,keep=16")
    with pytest.raises(ValueError, match=r"gives seed twice \(seed=1, seed=2\)"):
        parse_methods("random:seed=1:seed=2")


def test_duplicate_key_in_run_yaml_is_an_error(tmp_path, capsys):
    (tmp_path / "grid.yaml").write_text("model: m\ntasks: [t]\nmethods: [cls_topk]\nkeep: [8]\nkeep: [16]\n")
    assert cli.main(["eval", "--config", str(tmp_path / "grid.yaml")]) == 2
    err = capsys.readouterr().err
    assert "duplicate key 'keep'" in err and err.count("\n") == 1


def test_quoted_assistant_prefix_keeps_its_comma_not_its_quotes(eval_fixture):
    from vlm_tools.integrations.lmms_eval import VlmToolsModel

    lm = VlmToolsModel.create_from_arg_string(f"pretrained={eval_fixture.checkpoint},assistant_prefix='A, B',"
                                              f"prompt=plain,device=cpu")
    assert lm.args.assistant_prefix == "A, B"
    assert lm.build_prompt("is it red ?", 1) == "<image>\nis it red ? A, B"
    lm.clean()
    from vlm_tools.integrations.model_args import split_model_args

    assert split_model_args("a='x, y',b=\"1,2\",c={'k': 1, 'j': 2},d= v ") == {
        "a": "'x, y'", "b": '"1,2"', "c": "{'k': 1, 'j': 2}", "d": "v"}
    with pytest.raises(ValueError, match="not key=value"):
        split_model_args("pretrained=p,keep")
    with pytest.raises(ValueError, match="unclosed"):
        split_model_args("assistant_prefix='A, B")


def test_format_model_args_round_trips_through_the_parser():
    from vlm_tools.integrations.model_args import format_model_args, parse_model_args, split_model_args

    values = {"pretrained": "/m", "method": "random", "keep": 8, "seed": 3, "assistant_prefix": "A, B",
              "use_cache": False}
    text = format_model_args(values)
    args = parse_model_args(split_model_args(text))
    assert (args.pretrained, args.assistant_prefix, args.use_cache) == ("/m", "A, B", False)
    assert args.method_kwargs == {"keep": 8, "seed": 3}


# -- 13.13: the comparison table ------------------------------------------------------------------------------
def _row(method: str, budget: str = "keep=8", score: float = 0.5) -> dict:
    return {"task": "t", "metric": "acc", "method": method, "budget": budget, "score": score,
            "visual_tokens": 8.0, "visual_tokens_before": 64.0, "prefill_ms": 1.0, "peak_memory_mb": 10.0,
            "n_samples": 2}


def test_markdown_table_escapes_pipes_and_html():
    label = "registers[student=/x|y<img src=x onerror=alert(1)>]"
    rows = build_table([_row("none", "full"), _row(label)])
    md = render_markdown(rows, title="m<b>|")
    line = next(x for x in md.splitlines() if "registers" in x)
    unescaped = line.replace("\\|", "")
    assert unescaped.count("|") == 12  # 11 columns
    assert "<img" not in md and "<b>" not in md
    assert "&lt;img src=x onerror=alert(1)&gt;" in line and "/x\\|y" in line


# -- 13.6: distinct specs never share a cell file -------------------------------------------------------------
def test_one_config_one_run_and_distinct_configs_distinct_ids(tmp_path):
    from vlm_tools.integrations.eval_cli import spec_from_args

    # one config spelled twice is one run (the core parser casts both); a quoted int on the command line is not
    # silently read as another spec: it is an error naming the value
    spec = GridSpec(model="m", tasks=["t"], keep=[8], methods=parse_methods(
        ["random", {"name": "random", "seed": 1}, {"name": "random", "seed": "1"}, "random:seed=1", "random:seed=2"]))
    runs = spec.validate()
    assert [r.run_id for r in runs] == ["none_full", "random_keep8", "random-seed1_keep8", "random-seed2_keep8"]
    assert runs[2].method_kwargs == {"seed": 1, "keep": 8}
    args = cli.build_parser().parse_args(["eval", "--model", "m", "--tasks", "t", "--keep", "8", "--methods",
                                          "random:seed=1,random:seed='1'"])
    with pytest.raises(ValueError, match="seed=\"'1'\": expected an int"):
        spec_from_args(args)
    # text fields (a student path) whose sanitised forms coincide get distinct ids
    students = [tmp_path / "stu_a", tmp_path / "stu" / "a", tmp_path / "stu a"]
    for s in students:
        s.mkdir(parents=True)
        (s / "student_config.json").write_text("{}")
    spec = GridSpec(model="m", tasks=["t"], methods=[MethodSpec("registers", (("student", str(s)),)) for s in students])
    ids = [r.run_id for r in spec.validate()]
    assert len(set(ids)) == len(ids) == 4
    assert all(i.startswith("registers-student") for i in ids[1:])


# -- 13.11 / 13.5: the output folder is checked first ---------------------------------------------------------
@pytest.mark.parametrize("layout", ["out_under_a_file", "runs_is_a_file"])
def test_unwritable_out_fails_before_anything_runs(tmp_path, capsys, monkeypatch, layout):
    from vlm_tools.integrations import lmms_eval as plugin

    if layout == "out_under_a_file":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "out"
    else:
        out = tmp_path / "out"
        out.mkdir()
        (out / "runs").write_text("x")
    monkeypatch.setattr(plugin, "load_pretrained", lambda *a, **k: pytest.fail("no model may load"))
    rc = cli.main(["eval", "--model", "/m", "--methods", "cls_topk", "--keep", "8", "--tasks", "t", "--out", str(out)])
    err = capsys.readouterr().err
    # checked first: task 't' does not exist, and that error would come next
    assert rc == 2 and err.startswith("vlm-tools eval: error: cannot write to the output folder")
    assert err.count("\n") == 1 and "Traceback" not in err


# -- 13.5: results that lmms-eval could not write -------------------------------------------------------------
def test_results_not_written_leave_the_cells_unfinished(eval_fixture, tmp_path):
    """lmms-eval's tracker only warns when it cannot write; the cell used to be marked finished (or the grid ended
    in `AttributeError: ... 'date_id'`). Now: a clear error, no cell file, and the next run evaluates again."""
    from lmms_eval.utils import sanitize_model_name

    from vlm_tools.integrations.eval_cli import cell_path, run_grid

    out = tmp_path / "grid"
    spec = GridSpec(model=str(eval_fixture.checkpoint), methods=[MethodSpec("cls_topk")], keep=[8], baseline=False,
                    tasks=[eval_fixture.gen_task], include_path=[str(eval_fixture.task_dir)], limit=2, device="cpu",
                    out=str(out))
    (run,) = spec.validate()
    blocker = out / "runs" / run.run_id / sanitize_model_name(str(eval_fixture.checkpoint))
    blocker.parent.mkdir(parents=True)
    blocker.write_text("not a folder")  # the tracker's mkdir fails: it logs a warning and writes nothing
    with pytest.raises(RuntimeError, match="did not write its results file.*stay unfinished") as err:
        run_grid(spec, stream=io.StringIO())
    assert type(err.value).__name__ == "EvalOutputError"
    assert not cell_path(out, run.run_id, eval_fixture.gen_task).exists()
    blocker.unlink()
    report = run_grid(spec, stream=io.StringIO())
    assert report["ran"] == [(run.run_id, eval_fixture.gen_task)]
    cell = json.loads(cell_path(out, run.run_id, eval_fixture.gen_task).read_text())
    assert json.loads(Path(cell["results_file"]).read_text())["results"][eval_fixture.gen_task]


def test_truncated_results_are_detected(tmp_path):
    from vlm_tools.integrations.eval_cli import EvalOutputError, check_run_outputs

    good = {"results": {"t": {"acc,none": 1.0}}}
    results = tmp_path / "2026-01-01T00-00-00_results.json"
    samples = tmp_path / "2026-01-01T00-00-00_samples_t.jsonl"
    results.write_text(json.dumps(good))
    samples.write_text('{"doc_id": 0}\n{"doc_id": 1}\n')
    check_run_outputs(results, ["t"], {"t": 2})
    with pytest.raises(EvalOutputError, match="holds 2 samples, expected 3"):
        check_run_outputs(results, ["t"], {"t": 3})
    results.write_text(json.dumps(good)[:20])
    with pytest.raises(EvalOutputError, match="cannot be read back"):
        check_run_outputs(results, ["t"], {"t": 2})
    results.write_text(json.dumps({"results": {}}))
    with pytest.raises(EvalOutputError, match="no results for t"):
        check_run_outputs(results, ["t"], {"t": 2})
    samples.write_text('{"doc_id": 0}\n{"doc_')
    results.write_text(json.dumps(good))
    with pytest.raises(EvalOutputError, match="sample log"):
        check_run_outputs(results, ["t"], {"t": 2})


# -- 13.6: a replaced checkpoint or an edited task YAML re-runs the cell --------------------------------------
def test_content_changes_rerun_the_cell(tmp_path):
    import torch
    from transformers import LlavaForConditionalGeneration

    from vlm_tools.integrations.eval_cli import run_grid
    from vlm_tools.integrations.testing import build_eval_fixture

    fx = build_eval_fixture(tmp_path / "fx")
    spec = GridSpec(model=str(fx.checkpoint), methods=[MethodSpec("cls_topk")], keep=[8], baseline=False,
                    tasks=[fx.gen_task], include_path=[str(fx.task_dir)], limit=2, device="cpu",
                    out=str(tmp_path / "grid"))
    cell = [("cls_topk_keep8", fx.gen_task)]
    assert run_grid(spec, stream=io.StringIO())["ran"] == cell
    assert run_grid(spec, stream=io.StringIO())["ran"] == []  # unchanged: skipped
    # the checkpoint replaced at the same path (same config, other weights)
    model = LlavaForConditionalGeneration.from_pretrained(fx.checkpoint)
    with torch.no_grad():
        model.model.multi_modal_projector.linear_1.weight.mul_(-1)
    model.save_pretrained(fx.checkpoint)
    assert run_grid(spec, stream=io.StringIO())["ran"] == cell
    # the task YAML edited
    yaml_file = fx.task_dir / f"{fx.gen_task}.yaml"
    yaml_file.write_text(yaml_file.read_text().replace("max_new_tokens: 4", "max_new_tokens: 3"))
    assert run_grid(spec, stream=io.StringIO())["ran"] == cell
    assert run_grid(spec, stream=io.StringIO())["ran"] == []
