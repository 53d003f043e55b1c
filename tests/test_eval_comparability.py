"""Issue 15, evaluation part: one prompt rule for `pretrained=default` and the folder path (15.2), the task folder for
plain lmms-eval (15.3), per-task latency and memory, plots and an HTML comparison (15.4).

Each test here failed on the code before its fix (checked by running it against the parent commit)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from vlm_tools import cli
from vlm_tools.integrations.grid import GridSpec, MethodSpec, build_table, write_table

pytest.importorskip("lmms_eval")

REPO = Path(__file__).resolve().parents[1]
LOCAL_TASKS = {"shapes_vqa", "shapes_vqa_1000", "photos_yesno", "photos_yesno_ll"}
# a self-describing model folder: its chat template ends the assistant turn's opening with the answer prefix
PREFIX_TEMPLATE = ("{%- for m in messages -%}{{ 'USER: ' }}{%- for c in m['content'] -%}"
                   "{%- if c['type'] == 'image' -%}{{ '<image>\\n' }}{%- else -%}{{ c['text'] }}{%- endif -%}"
                   "{%- endfor -%}{{ '\\n' }}{%- endfor -%}{%- if add_generation_prompt -%}ASSISTANT: Answer:"
                   "{%- endif -%}")


@pytest.fixture(scope="session")
def eval_fixture(tmp_path_factory):
    from vlm_tools.integrations.testing import build_eval_fixture

    return build_eval_fixture(tmp_path_factory.getbasetemp() / "vlmt_eval")


class _Req:
    def __init__(self, task: str, *args):
        self.args = args
        self.task_name = task


def _visual(doc):
    return [doc["image"]]


# -- 15.2: pretrained=default and the folder path send identical requests -------------------------------------
def test_default_and_its_folder_path_send_identical_requests(tmp_path, monkeypatch):
    """`default` only names the default model's folder: no prefix is added for one spelling and not the other.
    Simulated on a tiny saved LLaVA whose chat template carries the `Answer:` prefix (as the default folder's does)."""
    import vlm_tools.assets.default_model as default_model
    from vlm_tools.core.models import build_tiny_llava
    from vlm_tools.integrations.lmms_eval import VlmToolsModel
    from vlm_tools.testing import make_images

    model, processor = build_tiny_llava("llava")
    processor.chat_template = PREFIX_TEMPLATE
    folder = tmp_path / "default_vlm"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    monkeypatch.setattr(default_model, "default_model_path", lambda *a, **k: folder)

    images = make_images()
    contexts = ["Question: is it red ? Answer with one word.", "Question: what shape ? Answer with one word."]
    gen = [_Req("t", c, {"max_new_tokens": 3}, _visual, i, "t", "test") for i, c in enumerate(contexts)]
    ll = [_Req("t", c, "yes", _visual, i, "t", "test") for i, c in enumerate(contexts)]
    seen = {}
    for spelling in ("default", str(folder)):
        lm = VlmToolsModel(pretrained=spelling, method="cls_topk", keep=8, batch_size=2, device="cpu")
        lm.task_dict = {"t": {"test": [{"image": im} for im in images]}}
        prompts = [lm.build_prompt(c, 1) for c in contexts]
        ids = lm.processor(images=images, text=prompts, padding=True, return_tensors="pt")["input_ids"].tolist()
        texts = [r.text for r in lm.generate_until(gen)]
        logprobs = [r.text[0] for r in lm.loglikelihood(ll)]
        seen[spelling] = (lm.args.assistant_prefix, prompts, ids, texts, logprobs)
        lm.clean()
    assert seen["default"] == seen[str(folder)]
    assert seen["default"][0] is None  # the same default for both spellings: nothing appended
    assert all(p.endswith("ASSISTANT: Answer:") for p in seen["default"][1])  # the folder's template, once
    # an explicit assistant_prefix applies to both spellings alike
    explicit = [VlmToolsModel(pretrained=s, assistant_prefix="A:", device="cpu") for s in ("default", str(folder))]
    assert explicit[0].build_prompt(contexts[0], 1) == explicit[1].build_prompt(contexts[0], 1)
    assert explicit[0].build_prompt(contexts[0], 1).endswith("Answer: A:")
    for lm in explicit:
        lm.clean()


# -- 15.4: batches never mix tasks ----------------------------------------------------------------------------
def test_batches_never_mix_tasks(eval_fixture):
    """lmms-eval hands the plugin every task's requests at once; with identical generation kwargs two tasks used to
    share batches, so their per-sample latency and peak memory were the same numbers."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from vlm_tools.integrations.lmms_eval import VlmToolsModel
    from vlm_tools.testing import make_images

    model = LlavaForConditionalGeneration.from_pretrained(eval_fixture.checkpoint).eval()
    processor = AutoProcessor.from_pretrained(eval_fixture.checkpoint)
    lm = VlmToolsModel(model=model, processor=processor, method="cls_topk", keep=8, batch_size=4)
    docs = [{"image": im} for im in make_images() + make_images(1)]
    lm.task_dict = {"a": {"test": docs}, "b": {"test": docs}}
    kw = {"max_new_tokens": 2}
    gen = [_Req(t, f"q{i}", kw, _visual, i, t, "test") for t in ("a", "b") for i in range(3)]
    ll = [_Req(t, f"q{i}", "yes", _visual, i, t, "test") for t in ("a", "b") for i in range(3)]
    for results in (lm.generate_until(gen), lm.loglikelihood(ll)):
        assert [r.token_counts.batch_size for r in results] == [3] * 6
    lm.clean()


# -- 15.4: the comparison table, plots and HTML ---------------------------------------------------------------
def _cell(task: str, method: str, budget: str, score: float, tokens: float, ms: float) -> dict:
    return {"task": task, "metric": "acc", "method": method, "budget": budget, "score": score,
            "visual_tokens": tokens, "visual_tokens_before": 64.0, "prefill_ms": ms, "peak_memory_mb": 90.0,
            "n_samples": 4}


def test_comparison_plots_and_html_escape_user_text(tmp_path):
    hostile = "cls$\\foo$<script>alert(1)</script>|x"  # mathtext would fail on \foo; the HTML must not run
    cells = [_cell("t1", "none", "full", 0.9, 64, 20), _cell("t1", hostile, "keep=8", 0.6, 8, 9),
             _cell("t1", hostile, "keep=16", 0.7, 16, 11), _cell("t2", "none", "full", 0.5, 64, 20),
             _cell("t2", hostile, "keep=8", 0.4, 8, 9)]
    rows = build_table(cells, [hostile])
    paths = write_table(rows, tmp_path, {"model": "m$x$<b>", "settings": {"methods": [hostile]}})
    for name in ("accuracy_vs_tokens", "accuracy_vs_latency"):
        assert paths[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = paths["html"].read_text()
    assert paths["html"] == tmp_path / "comparison.html"
    assert "<script>" not in page and "<b>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;|x" in page
    assert page.count('src="data:image/png;base64,') == 2 and "prefill ms/sample" in page
    assert "max_memory_allocated" in page and "VmHWM" in page  # how it was measured
    md = paths["md"].read_text()
    assert "| prefill ms/sample | peak MiB | n |" in md and "- prefill ms/sample: wall time of a batch" in md


def test_grid_reports_per_task_numbers_plots_and_html(eval_fixture, tmp_path):
    """Two generation tasks with identical generation kwargs, batch size 4, 3 documents each: every logged sample
    ran in a batch of its own task (3), and the grid writes the plots and the HTML next to comparison.md."""
    from vlm_tools.integrations.eval_cli import run_grid
    from vlm_tools.integrations.local_tasks import write_photo_task

    other = write_photo_task(tmp_path / "tasks", prefix="vlmt_other", n_docs=3)["generate_until"]
    spec = GridSpec(model=str(eval_fixture.checkpoint), methods=[MethodSpec("cls_topk")], keep=[8], baseline=False,
                    tasks=[eval_fixture.gen_task, other], limit=3, batch_size=4, device="cpu",
                    include_path=[str(eval_fixture.task_dir), str(tmp_path / "tasks")], out=str(tmp_path / "grid"))
    report = run_grid(spec, stream=io.StringIO())
    for task in spec.tasks:
        (samples,) = (tmp_path / "grid" / "runs").rglob(f"*_samples_{task}.jsonl")
        rows = [json.loads(line) for line in samples.read_text().splitlines()]
        assert [r["token_counts"][0]["batch_size"] for r in rows] == [3, 3, 3]
    assert {"html", "accuracy_vs_tokens", "accuracy_vs_latency"} <= set(report["table"])
    assert (tmp_path / "grid" / "comparison.html").read_text().count("<tr>") == 3  # header + 2 rows


# -- 15.3: the task folder for plain lmms-eval ----------------------------------------------------------------
def test_print_tasks_path_outside_the_repository(tmp_path):
    from lmms_eval.tasks import TaskManager

    import vlm_tools.integrations as integrations

    out = subprocess.run([sys.executable, "-m", "vlm_tools.cli", "eval", "--print-tasks-path"], cwd=tmp_path,
                         capture_output=True, text=True, check=True).stdout.strip()
    assert Path(out) == integrations.tasks_path() == (REPO / "eval_configs" / "tasks").resolve()
    # the package's own view of the folder (installed wheels carry a copy of it as package data)
    assert (Path(integrations.__file__).parent / "lmms_eval_tasks").resolve() == Path(out)
    tm = TaskManager("WARNING", include_path=out, include_defaults=False)
    assert LOCAL_TASKS <= set(tm.all_tasks)


def test_print_tasks_path_needs_nothing_else(capsys):
    assert cli.main(["eval", "--print-tasks-path"]) == 0
    assert capsys.readouterr().out.strip() == str((REPO / "eval_configs" / "tasks").resolve())
