"""Evaluation grids (methods x budgets x tasks) for `vlm-tools eval`: the spec, cell records and comparison table.

A grid comes from a run YAML (see `eval_configs/grids/`) and/or command-line flags (flags win). Each method with a
budget field runs once per budget; a method without one (`none`) runs once. Unless disabled, the `none` baseline is
added so every row gets its retention (score / baseline score on the same task).

Nothing here imports torch or lmms-eval.
"""

from __future__ import annotations

import csv
import hashlib
import html
import io
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vlm_tools.core import io as atomic
from vlm_tools.core.config import ConfigError, cast_value, config_fields
from vlm_tools.integrations.model_args import cast_method_kwargs, method_fields, validate_method

__all__ = [
    "BASELINE",
    "PRIMARY_METRICS",
    "TABLE_COLUMNS",
    "HASH_LIMIT",
    "Budget",
    "GridSpec",
    "MEASUREMENT_NOTES",
    "MethodSpec",
    "RunSpec",
    "build_table",
    "file_fingerprint",
    "folder_fingerprint",
    "load_grid_yaml",
    "md_cell",
    "model_fingerprint",
    "parse_methods",
    "plot_comparison",
    "parse_number_list",
    "primary_metric",
    "render_csv",
    "render_html",
    "render_markdown",
    "spec_from_dict",
    "spec_to_dict",
    "summarize_task",
    "write_table",
    "yaml_fingerprint",
]

BASELINE = "none"

#: The headline metric of each standard benchmark (lmms-eval 0.7.3 result keys, filter suffix dropped).
PRIMARY_METRICS: dict[str, str] = {
    "gqa": "exact_match",
    "mme": "mme_perception_score",
    "pope": "pope_f1_score",
    "pope_full": "pope_f1_score",
    "scienceqa_img": "exact_match",
    "textvqa_val": "exact_match",
    "mmbench_en_dev_static": "gpt_eval_score",
    "mmbench_en_dev": "gpt_eval_score",
    "seedbench": "seed_image",
    "vqav2_val": "exact_match",
    "vqav2_val_lite": "exact_match",
    "vizwiz_vqa_val": "exact_match",
    "mmvet": "gpt_eval_score",
}

TABLE_COLUMNS = ("task", "metric", "method", "budget", "score", "retention", "visual_tokens", "visual_tokens_before",
                 "prefill_ms", "peak_memory_mb", "n_samples")


@dataclass(frozen=True)
class MethodSpec:
    """A method name plus fixed config fields (other than the budget), e.g. `random` with `seed=1`."""

    name: str
    kwargs: tuple[tuple[str, Any], ...] = ()

    @property
    def label(self) -> str:
        """`name` or `name[k=v,...]` (used in the table)."""
        if not self.kwargs:
            return self.name
        return f"{self.name}[{','.join(f'{k}={v}' for k, v in self.kwargs)}]"


@dataclass(frozen=True)
class Budget:
    """`keep=N` (tokens per image), `ratio=r` (fraction removed), or None (the method takes no budget)."""

    kind: str | None = None
    value: int | float | None = None

    @property
    def label(self) -> str:
        return "full" if self.kind is None else f"{self.kind}={self.value}"

    def as_kwargs(self) -> dict[str, Any]:
        return {} if self.kind is None else {self.kind: self.value}


@dataclass(frozen=True)
class RunSpec:
    """One model wrap: a method at one budget, evaluated on the grid's tasks."""

    method: MethodSpec
    budget: Budget

    @property
    def method_kwargs(self) -> dict[str, Any]:
        return {**dict(self.method.kwargs), **self.budget.as_kwargs()}

    @property
    def config_digest(self) -> str:
        """sha256 of the method name and its cast config fields (budget included): equal configs, equal digests."""
        text = json.dumps({"method": self.method.name, "kwargs": self.method_kwargs}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    @property
    def run_id(self) -> str:
        """A file-system-safe id, e.g. `cls_topk_keep64`, `random-seed1_keep64`, `none_full`.

        When the readable form could stand for another config (a text field such as a student path, or characters
        that had to be replaced), it ends in 10 hex digits of `config_digest`: two distinct configs never share a
        run id, hence never a cell file.
        """
        extra = "".join(f"-{k}{v}" for k, v in self.method.kwargs)
        budget = "full" if self.budget.kind is None else f"{self.budget.kind}{self.budget.value}"
        raw = f"{self.method.name}{extra}_{budget}"
        safe = re.sub(r"[^A-Za-z0-9_.=-]+", "_", raw)
        if safe != raw or len(safe) > 80 or any(isinstance(v, str) for _, v in self.method.kwargs):
            safe = f"{safe[:80]}-{self.config_digest[:10]}"
        return safe


@dataclass
class GridSpec:
    """A grid of methods x budgets x tasks on one model.

    Attributes:
        model: HF checkpoint (folder or hub id).
        methods: the methods (the baseline is added unless `baseline` is False).
        keep: budgets in tokens per image; or `ratio`: fractions removed (not both).
        tasks: lmms-eval task names (built-in or from `include_path`).
        out: output folder (runs/, cells/, comparison.{md,csv,json}).
        limit: documents per task (int) or fraction (float < 1); None for all.
        batch_size: requests per forward/generate call.
        include_path: extra task folders.
        device, dtype, attn_implementation, prompt, assistant_prefix, max_new_tokens: plugin arguments.
        gen_kwargs: lmms-eval `--gen_kwargs` string applied to every task.
        metrics: primary metric per task (overrides `PRIMARY_METRICS`).
        baseline: add `method=none`.
        bootstrap_iters: lmms-eval bootstrap iterations for standard errors (0: none, fastest).
        verbosity: lmms-eval log level.
    """

    model: str
    methods: list[MethodSpec]
    tasks: list[str]
    keep: list[int] = field(default_factory=list)
    ratio: list[float] = field(default_factory=list)
    out: str = "out/eval"
    limit: int | float | None = None
    batch_size: int = 1
    include_path: list[str] = field(default_factory=list)
    device: str | None = None
    dtype: str = "auto"
    attn_implementation: str | None = None
    prompt: str = "auto"
    assistant_prefix: str | None = None
    max_new_tokens: int | None = None
    gen_kwargs: str | None = None
    metrics: dict[str, str] = field(default_factory=dict)
    baseline: bool = True
    bootstrap_iters: int = 0
    verbosity: str = "WARNING"

    def all_methods(self) -> list[MethodSpec]:
        """The grid's methods, the baseline first when enabled."""
        methods = list(dict.fromkeys(self.methods))
        if self.baseline and not any(m.name == BASELINE and not m.kwargs for m in methods):
            methods.insert(0, MethodSpec(BASELINE))
        return methods

    def budgets(self) -> list[Budget]:
        if self.keep and self.ratio:
            raise ValueError("give keep budgets or ratio budgets, not both")
        if self.keep:
            return [Budget("keep", int(k)) for k in self.keep]
        return [Budget("ratio", float(r)) for r in self.ratio]

    def runs(self, check_methods: bool = True) -> list[RunSpec]:
        """Every (method, budget) run; methods without a `keep`/`ratio` field run once, at `full`.

        With `check_methods`, each method's fields are cast by the core config parser first, so specs that spell
        one config differently (`seed=1`, `seed='1'`) are one run.

        Raises:
            ValueError: a method needs a budget and none is given, or two distinct runs would share a run id.
        """
        budgets = self.budgets()
        methods = self.all_methods()
        if check_methods:
            methods = list(dict.fromkeys(
                MethodSpec(m.name, tuple(sorted(cast_method_kwargs(m.name, dict(m.kwargs)).items())))
                for m in methods))
        runs = []
        for m in methods:
            takes_budget = True
            if check_methods or m.name == BASELINE:
                takes_budget = bool({"keep", "ratio"} & set(method_fields(m.name)))
            if not takes_budget:
                runs.append(RunSpec(m, Budget()))
                continue
            if not budgets:
                raise ValueError(f"method {m.name!r} needs a budget: give --keep (tokens per image) or --ratio")
            runs.extend(RunSpec(m, b) for b in budgets)
        ids: dict[str, RunSpec] = {}
        for run in runs:
            other = ids.setdefault(run.run_id, run)
            if other is not run:
                raise ValueError(f"runs {other.method.label} {other.budget.label} and {run.method.label} "
                                 f"{run.budget.label} would share the run id {run.run_id!r}")
        return runs

    def validate(self, check_methods: bool = True, require_model: bool = True) -> list[RunSpec]:
        """Check every setting and every run's method config (no model is loaded); returns the runs.

        Args:
            check_methods: validate method names and configs against the registry.
            require_model: a model must be set (not needed to only cache task data).

        Raises:
            ValueError: a missing model or task list, an unknown method (lists the registered ones), a bad budget.
        """
        if require_model and not self.model:
            raise ValueError("no model: pass --model PATH or set model: in the run YAML")
        if not self.tasks:
            raise ValueError("no tasks: pass --tasks t1,t2 or set tasks: in the run YAML")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        if self.limit is not None and self.limit <= 0:
            raise ValueError(f"limit must be positive (documents per task, or a fraction below 1), got {self.limit}")
        runs = self.runs(check_methods)
        if check_methods:
            for run in runs:
                validate_method(run.method.name, run.method_kwargs)
        return runs

    def plugin_args(self) -> dict[str, Any]:
        """The plugin arguments shared by every run (besides method and budget)."""
        args: dict[str, Any] = {"batch_size": self.batch_size, "dtype": self.dtype, "prompt": self.prompt,
                                "attn_implementation": self.attn_implementation, "device": self.device,
                                "assistant_prefix": self.assistant_prefix}
        if self.max_new_tokens is not None:
            args["max_new_tokens"] = self.max_new_tokens
        return {k: v for k, v in args.items() if v is not None}

    def fingerprint(self, run: RunSpec, task: str, content: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """What a finished cell must match to be skipped on a re-run (device and batch size are left out).

        Args:
            run: the run.
            task: the task.
            content: what the names point to (`{"model": model_fingerprint(...), "tasks": {task: ...}, ...}`): a
                checkpoint replaced at the same path or an edited task YAML then re-runs the cell.
        """
        content = dict(content or {})
        tasks = content.pop("tasks", {})
        return {"model": self.model, "method": run.method.name, "method_kwargs": run.method_kwargs, "task": task,
                "limit": self.limit, "gen_kwargs": self.gen_kwargs, "dtype": self.dtype, "prompt": self.prompt,
                "attn_implementation": self.attn_implementation, "max_new_tokens": self.max_new_tokens,
                "assistant_prefix": self.assistant_prefix, "content": {**content, "task": tasks.get(task)}}


# -- content fingerprints --------------------------------------------------------------------------------------
#: files up to this size are fingerprinted by their sha256, larger ones (weights) by size and modification time
HASH_LIMIT = 4 * 2**20


def file_fingerprint(path: Path) -> str | list[int]:
    """sha256 of a small file; `[size, mtime_ns]` of a large one (a rewritten checkpoint changes its mtime)."""
    st = path.stat()
    if st.st_size <= HASH_LIMIT:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    return [st.st_size, st.st_mtime_ns]


def folder_fingerprint(folder: Path) -> dict[str, Any]:
    """`file_fingerprint` of every file under `folder` (hidden files and folders skipped), by relative path."""
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if path.is_file() and not any(part.startswith(".") for part in rel.parts):
            out[rel.as_posix()] = file_fingerprint(path)
    return out


def model_fingerprint(model: str) -> dict[str, Any]:
    """The content of a checkpoint: every file of a local folder (`default`: the default model's folder), or of
    the cached hub snapshot (with its revision); a hub id that is not cached yet gives only its name."""
    from vlm_tools.integrations.model_args import resolve_pretrained

    path = Path(resolve_pretrained(model))
    if path.is_dir():
        return {"path": str(path.resolve()), "files": folder_fingerprint(path)}
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model, "config.json")
    except Exception:  # an id that is not a valid repo name: nothing cached to describe
        cached = None
    if isinstance(cached, str):
        snapshot = Path(cached).parent
        return {"hub_id": model, "revision": snapshot.name, "files": folder_fingerprint(snapshot)}
    return {"hub_id": model}


def yaml_fingerprint(yaml_path: str | Path, data_files: Sequence[str] = ()) -> dict[str, Any]:
    """A task YAML's text with its `include:` chain, the Python files beside it (`!function utils.x`), and the
    local data files it reads, as `{path: file_fingerprint}`."""
    out: dict[str, Any] = {}
    todo = [Path(yaml_path)]
    while todo:
        path = todo.pop()
        if str(path) in out or not path.is_file():
            continue
        out[str(path)] = file_fingerprint(path)
        for py in sorted(path.parent.glob("*.py")):
            out.setdefault(str(py), file_fingerprint(py))
        try:
            include = (yaml.load(path.read_text(), Loader=_IgnoreTagsLoader) or {}).get("include")
        except yaml.YAMLError:
            continue
        for inc in [include] if isinstance(include, str) else list(include or []):
            todo.append(Path(inc) if os.path.isabs(inc) else path.parent / inc)
    for f in data_files:
        if os.path.isfile(f):
            out[str(f)] = file_fingerprint(Path(f))
    return out


class _IgnoreTagsLoader(yaml.SafeLoader):
    """Reads task YAMLs without resolving lmms-eval's `!function` tags."""


_IgnoreTagsLoader.add_multi_constructor("!", lambda loader, suffix, node: None)


def parse_number_list(text: str | Sequence | None, kind: type, name: str = "value") -> list:
    """`"64,128"` or `[64, 128]` -> `[64, 128]` (each item cast to `kind` by the core config parser)."""
    if text is None or text == "":
        return []
    items = text if isinstance(text, (list, tuple)) else str(text).split(",")
    try:
        return [cast_value(item.strip() if isinstance(item, str) else item, kind, name) for item in items]
    except ConfigError:
        raise ValueError(f"{name}: expected a comma-separated list of {kind.__name__} values, got {text!r}") from None


def parse_methods(value: str | Sequence | None) -> list[MethodSpec]:
    """Methods from `"cls_topk,random:seed=1"` (flags) or a YAML list of names / `{name: random, seed: 1}` maps.

    Each value is cast to its config field's type by the core config parser, so `seed=1` and `seed='1'` are the
    same method spec (the budget is checked later, per run, by `GridSpec.validate`).

    Raises:
        ValueError: an unknown method or field, a value of the wrong type, an entry without a name, a `key=value`
            pair without `=`, or a key given twice.
    """
    if value is None or value == "":
        return []
    items = value if isinstance(value, (list, tuple)) else [v for v in str(value).split(",") if v.strip()]
    specs = []
    for item in items:
        if isinstance(item, Mapping):
            item = dict(item)
            name = item.pop("name", None)
            if not name:
                raise ValueError(f"a method entry needs name:, got {item}")
            name, kwargs = str(name), item
        else:
            name, *pairs = (x.strip() for x in str(item).strip().split(":"))
            kwargs = {}
            for pair in pairs:
                if "=" not in pair:
                    raise ValueError(f"method arguments are name:key=value[:key=value], got {item!r}")
                k, v = (x.strip() for x in pair.split("=", 1))
                if k in kwargs:
                    raise ValueError(f"method {item!r} gives {k} twice ({k}={kwargs[k]}, {k}={v}); "
                                     f"give each key once")
                kwargs[k] = v
        specs.append(MethodSpec(name, tuple(sorted(cast_method_kwargs(name, kwargs).items()))))
    return specs


class _StrictLoader(yaml.SafeLoader):
    """A YAML safe loader that refuses duplicate keys (PyYAML silently keeps the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} at line {key_node.start_mark.line + 1} (first at line "
                    f"{seen[key].start_mark.line + 1}); give each setting once")
            seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


def load_grid_yaml(path: str | Path) -> dict[str, Any]:
    """Read a run YAML (duplicate keys are an error); `include_path` entries resolve against the YAML's folder."""
    path = Path(path)
    try:
        data = yaml.load(path.read_text(), Loader=_StrictLoader) or {}  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: {' '.join(str(exc).split())}") from None  # one line
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a run YAML is a mapping of settings, got {type(data).__name__}")  # noqa: TRY004
    known = set(GridSpec.__dataclass_fields__)
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{path}: unknown settings {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
    inc = data.get("include_path") or []
    inc = [inc] if isinstance(inc, str) else list(inc)
    data["include_path"] = [str((path.parent / p).resolve()) if not os.path.isabs(p) else p for p in inc]
    return data


#: GridSpec settings that are lists or maps, read by their own parsers (everything else: `cast_value`)
_LIST_SETTINGS = ("methods", "keep", "ratio", "tasks", "include_path", "metrics")


def spec_from_dict(data: Mapping[str, Any]) -> GridSpec:
    """A `GridSpec` from merged settings (a run YAML and/or flags), each cast by the core config parser.

    `tasks` and `keep`/`ratio` may be comma-separated text; `methods` as for `parse_methods`; `limit` is a document
    count (>= 1) or a fraction (< 1).

    Raises:
        ValueError: an unknown setting or a value of the wrong type (names the setting).
    """
    data = dict(data)
    fields_ = config_fields(GridSpec)
    unknown = sorted(set(data) - set(fields_))
    if unknown:
        raise ValueError(f"unknown grid settings {', '.join(unknown)}; valid: {', '.join(sorted(fields_))}")
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key in _LIST_SETTINGS:
            continue
        try:
            out[key] = cast_value(value, fields_[key], key)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
    limit = out.get("limit")
    if isinstance(limit, float) and limit >= 1:
        raise ValueError(f"limit is a document count (>= 1) or a fraction (< 1), got {limit}")
    tasks = data.get("tasks")
    out["tasks"] = [t.strip() for t in tasks.split(",") if t.strip()] if isinstance(tasks, str) else \
        [str(t) for t in tasks or []]
    out["methods"] = parse_methods(data.get("methods"))
    out["keep"] = parse_number_list(data.get("keep"), int, "keep")
    out["ratio"] = parse_number_list(data.get("ratio"), float, "ratio")
    out["include_path"] = [str(p) for p in data.get("include_path") or []]
    out["metrics"] = {str(k): str(v) for k, v in dict(data.get("metrics") or {}).items()}
    out.setdefault("model", "")
    return GridSpec(**out)


# -- results -> cells -> table ---------------------------------------------------------------------------------
def primary_metric(task: str, metrics: Mapping[str, Any], overrides: Mapping[str, str] | None = None) -> str | None:
    """The headline metric of a task: an override, `PRIMARY_METRICS`, else the first numeric metric."""
    for source in (overrides or {}, PRIMARY_METRICS):
        if task in source and source[task] in metrics:
            return source[task]
    for name, value in metrics.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return name
    return None


def _metrics_of(result: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in result.items():
        name, _, _filter = key.partition(",")
        if name == "alias" or name.endswith("_stderr") or name in out:
            continue
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 3) if values else None


def _median(values: list[float]) -> float | None:
    if not values:
        return None
    v = sorted(values)
    mid = len(v) // 2
    return round(v[mid] if len(v) % 2 else (v[mid - 1] + v[mid]) / 2, 3)


def summarize_task(results: Mapping[str, Any], samples: Mapping[str, list], task: str,
                   overrides: Mapping[str, str] | None = None) -> dict[str, Any]:
    """One cell's numbers from a `simple_evaluate` output: metrics, the primary score and per-sample token stats.

    Token statistics come from the `token_counts` the plugin attaches to every logged sample: visual tokens are
    means over samples, prefill time is the median of the per-sample times (batch prefill / batch size; batches hold
    one task only), so the warm-up of the first batch does not dominate short runs, and peak memory is the maximum
    over the task's batches (see `MEASUREMENT_NOTES`).
    """
    result = results["results"].get(task, {})
    metrics = _metrics_of(result)
    metric = primary_metric(task, metrics, overrides)
    members = [task] + list(results.get("group_subtasks", {}).get(task, []))
    counts = [tc for t in members for s in samples.get(t, []) for tc in (s.get("token_counts") or []) if tc]
    n_samples = sum(len(samples.get(t, [])) for t in members)
    peaks = [tc["peak_memory_mb"] for tc in counts if tc.get("peak_memory_mb") is not None]
    return {
        "task": task, "metric": metric, "score": metrics.get(metric) if metric else None, "metrics": metrics,
        "visual_tokens": _mean([tc["visual_tokens"] for tc in counts if "visual_tokens" in tc]),
        "visual_tokens_before": _mean([tc["visual_tokens_before"] for tc in counts if "visual_tokens_before" in tc]),
        "prefill_ms": _median([tc["prefill_ms"] for tc in counts if "prefill_ms" in tc]),
        "peak_memory_mb": max(peaks) if peaks else None,
        "n_samples": n_samples,
    }


def build_table(cells: list[dict[str, Any]], method_order: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Table rows (one per cell) with the retention vs the `none` baseline of the same task.

    Rows are ordered by task, then method (baseline first, then `method_order`), then budget (largest first).
    """
    base = {c["task"]: c.get("score") for c in cells if c["method"] == BASELINE and c["budget"] == "full"}
    order = {m: i for i, m in enumerate([BASELINE, *(method_order or [])])}

    def budget_key(label: str) -> float:
        _, _, v = label.partition("=")
        try:
            return -float(v) if label.startswith("keep") else float(v)
        except ValueError:
            return -math.inf

    rows = []
    for c in cells:
        ref = base.get(c["task"])
        score = c.get("score")
        retention = round(score / ref, 4) if score is not None and ref not in (None, 0) else None
        row = {k: c.get(k) for k in TABLE_COLUMNS}
        row["retention"] = retention
        rows.append(row)
    rows.sort(key=lambda r: (r["task"], order.get(r["method"], len(order)), r["method"], budget_key(r["budget"])))
    return rows


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value.is_integer():
            return str(int(value))
        return f"{value:.4g}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def md_cell(value: Any) -> str:
    """Text for one Markdown table cell: HTML escaped (GitHub renders raw HTML in Markdown), `|` escaped as `\\|`
    (it would end the cell), line breaks as spaces."""
    text = html.escape(str(value), quote=False).replace("|", "\\|")
    return " ".join(text.splitlines())


#: How the table's latency and memory columns are measured (printed under the Markdown and HTML tables).
MEASUREMENT_NOTES = (
    "prefill ms/sample: wall time of a batch from the wrapped call's start to the end of the LLM prefill (vision "
    "tower, projector, pruning, LLM prefill; CUDA synchronised), divided by the requests in the batch; the median "
    "over the task's samples. The plugin never puts two tasks in one batch, so every number belongs to its task.",
    "peak MiB: the highest peak of the task's batches, model weights included: on CUDA the peak allocated device "
    "memory (torch.cuda.max_memory_allocated, reset before each batch); on a CPU the process peak resident set size "
    "(VmHWM, reset before each batch).",
    "visual tokens: mean per sample of the visual tokens the LLM saw; (of): without pruning.",
)

TABLE_HEAD = ("task", "metric", "method", "budget", "score", "retention", "visual tokens", "(of)", "prefill ms/sample",
              "peak MiB", "n")


def _cells(r: Mapping[str, Any]) -> list[str]:
    retention = "-" if r["retention"] is None else f"{100 * r['retention']:.1f}%"
    return [r["task"], r["metric"], r["method"], r["budget"], _fmt(r["score"]), retention, _fmt(r["visual_tokens"]),
            _fmt(r["visual_tokens_before"]), _fmt(r["prefill_ms"]), _fmt(r["peak_memory_mb"]), _fmt(r["n_samples"])]


def render_markdown(rows: list[dict[str, Any]], title: str | None = None) -> str:
    """A GitHub Markdown table of the rows (every cell escaped with `md_cell`) and how the columns are measured."""
    lines = [f"## {md_cell(title)}", ""] if title else []
    lines += ["| " + " | ".join(TABLE_HEAD) + " |", "|" + "|".join("---" for _ in TABLE_HEAD) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(md_cell(c) for c in _cells(r)) + " |")
    lines += [""] + [f"- {note}" for note in MEASUREMENT_NOTES]
    return "\n".join(lines) + "\n"


def _series(rows: list[dict[str, Any]], x_key: str) -> dict[str, dict[str, list[tuple[float, float, str]]]]:
    """task -> method label -> (x, score, budget label) points of the rows that have both, in budget order (visual
    tokens), so a line follows the method's budget sweep whatever the x axis."""
    out: dict[str, dict[str, list[tuple[float, float, float, str]]]] = {}
    for r in rows:
        if r.get(x_key) is None or r.get("score") is None:
            continue
        order = float(r["visual_tokens"]) if r.get("visual_tokens") is not None else float(r[x_key])
        point = (order, float(r[x_key]), float(r["score"]), str(r.get("budget") or ""))
        out.setdefault(r["task"], {}).setdefault(r["method"], []).append(point)
    return {t: {m: [p[1:] for p in sorted(pts)] for m, pts in methods.items()} for t, methods in out.items()}


def plot_comparison(rows: list[dict[str, Any]], x_key: str, x_label: str, title: str) -> bytes | None:
    """PNG bytes of score vs `x_key` (one panel per task, one line per method), or None when nothing to plot.

    User text (method labels, task names, metrics, the title) goes through `vlm_tools.core.io.plain_text`: a `$`
    is drawn as a dollar sign, never parsed as mathtext.
    """
    plain = atomic.plain_text
    series = _series(rows, x_key)
    if not series:
        return None
    plt = atomic.pyplot()
    n = len(series)
    cols = min(n, 3)
    nrows = (n + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 3.9 * nrows), squeeze=False)
    for ax, (task, methods) in zip(axes.flat, series.items()):
        metric = next((r["metric"] for r in rows if r["task"] == task and r.get("metric")), "score")
        for label, pts in methods.items():
            xs, ys, budgets = zip(*pts)
            if label == BASELINE:
                ax.axhline(ys[0], color="0.4", linestyle="--", linewidth=1)
                ax.plot(xs, ys, marker="*", markersize=12, linestyle="none", color="0.2", label=plain(label))
                continue
            (line,) = ax.plot(xs, ys, marker="o", label=plain(label))
            for x, y, budget in pts:
                ax.annotate(plain(budget), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7,
                            color=line.get_color())
        ax.set_title(plain(task))
        ax.set_xlabel(x_label)
        ax.set_ylabel(plain(str(metric)))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    fig.suptitle(plain(title))
    fig.tight_layout()
    return atomic.figure_png(fig)


#: (file name, x column, x axis label) of the comparison plots
PLOTS = (("accuracy_vs_tokens.png", "visual_tokens", "visual tokens per sample (mean)"),
         ("accuracy_vs_latency.png", "prefill_ms", "prefill ms per sample (median)"))


def render_html(rows: list[dict[str, Any]], title: str, plots: Mapping[str, bytes] | None = None,
                settings: Mapping[str, Any] | None = None) -> str:
    """A self-contained HTML page of the comparison: the table (every value escaped), the notes on how latency and
    memory are measured, the plots inlined as data URIs, and the grid's settings."""
    esc = html.escape
    head = "".join(f"<th>{esc(h)}</th>" for h in TABLE_HEAD)
    body = "\n".join("<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in _cells(r)) + "</tr>" for r in rows)
    notes = "".join(f"<li>{esc(n)}</li>" for n in MEASUREMENT_NOTES)
    figures = "".join(f'<figure><img alt="{esc(name)}" src="{atomic.png_data_uri(png)}"><figcaption>{esc(name)}'
                      f"</figcaption></figure>" for name, png in (plots or {}).items())
    config = (f"<h2>Settings</h2><pre>{esc(json.dumps(dict(settings), indent=2, default=str))}</pre>"
              if settings else "")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1400px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #bbb;padding:3px 8px;text-align:right}}td:nth-child(-n+4),th{{text-align:left}}
tr:nth-child(even){{background:#f4f4f4}}img{{max-width:100%}}figure{{margin:1em 0}}</style></head>
<body><h1>{esc(title)}</h1>
<table><thead><tr>{head}</tr></thead><tbody>
{body}
</tbody></table>
<ul>{notes}</ul>
{figures}
{config}
</body></html>
"""


def render_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(TABLE_COLUMNS), lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if r[k] is None else r[k]) for k in TABLE_COLUMNS})
    return buf.getvalue()


def write_table(rows: list[dict[str, Any]], out_dir: Path, meta: Mapping[str, Any]) -> dict[str, Path]:
    """Write `comparison.{md,csv,json,html}` and the plots `accuracy_vs_tokens.png` / `accuracy_vs_latency.png`
    (when some row has a score) into `out_dir`."""
    title = f"{meta.get('model', '')}: score and retention vs method=none"
    paths = {
        "md": atomic.write_text_atomic(out_dir / "comparison.md", render_markdown(rows, title)),
        "csv": atomic.write_text_atomic(out_dir / "comparison.csv", render_csv(rows)),
        "json": atomic.write_json_atomic(out_dir / "comparison.json", {**dict(meta), "rows": rows}, indent=2,
                                         default=str),
    }
    plots = {}
    for name, x_key, x_label in PLOTS:
        png = plot_comparison(rows, x_key, x_label, str(meta.get("model", "")))
        if png is not None:
            plots[name] = png
            paths[name.removesuffix(".png")] = atomic.write_bytes_atomic(out_dir / name, png)
    paths["html"] = atomic.write_text_atomic(out_dir / "comparison.html",
                                             render_html(rows, title, plots, meta.get("settings")))
    return paths


def spec_to_dict(spec: GridSpec) -> dict[str, Any]:
    """The grid's settings as plain data (for the comparison JSON)."""
    d = asdict(spec)
    d["methods"] = [m.label for m in spec.methods]
    return d
