"""`vlm-tools eval`: a methods x budgets x tasks grid through lmms-eval's `simple_evaluate`, and a comparison table.

    vlm-tools eval --model PATH --methods cls_topk,random --keep 64,128 --tasks pope,gqa --limit 100 --out out/eval
    vlm-tools eval --config eval_configs/grids/llava15_7b.yaml
    accelerate launch --num_processes 8 -m vlm_tools.cli eval --config eval_configs/grids/llava15_7b.yaml

Layout of `--out`:
    runs/<run_id>/<model>/<date>_results.json, <date>_samples_<task>.jsonl   lmms-eval's own outputs, per run
    cells/<run_id>/<task>.json                                               one cell: metrics, tokens, timing
    comparison.md / comparison.csv / comparison.json                         the table over the whole grid
    comparison.html, accuracy_vs_tokens.png, accuracy_vs_latency.png         one-file HTML report and the plots

A run is one method at one budget; it loads nothing: the checkpoint is loaded once per grid and wrapped per run.
A cell whose file matches the current settings and content is skipped on a re-run (`--force` re-runs it): the
fingerprint holds the cast method config, the checkpoint's files (sha256 of small files such as the config and the
chat template; size and mtime of the weights) and the task YAML text (with its includes and local data files).
`--out` is checked for writing before anything is evaluated, and a cell is marked finished only after lmms-eval's
results file and sample logs of its run were read back complete. Under
`accelerate launch` every process evaluates a shard of each task's documents on its own GPU (lmms-eval's data
parallelism); only rank 0 writes files.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

__all__ = ["EvalOutputError", "cell_path", "check_output_dir", "check_run_outputs", "default_include_paths",
           "grid_content", "pending_cells", "register_cli", "run_grid", "spec_from_args"]


def register_cli(subparsers: Any) -> None:
    """Add the `eval` sub-command to the `vlm-tools` parser."""
    p = subparsers.add_parser(
        "eval", help="evaluate methods x budgets x tasks with lmms-eval and write a comparison table",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="run YAML (see eval_configs/grids/); flags given here override its settings")
    p.add_argument("--model", help="HF LLaVA / LLaVA-NeXT checkpoint folder or hub id")
    p.add_argument("--methods", help="comma-separated methods, with fixed fields as name:key=value (random:seed=1)")
    p.add_argument("--keep", help="comma-separated budgets: visual tokens kept per image (e.g. 192,128,64)")
    p.add_argument("--ratio", help="comma-separated budgets: fraction of visual tokens removed (e.g. 0.5,0.75)")
    p.add_argument("--tasks", help="comma-separated lmms-eval tasks (built-in or from --include-path)")
    p.add_argument("--limit", type=float, help="documents per task (>= 1) or a fraction (< 1); default: all")
    p.add_argument("--batch-size", type=int, help="requests per forward/generate call (default 1)")
    p.add_argument("--out", help="output folder (default out/eval)")
    p.add_argument("--include-path", action="append", default=None,
                   help="extra lmms-eval task folder (repeatable); the project's task folder (--print-tasks-path) is "
                        "always added")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda:LOCAL_RANK if available, else cpu)")
    p.add_argument("--dtype", help="auto, float32, float16 or bfloat16 (default auto)")
    p.add_argument("--attn-implementation", help="sdpa, eager or flash_attention_2")
    p.add_argument("--prompt", choices=["auto", "chat", "plain"], help="prompt format (default auto)")
    p.add_argument("--max-new-tokens", type=int, help="generation length for tasks that set none")
    p.add_argument("--assistant-prefix", help="text after every prompt that the answer continues (e.g. 'Answer:')")
    p.add_argument("--gen-kwargs", help="lmms-eval --gen_kwargs string applied to every task")
    p.add_argument("--no-baseline", action="store_true", help="do not add the method=none reference")
    p.add_argument("--bootstrap-iters", type=int, help="bootstrap iterations for standard errors (default 0)")
    p.add_argument("--verbosity", help="lmms-eval log level (default WARNING)")
    p.add_argument("--force", action="store_true", help="re-run cells that are already finished")
    p.add_argument("--cache-data", action="store_true",
                   help="only download/prepare the tasks' datasets into the HF cache (needs internet; no model)")
    p.add_argument("--print-tasks-path", action="store_true",
                   help="print the folder of the project's lmms-eval tasks (for lmms-eval --include_path) and exit")
    p.set_defaults(func=_cmd_eval)


def spec_from_args(args: argparse.Namespace):
    """The grid from `--config` (if any) with the flags that were given on top (flags win)."""
    from vlm_tools.integrations.grid import load_grid_yaml, spec_from_dict

    data: dict[str, Any] = load_grid_yaml(args.config) if args.config else {}
    flags = {"model": args.model, "methods": args.methods, "keep": args.keep, "ratio": args.ratio,
             "tasks": args.tasks, "limit": args.limit, "batch_size": args.batch_size, "out": args.out,
             "device": args.device, "dtype": args.dtype, "attn_implementation": args.attn_implementation,
             "prompt": args.prompt, "assistant_prefix": args.assistant_prefix, "max_new_tokens": args.max_new_tokens,
             "gen_kwargs": args.gen_kwargs,
             "bootstrap_iters": args.bootstrap_iters, "verbosity": args.verbosity}
    for key, value in flags.items():
        if value is not None:
            data[key] = value
    if args.keep is not None:
        data.pop("ratio", None)
    if args.ratio is not None:
        data.pop("keep", None)
    if args.include_path:
        extra = [str(Path(p).resolve()) for p in args.include_path]
        data["include_path"] = list(data.get("include_path") or []) + extra
    if args.no_baseline:
        data["baseline"] = False
    return spec_from_dict(data)


class EvalOutputError(RuntimeError):
    """lmms-eval's results of a run were not written completely (the message names the file and the cause)."""


def _cmd_eval(args: argparse.Namespace) -> int:
    from vlm_tools.errors import OutputDirError
    from vlm_tools.integrations.local_tasks import TaskDataError

    if args.print_tasks_path:
        from vlm_tools.integrations import tasks_path

        try:
            print(tasks_path())
        except FileNotFoundError as exc:
            print(f"vlm-tools eval: error: {exc}", file=sys.stderr)
            return 2
        return 0
    try:
        spec = spec_from_args(args)
        spec.validate(require_model=not args.cache_data)
        _quiet_lmms_eval(spec.verbosity)
        run_grid(spec, force=args.force, cache_data=args.cache_data)
    except (ValueError, TaskDataError, EvalOutputError, OutputDirError) as exc:
        print(f"vlm-tools eval: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _quiet_lmms_eval(level: str) -> None:
    """Route lmms-eval's loguru logger to stderr at `level` (as its own CLI does with --verbosity)."""
    from loguru import logger

    logger.remove()
    logger.add(sys.stderr, level=level.upper())


def default_include_paths() -> list[str]:
    """The project's task folder (`vlm_tools.integrations.tasks_path()`), when it is there."""
    from vlm_tools.integrations import tasks_path

    try:
        return [str(tasks_path())]
    except FileNotFoundError:
        return []


def _task_manager(spec, include: list[str]):
    """A TaskManager; only the include paths are indexed when they hold every requested task (much faster).

    Built-in task names win over include-path tasks in lmms-eval, so local tasks need unique names either way.
    """
    from lmms_eval.tasks import TaskManager

    if include:
        local = TaskManager(spec.verbosity, include_path=include, include_defaults=False, model_name="vlm_tools")
        if all(t in local.all_tasks for t in spec.tasks):
            return local
    return TaskManager(spec.verbosity, include_path=include or None, model_name="vlm_tools")


def _check_tasks_known(task_manager: Any, tasks: list[str]) -> None:
    import difflib

    unknown = [t for t in tasks if t not in task_manager.all_tasks]
    if unknown:
        hints = []
        for t in unknown:
            close = difflib.get_close_matches(t, task_manager.all_tasks, n=3)
            hints.append(f"{t!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
        raise ValueError(f"unknown lmms-eval task(s): {'; '.join(hints)}; add task folders with --include-path")


def check_output_dir(out: Path) -> None:
    """Create `out/runs` and `out/cells` and check that they can be written, before any model loads or task is
    evaluated (`vlm_tools.core.io.ensure_writable_dir`).

    Raises:
        OutputDirError: a folder cannot be created or written (one line: the path and the OS error).
    """
    from vlm_tools.core.io import ensure_writable_dir

    for sub in (out / "runs", out / "cells"):
        ensure_writable_dir(sub)


def cell_path(out: Path, run_id: str, task: str) -> Path:
    """Where a finished cell's record lives."""
    return out / "cells" / run_id / f"{task}.json"


def grid_content(spec, task_manager: Any) -> dict[str, Any]:
    """What the grid's names point to, for the cell fingerprints: the checkpoint's files, each task's YAML text
    (includes, Python files beside it, local data files) and the lmms-eval version."""
    from vlm_tools.integrations.grid import model_fingerprint, yaml_fingerprint
    from vlm_tools.integrations.local_tasks import task_datasets, task_yaml_paths

    tasks = {}
    for task in spec.tasks:
        files = [f for ref in task_datasets(task_manager, task) if ref.is_local for f in ref.data_files]
        tasks[task] = {}
        for yaml_path in task_yaml_paths(task_manager, task):
            tasks[task].update(yaml_fingerprint(yaml_path, files))
    return {"model": model_fingerprint(spec.model), "lmms_eval": _version("lmms_eval"), "tasks": tasks}


def pending_cells(spec, runs: list, out: Path, force: bool = False,
                  content: dict[str, Any] | None = None) -> list[tuple[Any, list[str]]]:
    """Per run, the tasks still to evaluate: no cell file, or one written with other settings or content."""
    plan = []
    for run in runs:
        todo = []
        for task in spec.tasks:
            path = cell_path(out, run.run_id, task)
            if not force and path.is_file():
                try:
                    if json.loads(path.read_text()).get("fingerprint") == json.loads(
                            json.dumps(spec.fingerprint(run, task, content), default=str)):
                        continue
                except (OSError, json.JSONDecodeError):
                    pass
            todo.append(task)
        if todo:
            plan.append((run, todo))
    return plan


def _broadcast_plan(plan: list, dist: Any) -> list:
    """Rank 0's plan on every process (all ranks must run the same cells: evaluation has collectives).

    Without an initialised process group (a single process) every rank keeps its own plan.
    """
    import torch.distributed

    if dist.world_size == 1 or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return plan
    box = [plan if dist.is_main else None]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _log(dist: Any, stream: TextIO, message: str) -> None:
    if dist.is_main:
        print(message, file=stream, flush=True)


def run_grid(spec, *, force: bool = False, cache_data: bool = False, task_manager: Any = None,
             stream: TextIO | None = None, dist: Any = None) -> dict[str, Any]:
    """Evaluate every pending cell of the grid and (rank 0) write the comparison table.

    Args:
        spec: the grid (`GridSpec`, validated here again).
        force: re-run finished cells.
        cache_data: only download/prepare the tasks' datasets (no model is loaded).
        task_manager: an lmms-eval `TaskManager` to reuse (default: one over `spec.include_path` and the
            repository's eval_configs/tasks).
        stream: where progress messages go (default: stderr).
        dist: the process placement (default: from RANK / LOCAL_RANK / WORLD_SIZE); only rank 0 writes files.

    Returns:
        `{"ran": [(run_id, task), ...], "skipped": [...], "table": {"md": path, ...}, "rows": [...]}` (rank 0;
        other ranks get the same keys with empty values).

    Raises:
        ValueError: bad settings or unknown tasks; `TaskDataError`: task data that is neither cached nor
            downloadable; `OutputDirError`: `--out` cannot be written; all before any model loads.
            `EvalOutputError`: lmms-eval did not write a run's results completely (its cells stay unfinished).
    """
    from vlm_tools.integrations.grid import build_table, spec_to_dict, write_table
    from vlm_tools.integrations.local_tasks import check_task_data
    from vlm_tools.integrations.model_args import DistInfo

    runs = spec.validate(require_model=not cache_data)
    stream = stream if stream is not None else sys.stderr
    dist = dist if dist is not None else DistInfo.from_env()
    out = Path(spec.out)
    if dist.is_main and not cache_data:
        check_output_dir(out)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import Accelerator

        Accelerator()  # joins the process group that lmms-eval's collectives and the plugin use
    include = list(dict.fromkeys([*spec.include_path, *default_include_paths()]))
    tm = task_manager if task_manager is not None else _task_manager(spec, include)
    _check_tasks_known(tm, spec.tasks)
    check_task_data(tm, spec.tasks)  # cached, or downloadable (Hub reachable, token present when required)
    if cache_data:
        return _cache_data(spec, tm, dist, stream)

    content = grid_content(spec, tm)
    plan = _broadcast_plan(pending_cells(spec, runs, out, force, content), dist)
    todo = {(r.run_id, t) for r, tasks in plan for t in tasks}
    all_cells = [(r.run_id, t) for r in runs for t in spec.tasks]
    skipped = [c for c in all_cells if c not in todo]
    if skipped:
        _log(dist, stream, f"vlm-tools eval: {len(skipped)} of {len(all_cells)} cells already finished, skipped")
    ran: list[tuple[str, str]] = []
    if plan:
        ran = _evaluate(spec, plan, tm, out, dist, stream, content)
    report: dict[str, Any] = {"ran": ran, "skipped": skipped, "table": {}, "rows": []}
    if dist.is_main:
        cells = []
        for run in runs:
            for task in spec.tasks:
                path = cell_path(out, run.run_id, task)
                if path.is_file():
                    cells.append(json.loads(path.read_text()))
        rows = build_table(cells, [m.name for m in spec.all_methods()])
        meta = {"model": spec.model, "settings": spec_to_dict(spec)}
        report["table"] = write_table(rows, out, meta)
        report["rows"] = rows
        _log(dist, stream, f"vlm-tools eval: comparison table -> {report['table']['md']}")
        print(report["table"]["md"].read_text(), flush=True)
    return report


def _cache_data(spec, task_manager: Any, dist: Any, stream: TextIO) -> dict[str, Any]:
    from lmms_eval.tasks import get_task_dict

    from vlm_tools.integrations.local_tasks import TaskDataError, hub_reachable

    for task in spec.tasks:
        try:
            get_task_dict([task], task_manager)
        except Exception as exc:  # lmms-eval wraps download failures in tenacity.RetryError
            reach = "reachable" if hub_reachable() else "NOT reachable (offline mode or no network)"
            raise TaskDataError(f"could not download the data of task {task!r} (the Hugging Face Hub is {reach}): "
                                f"{type(exc).__name__}: {exc}") from exc
        _log(dist, stream, f"vlm-tools eval: data of task {task!r} is cached")
    return {"ran": [], "skipped": [], "table": {}, "rows": []}


def check_run_outputs(results_file: Path | None, tasks: list[str], samples: dict[str, int]) -> None:
    """Read back what lmms-eval's tracker wrote for one run (it only logs a warning when a write fails).

    Args:
        results_file: `<date>_results.json` of the run, or None when the tracker never got to name it.
        tasks: the tasks the run evaluated (each must have results).
        samples: task -> number of logged samples (`<date>_samples_<task>.jsonl` must hold one JSON line each).

    Raises:
        EvalOutputError: a file is missing, truncated or not valid JSON, or lacks a task (names the file).
    """
    hint = "lmms-eval warns 'Could not save results' when a write fails: disk full or read-only?"
    if results_file is None or not results_file.is_file():
        raise EvalOutputError(f"lmms-eval did not write its results file {results_file or '(no path)'} ({hint}); "
                              f"the cells of tasks {', '.join(tasks)} stay unfinished")
    try:
        data = json.loads(results_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EvalOutputError(f"lmms-eval's results file {results_file} cannot be read back ({exc}; {hint}); "
                              f"the cells of tasks {', '.join(tasks)} stay unfinished") from None
    missing = [t for t in tasks if t not in (data.get("results") or {})]
    if missing:
        raise EvalOutputError(f"lmms-eval's results file {results_file} has no results for {', '.join(missing)}")
    date_id = results_file.name[:-len("_results.json")]
    for task, n_samples in samples.items():
        path = results_file.parent / f"{date_id}_samples_{task}.jsonl"
        try:
            lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise EvalOutputError(f"lmms-eval's sample log {path} cannot be read back ({exc}; {hint})") from None
        if len(lines) != n_samples:
            raise EvalOutputError(f"lmms-eval's sample log {path} holds {len(lines)} samples, expected "
                                  f"{n_samples} ({hint})")


def _evaluate(spec, plan: list, task_manager: Any, out: Path, dist: Any, stream: TextIO,
              content: dict[str, Any]) -> list[tuple[str, str]]:
    import torch
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.loggers import EvaluationTracker
    from lmms_eval.utils import get_datetime_str
    from tqdm import tqdm

    from vlm_tools.core.io import write_json_atomic
    from vlm_tools.integrations.grid import summarize_task
    from vlm_tools.integrations.lmms_eval import VlmToolsModel, load_pretrained
    from vlm_tools.integrations.model_args import format_model_args, parse_model_args, resolve_device

    shared = spec.plugin_args()
    plugin = parse_model_args({"pretrained": spec.model, **shared})
    device = resolve_device(plugin.device, dist, torch.cuda.is_available())
    _log(dist, stream, f"vlm-tools eval: loading {spec.model} on {device} ({plugin.dtype})")
    model, processor = load_pretrained(spec.model, device, plugin.dtype, plugin.attn_implementation)
    ran = []
    bar = tqdm(plan, desc="vlm-tools eval", unit="run", disable=not dist.is_main)
    for run, tasks in bar:
        bar.set_postfix_str(f"{run.method.label} {run.budget.label}: {','.join(tasks)}")
        model_args = format_model_args({"pretrained": spec.model, "method": run.method.name, **run.method_kwargs,
                                        **{k: v for k, v in shared.items() if k != "device"}})
        lm = VlmToolsModel(pretrained=spec.model, model=model, processor=processor, method=run.method.name, **shared,
                           **run.method_kwargs)
        start = time.perf_counter()
        try:
            results = simple_evaluate(model=lm, model_args=model_args, tasks=tasks, task_manager=task_manager,
                                      limit=spec.limit, bootstrap_iters=spec.bootstrap_iters, log_samples=True,
                                      gen_kwargs=spec.gen_kwargs, verbosity=spec.verbosity,
                                      datetime_str=get_datetime_str())
        finally:
            lm.wrapped.unwrap()  # also done by lm.clean() at the end of a successful evaluation
        wall = round(time.perf_counter() - start, 2)
        ran.extend((run.run_id, t) for t in tasks)
        if results is None or not dist.is_main:  # lmms-eval gathers everything on rank 0, which writes
            continue
        samples = results.pop("samples", {})
        cells = {t: summarize_task(results, samples, t, spec.metrics) for t in tasks}
        counts = {name: len(task_samples) for name, task_samples in samples.items()}
        tracker = EvaluationTracker(output_path=str(out / "runs" / run.run_id))
        tracker.general_config_tracker.log_experiment_args(model_source="vlm_tools", model_args=model_args,
                                                           system_instruction=None, chat_template=None,
                                                           fewshot_as_multiturn=False)
        tracker.save_results_aggregated(results=results, samples=samples, datetime_str=results["date"])
        for name, task_samples in samples.items():
            tracker.save_results_samples(task_name=name, samples=task_samples)
        date_id = getattr(tracker, "date_id", None)  # set by a save that got as far as naming its file
        results_file = (out / "runs" / run.run_id / tracker.general_config_tracker.model_name_sanitized /
                        f"{date_id}_results.json") if date_id else None
        check_run_outputs(results_file, tasks, counts)
        for task, cell in cells.items():
            record = {**cell, "model": spec.model, "method": run.method.label, "method_name": run.method.name,
                      "method_kwargs": run.method_kwargs, "budget": run.budget.label, "run_id": run.run_id,
                      "results_file": str(results_file), "wall_s": wall, "date": results["date"],
                      "lmms_eval_version": _version("lmms_eval"), "world_size": dist.world_size,
                      "fingerprint": spec.fingerprint(run, task, content)}
            write_json_atomic(cell_path(out, run.run_id, task), record, indent=2, default=str)
    bar.close()
    return ran


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package.replace("_", "-"))
    except PackageNotFoundError:
        return None
