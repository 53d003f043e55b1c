"""lmms-eval plugin: model-args validation, batching helpers, loglikelihood/generation against references,
`simple_evaluate` on local 8-document tasks (generate_until and loglikelihood; none and cls_topk), the entry point
in a subprocess, and the offline-data error.

lmms-eval imports are slow (~10 s), so one module-scoped evaluation is shared by the checks that need it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vlm_tools.core.config import cast_value
from vlm_tools.integrations.model_args import (
    DistInfo,
    format_model_args,
    parse_model_args,
    resolve_device,
    validate_method,
)

pytest.importorskip("lmms_eval")

KEEP = 16
N_PATCHES = 64  # tiny LLaVA: 32 px images, 4 px patches


@pytest.fixture(scope="session")
def eval_fixture(tmp_path_factory):
    from vlm_tools.integrations.testing import build_eval_fixture

    return build_eval_fixture(tmp_path_factory.getbasetemp() / "vlmt_eval")


@pytest.fixture(scope="module")
def evaluated(eval_fixture):
    """`simple_evaluate` with the plugin (batch 3) on both local tasks, for method=none and cls_topk keep=16."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    from vlm_tools.integrations.lmms_eval import VlmToolsModel

    tm = TaskManager("WARNING", include_path=str(eval_fixture.task_dir), include_defaults=False,
                     model_name="vlm_tools")
    out = {}
    for method, kw in (("none", {}), ("cls_topk", {"keep": KEEP})):
        lm = VlmToolsModel(pretrained=str(eval_fixture.checkpoint), method=method, batch_size=3, device="cpu", **kw)
        out[method] = simple_evaluate(model=lm, tasks=[eval_fixture.gen_task, eval_fixture.ll_task], task_manager=tm,
                                      bootstrap_iters=0, log_samples=True, verbosity="WARNING")
        assert not lm.wrapped.is_wrapped, "clean() at the end of the evaluation must unwrap the model"
    return out


CLI_TESTS = ("test_lmms_eval_cli_resolves_plugin_from_entry_point", "test_readme_command_with_batch_size_in_model_args")


@pytest.fixture(scope="module", autouse=True)
def lmms_eval_cli_run(request, eval_fixture, tmp_path_factory):
    """The README's command, `lmms-eval --model vlm_tools --model_args pretrained=P,method=cls_topk,keep=K,batch_size=2
    --tasks T --include_path D --limit 2 --output_path O --log_samples`, in a subprocess started when the module
    starts (it takes ~20 s, mostly imports) so that it overlaps the in-process tests; only when its tests are
    selected. lmms-eval's CLI passes its own `--batch_size` (default 1) and `--device` next to model_args."""
    wanted = any(item.name in CLI_TESTS for item in request.session.items)
    if not wanted:
        yield None
        return
    out_dir = tmp_path_factory.mktemp("lmms_eval_cli")
    exe = Path(sys.executable).with_name("lmms-eval")
    cmd = [str(exe) if exe.exists() else sys.executable, *([] if exe.exists() else ["-m", "lmms_eval"]),
           "--model", "vlm_tools", "--model_args",
           f"pretrained={eval_fixture.checkpoint},method=cls_topk,keep={KEEP},batch_size=2",
           "--tasks", eval_fixture.gen_task, "--include_path", str(eval_fixture.task_dir), "--limit", "2",
           "--output_path", str(out_dir), "--log_samples", "--verbosity", "WARNING"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=out_dir, env=env)
    yield proc, out_dir
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


# -- model args --------------------------------------------------------------------------------------------------
def test_unknown_method_names_registered_ones():
    with pytest.raises(ValueError, match=r"unknown method 'nope'.*cls_topk.*none"):
        parse_model_args({"pretrained": "x", "method": "nope"})


@pytest.mark.parametrize("kwargs, pattern", [
    ({"method": "cls_topk"}, "budget is required"),
    ({"method": "cls_topk", "keep": 0}, "keep must be a positive"),
    ({"method": "cls_topk", "ratio": 1.5}, r"must lie in \(0, 1\)"),
    ({"method": "cls_topk", "keep": 8, "ratio": 0.5}, "not both"),
    ({"method": "cls_topk", "keep": 8.5}, "keep=8.5: expected int"),
    ({"method": "none", "keep": 8}, r"unknown model_args keep for method 'none'.*plugin arguments: pretrained"),
    ({"method": "cls_topk", "keep": 8, "alpha": 1}, r"unknown model_args alpha.*fields: keep, ratio"),
    ({"method": "none", "dtype": "int8"}, "dtype must be one of"),
    ({"method": "none", "batch_size": "auto"}, "auto is not supported"),
    ({"method": "none", "device": "gpu7"}, "device must be"),
    ({"method": "none", "prompt": "fancy"}, "prompt must be one of"),
])
def test_bad_model_args(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        parse_model_args({"pretrained": "x", **kwargs})


def test_model_args_cast_to_field_types():
    args = parse_model_args({"pretrained": "p", "method": "random", "keep": "64", "seed": 3.0, "batch_size": "4",
                             "dtype": "bf16", "use_cache": "false"})
    assert args.method_kwargs == {"keep": 64, "seed": 3} and type(args.method_kwargs["seed"]) is int
    assert (args.batch_size, args.dtype, args.use_cache) == (4, "bfloat16", False)
    assert validate_method("cls_topk", {"ratio": "0.75"}) == {"ratio": 0.75}
    assert cast_value("none", int | None) is None and cast_value("1;2", tuple[int, ...]) == (1, 2)
    text = format_model_args({"pretrained": "p", "keep": 64, "x": None, "flag": True})
    assert text == "pretrained=p,keep=64,flag=true"


def test_bad_args_fail_before_any_model_loads(monkeypatch):
    from vlm_tools.integrations import lmms_eval as plugin

    def boom(*a, **k):
        raise AssertionError("the checkpoint must not load before the arguments are validated")

    monkeypatch.setattr(plugin, "load_pretrained", boom)
    with pytest.raises(ValueError, match="registered methods: .*cls_topk"):
        plugin.VlmToolsModel(pretrained="/does/not/exist", method="flowcutt", keep=64)
    with pytest.raises(ValueError, match="keep must be a positive"):
        plugin.VlmToolsModel(pretrained="/does/not/exist", method="cls_topk", keep=-1)


def test_rank_and_device_resolution():
    env = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4"}
    dist = DistInfo.from_env(env)
    assert (dist.rank, dist.local_rank, dist.world_size, dist.is_main) == (3, 1, 4, False)
    assert DistInfo.from_env({}) == DistInfo(0, 0, 1)
    # data parallel: every process on its own GPU, whatever index was asked for
    assert resolve_device("cuda", dist, cuda_available=True) == "cuda:1"
    assert resolve_device("cuda:0", dist, cuda_available=True) == "cuda:1"
    assert resolve_device(None, DistInfo(), cuda_available=True) == "cuda:0"
    assert resolve_device("auto", DistInfo(), cuda_available=False) == "cpu"
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device("cuda", DistInfo(), cuda_available=False)
    with pytest.raises(ValueError, match="inconsistent"):
        DistInfo.from_env({"RANK": "2", "WORLD_SIZE": "2"})


# -- batching helpers ------------------------------------------------------------------------------------------
def test_batching_helpers():
    from vlm_tools.integrations.lmms_eval import count_generated, join_continuation, plan_batches, truncate_at_stop

    batches = plan_batches(["a", "b", "a", "a", "b"], [1, 5, 3, 2, 4], 2)
    assert batches == [[2, 3], [0], [1, 4]]  # grouped by key, longest first, 2 per batch
    assert sorted(i for b in batches for i in b) == list(range(5))
    assert truncate_at_stop("yes\nASSISTANT: no", ["ASSISTANT:", "\n", ""]) == "yes"
    assert count_generated([5, 6, 3, 0, 0], eos_ids={3}, pad_id=0) == 3
    assert count_generated([5, 6, 7], eos_ids={3}, pad_id=0) == 3
    assert join_continuation("ASSISTANT:", "yes") == "ASSISTANT: yes"
    assert join_continuation("assistant\n", "yes") == "assistant\nyes"
    assert join_continuation("Q:", " yes") == "Q: yes"


# -- plugin calls against references ---------------------------------------------------------------------------
class _Req:
    def __init__(self, *args):
        self.args = args


def _plugin(eval_fixture, method: str, batch_size: int, **kw):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from vlm_tools.integrations.lmms_eval import VlmToolsModel

    model = LlavaForConditionalGeneration.from_pretrained(eval_fixture.checkpoint).eval()
    processor = AutoProcessor.from_pretrained(eval_fixture.checkpoint)
    lm = VlmToolsModel(model=model, processor=processor, method=method, batch_size=batch_size, **kw)
    from vlm_tools.testing import make_images

    images = make_images() + make_images(1)
    lm.task_dict = {"t": {"test": [{"image": im} for im in images]}}
    return lm


CONTEXTS = ["what is in the image ?", "is there a cat in the picture ? answer yes or no", "describe it", "how many"]
ANSWERS = ["a cat", "yes", "red circle", "two"]


def _visual(doc):
    return [doc["image"]]


def _ll_requests():
    visual = _visual
    return [_Req(c, a, visual, i, "t", "test") for i, (c, a) in enumerate(zip(CONTEXTS, ANSWERS))]


@pytest.mark.parametrize("method, kw", [("none", {}), ("cls_topk", {"keep": KEEP})])
def test_loglikelihood_left_padded_batch_matches_single_unpadded_runs(eval_fixture, method, kw):
    """Batch of 3 (left padding, shrunk image runs) equals a direct per-sample computation on the shrunk sequence."""
    lm = _plugin(eval_fixture, method, batch_size=3, **kw)
    batched = lm.loglikelihood(_ll_requests())
    tok = lm.tokenizer
    for i, (ctx, ans) in enumerate(zip(CONTEXTS, ANSWERS)):
        prompt = lm.build_prompt(ctx, 1)
        full = f"{prompt} {ans}"
        n = len(tok(full).input_ids) - len(tok(prompt).input_ids)
        inputs = lm.processor(images=[lm.task_dict["t"]["test"][i]["image"]], text=[full], return_tensors="pt")
        with torch.inference_mode():
            if method == "none":  # the unwrapped base model is the reference
                with lm.wrapped.disabled() as base:
                    logits = base(**inputs).logits[0]
            else:
                logits = lm.wrapped(**inputs).logits[0]  # unpadded single sample: shrunk by keep
        assert logits.shape[0] == inputs["input_ids"].shape[1] - (N_PATCHES - KEEP if method != "none" else 0)
        target = inputs["input_ids"][0, -n:]
        logprobs = torch.log_softmax(logits[-n - 1:-1].float(), -1)
        ref = float(logprobs.gather(1, target[:, None]).sum())
        value, greedy = batched[i].text
        assert value == pytest.approx(ref, abs=1e-4)
        assert greedy == bool((logprobs.argmax(-1) == target).all())
        counts = batched[i].token_counts
        assert counts.output_tokens == n
        assert counts.visual_tokens == (KEEP if method != "none" else N_PATCHES)
        assert counts.visual_tokens_before == N_PATCHES
        assert counts.input_tokens == inputs["input_ids"].shape[1] - N_PATCHES + counts.visual_tokens
    lm.clean()


def test_llava_next_batches_with_different_image_token_counts():
    """LLaVA-NeXT: images of different aspect ratios give different visual-token counts, so the shrunk rows are
    re-padded; batched loglikelihood and generation still equal the one-by-one results."""
    from vlm_tools.core.models import build_tiny_llava
    from vlm_tools.integrations.lmms_eval import VlmToolsModel
    from vlm_tools.testing import make_images

    model, processor = build_tiny_llava("llava_next")
    gen = [_Req(c, {"max_new_tokens": 3}, lambda d: [d["image"]], i, "t", "test") for i, c in enumerate(CONTEXTS[:2])]
    results = {}
    for bs in (1, 2):
        lm = VlmToolsModel(model=model, processor=processor, method="cls_topk", keep=24, batch_size=bs)
        lm.task_dict = {"t": {"test": [{"image": im} for im in make_images()]}}
        ll = lm.loglikelihood(_ll_requests()[:2])
        results[bs] = ([r.text[0] for r in ll], [r.text for r in lm.generate_until(gen)])
        before = [r.token_counts.visual_tokens_before for r in ll]
        after = [r.token_counts.visual_tokens for r in ll]
        assert before[0] != before[1] and all(a < b for a, b in zip(after, before))
        lm.wrapped.unwrap()
    assert results[1][0] == pytest.approx(results[2][0], abs=1e-4) and results[1][1] == results[2][1]


CHAT_TEMPLATE = ("{%- for m in messages -%}{{ m['role'].upper() + ' : ' }}{%- for c in m['content'] -%}"
                 "{%- if c['type'] == 'image' -%}{{ '<image>\\n' }}{%- else -%}{{ c['text'] }}{%- endif -%}"
                 "{%- endfor -%}{{ '\\n' }}{%- endfor -%}{%- if add_generation_prompt -%}ASSISTANT :{%- endif -%}")


def test_chat_template_prompts(eval_fixture):
    """With a chat template the images go in as content items; loglikelihood batches still match single runs."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from vlm_tools.integrations.lmms_eval import VlmToolsModel
    from vlm_tools.testing import make_images

    processor = AutoProcessor.from_pretrained(eval_fixture.checkpoint)
    processor.chat_template = CHAT_TEMPLATE
    model = LlavaForConditionalGeneration.from_pretrained(eval_fixture.checkpoint).eval()
    values = {}
    for bs in (1, 2):
        lm = VlmToolsModel(model=model, processor=processor, method="cls_topk", keep=KEEP, batch_size=bs)
        assert lm.use_chat
        assert lm.build_prompt("<image> what is it ?", 1) == "USER : <image>\nwhat is it ?\nASSISTANT :"
        lm.task_dict = {"t": {"test": [{"image": im} for im in make_images()]}}
        reqs = _ll_requests()[:2]
        values[bs] = [r.text[0] for r in lm.loglikelihood(reqs)]
        lm.wrapped.unwrap()
    assert values[1] == pytest.approx(values[2], abs=1e-4)
    lm = VlmToolsModel(model=model, processor=processor, method="none", assistant_prefix="answer :")
    assert lm.build_prompt("what is it ?", 1) == "USER : <image>\nwhat is it ?\nASSISTANT : answer :"
    lm.wrapped.unwrap()
    with pytest.raises(ValueError, match="no chat template"):
        VlmToolsModel(model=model, processor=AutoProcessor.from_pretrained(eval_fixture.checkpoint), prompt="chat")


# -- simple_evaluate on local tasks ----------------------------------------------------------------------------
def test_simple_evaluate_generate_and_loglikelihood(evaluated, eval_fixture):
    gen, ll = eval_fixture.gen_task, eval_fixture.ll_task
    for method, res in evaluated.items():
        assert set(res["results"]) >= {gen, ll}
        assert 0.0 <= res["results"][gen]["exact_match,none"] <= 1.0
        assert 0.0 <= res["results"][ll]["greedy_match,none"] <= 1.0
        assert res["results"][ll]["answer_logprob,none"] < 0
        for task in (gen, ll):
            samples = res["samples"][task]
            assert len(samples) == 8
            expected = N_PATCHES if method == "none" else KEEP
            for s in samples:
                (tc,) = s["token_counts"]
                assert tc["visual_tokens"] == expected and tc["visual_tokens_before"] == N_PATCHES
                assert tc["prefill_ms"] > 0 and tc["batch_size"] in (2, 3)
        ll_values = [s["filtered_resps"][0] for s in res["samples"][ll]]
        assert all(isinstance(v, tuple) and isinstance(v[0], float) and isinstance(v[1], bool) for v in ll_values)
    # same documents, prompts shorter by exactly the pruned visual tokens
    by_doc = {m: {s["doc_id"]: s["token_counts"][0]["input_tokens"] for s in r["samples"][gen]}
              for m, r in evaluated.items()}
    assert all(by_doc["none"][d] - by_doc["cls_topk"][d] == N_PATCHES - KEEP for d in by_doc["none"])


def test_local_task_shards_across_ranks(evaluated, eval_fixture):
    """Under data parallelism lmms-eval gives each rank a disjoint shard; the shards cover every document."""
    from lmms_eval.tasks import TaskManager, get_task_dict

    tm = TaskManager("WARNING", include_path=str(eval_fixture.task_dir), include_defaults=False)
    task = get_task_dict([eval_fixture.gen_task], tm)[eval_fixture.gen_task]
    shards = []
    for rank in range(3):
        task.build_all_requests(limit=None, rank=rank, world_size=3)
        shards.append({inst.doc_id for inst in task.instances})
    assert sum(len(s) for s in shards) == 8 and set().union(*shards) == set(range(8))


# -- entry point and light imports (subprocesses) --------------------------------------------------------------
def test_import_vlm_tools_does_not_import_lmms_eval():
    code = ("import sys, vlm_tools, vlm_tools.cli; vlm_tools.cli.build_parser(); "
            "import vlm_tools.integrations.lmms_manifest as m; "
            "print(sorted(k for k in sys.modules if k.startswith('lmms_eval')), m.MANIFESTS[0].model_id)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    mods, model_id = out.strip().rsplit(" ", 1)
    assert model_id == "vlm_tools"
    assert "lmms_eval.api" not in mods and "lmms_eval.evaluator" not in mods


def _cli_result(run):
    proc, out_dir = run
    if proc.returncode is None:
        proc.stdout_text, proc.stderr_text = proc.communicate(timeout=600)
    return proc, proc.stdout_text, proc.stderr_text, out_dir


def test_lmms_eval_cli_resolves_plugin_from_entry_point(lmms_eval_cli_run, eval_fixture):
    proc, stdout, stderr, out_dir = _cli_result(lmms_eval_cli_run)
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    (results,) = out_dir.rglob("*_results.json")
    data = json.loads(results.read_text())
    assert "exact_match,none" in data["results"][eval_fixture.gen_task]
    (samples,) = out_dir.rglob(f"*_samples_{eval_fixture.gen_task}.jsonl")
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    assert len(rows) == 2 and all(r["token_counts"][0]["visual_tokens"] == KEEP for r in rows)


def test_readme_command_with_batch_size_in_model_args(lmms_eval_cli_run, eval_fixture):
    """Issue 13.1: `batch_size=2` in model_args next to lmms-eval's own `--batch_size` (default 1) used to raise
    `TypeError: got multiple values for keyword argument 'batch_size'`, after which lmms-eval exited 0 with no
    results. model_args wins: every request ran in a batch of 2, and the results file exists."""
    proc, stdout, stderr, out_dir = _cli_result(lmms_eval_cli_run)
    assert "multiple values" not in stdout + stderr
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    (results,) = out_dir.rglob("*_results.json")
    data = json.loads(results.read_text())
    assert data["results"][eval_fixture.gen_task]["exact_match,none"] >= 0
    assert "batch_size=2" in data["config"]["model_args"]
    (samples,) = out_dir.rglob(f"*_samples_{eval_fixture.gen_task}.jsonl")
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    assert [r["token_counts"][0]["batch_size"] for r in rows] == [2, 2]


# -- offline data errors ---------------------------------------------------------------------------------------
def test_uncached_dataset_fails_with_instructions(tmp_path, monkeypatch):
    """A built-in YAML (pope) and a token-gated hub task: the error names the dataset and the caching command."""
    import lmms_eval
    from lmms_eval.tasks import TaskManager

    from vlm_tools.integrations.local_tasks import TaskDataError, check_task_data

    (tmp_path / "hub.yaml").write_text("task: vlmt_hub_only\ndataset_path: vlm-tools-test/NotCached\n"
                                       "dataset_kwargs:\n  token: true\ntest_split: test\n"
                                       "doc_to_text: question\ndoc_to_target: answer\n")
    pope_dir = Path(lmms_eval.__file__).parent / "tasks" / "pope"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_hf_home"))
    monkeypatch.delenv("HF_DATASETS_CACHE", raising=False)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("LMMS_EVAL_DATASETS_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tm = TaskManager("WARNING", include_path=[str(tmp_path), str(pope_dir)], include_defaults=False)
    with pytest.raises(TaskDataError) as err:
        check_task_data(tm, ["pope", "vlmt_hub_only"])
    msg = str(err.value)
    assert "lmms-lab-encoder/POPE" in msg and "vlm-tools-test/NotCached" in msg
    assert "vlm-tools eval --cache-data --tasks pope,vlmt_hub_only" in msg and "hf auth login" in msg
    assert "HF_HUB_OFFLINE" in msg
