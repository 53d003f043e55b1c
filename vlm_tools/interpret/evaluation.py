"""Attribution methods compared on masks: the library behind `vlm-tools explain-eval`.

Two sets, reported separately:

- `shapes_vqa` (`vlm_tools.assets.data.load_shapes_vqa(split, with_arrays=True)`): one coloured shape per 64 x 64
  image; the mask is the shape. For a shape or colour question whose generated answer contains the expected word
  (e.g. "circle", "red") the explained token is that word (its first sub-token's map is scored), otherwise the
  answer's first token;
- `photos_yesno` (`data.photos_yesno(with_arrays=True)`, only the items with a box): the mask is the object's box,
  the explained token the answer's first token. The default model is near chance on these photos, so this set checks
  the maps, not the model.

An empty generated answer (the model stopped at once, e.g. a tiny random model) is replaced by the reference answer,
teacher-forced (recorded per item as `answer_source`).

Every answer is generated once (greedy) and given to every method (`vlm_tools.explain(..., answers=...)`), so all
methods explain the same token ids and a method's time is its own. Per method: pointing game and Obj-IoU
(`vlm_tools.interpret.metrics`, on the mask's pixels), deletion AUC (lower is better) and insertion AUC (higher is
better) through the model, and the mean time of `explain` per explained answer (batched calls, time divided by the
batch). Methods are given as `name` or `name[key=value;key=value]` (e.g. `msea[weighting=relevance]`; a tuple
field takes `;`-separated items: `msea[scales=1;2]`), so variants of one method fit in one run.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "COLUMNS",
    "SETS",
    "EvalItem",
    "EvalResult",
    "MethodRow",
    "MethodSpec",
    "SetResult",
    "comparison_csv",
    "comparison_markdown",
    "comparison_rows",
    "eval_items",
    "parse_method_specs",
    "run_explain_eval",
    "split_variants",
    "write_comparison",
]

#: The evaluation sets, in report order.
SETS = ("shapes_vqa", "photos_yesno")
#: The per-method columns of the comparison (name, header, better).
COLUMNS = (("pointing_game", "pointing game", "higher"), ("obj_iou", "Obj-IoU", "higher"),
           ("deletion_auc", "deletion AUC", "lower"), ("insertion_auc", "insertion AUC", "higher"),
           ("ms_per_answer", "ms / answer", "lower"))
PHOTOS_CAPTION = ("The default model is near chance on these photos: this table is a sanity check of the maps "
                  "(do they point at the object asked about?), not of the model's answers.")


@dataclass(frozen=True)
class MethodSpec:
    """One method variant of a run.

    Attributes:
        label: the variant as written (`msea[weighting=relevance]`), the row name of the tables.
        name: the registered attribution method.
        config: the config fields set by the variant (cast to their types).
    """

    label: str
    name: str
    config: dict = field(default_factory=dict)


@dataclass
class MethodRow:
    """One method's means over a set's answers (NaN where no answer was scored)."""

    method: str
    n: int
    pointing_game: float
    obj_iou: float
    deletion_auc: float
    insertion_auc: float
    ms_per_answer: float


@dataclass
class SetResult:
    """One set's comparison.

    Attributes:
        n: answers scored; `explained_word`: how many of them explain the shape / colour word (else the first token);
            `n_faithfulness`: how many (the first ones) have deletion / insertion AUCs.
        rows: one `MethodRow` per method variant, in the run's order.
        items: per answer a JSON-able record (question, expected and generated answer, explained token, and per
            method label its metrics).
    """

    n: int
    explained_word: int
    rows: list[MethodRow]
    items: list[dict]
    n_faithfulness: int = 0


@dataclass
class EvalResult:
    """What `run_explain_eval` measured; `to_json()` is `comparison.json`.

    Attributes:
        methods: the method variants; `steps` deletion / insertion steps; `batch_size` samples per explain call.
        sets: per set name its `SetResult`, in report order.
        info: run facts the caller adds (model, split, limit, dtype), written into the JSON.
    """

    methods: list[MethodSpec]
    steps: int
    batch_size: int
    sets: dict[str, SetResult]
    info: dict = field(default_factory=dict)
    faithfulness_limit: int | None = None

    def to_json(self) -> dict:
        return {**self.info, "steps": self.steps, "batch_size": self.batch_size,
                "faithfulness_limit": self.faithfulness_limit,
                "methods": [{"label": m.label, "name": m.name, "config": m.config} for m in self.methods],
                "sets": {k: {"n": v.n, "explained_word": v.explained_word, "n_faithfulness": v.n_faithfulness,
                             "rows": [dataclasses.asdict(r) for r in v.rows], "items": v.items}
                         for k, v in self.sets.items()}}


@dataclass
class EvalItem:
    """One question of an evaluation set.

    Attributes:
        set: "shapes_vqa" or "photos_yesno"; `id` its id in the set.
        image: the image (PIL, RGB); `mask` `(H, W)` bool over it.
        question, expected: the question and the reference answer.
        word: the word to explain when the generated answer contains it (shape / colour questions), else None.
    """

    set: str
    id: Any
    image: Any
    mask: np.ndarray
    question: str
    expected: str
    word: str | None


def split_variants(text: str, sep: str = ",") -> list[str]:
    """`text` split at `sep` outside square brackets (`"a,b[x=1,2]"` -> `["a", "b[x=1,2]"]`), items stripped."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def parse_method_specs(text: str | Sequence[str]) -> list[MethodSpec]:
    """Method variants from `"msea,msea[weighting=relevance],tam"` (or a list of such strings).

    Inside the brackets, `key=value` pairs are separated by `;`; an item without `=` continues the previous value
    (a tuple field: `msea[scales=1;1.5;2;weighting=relevance]`). Values are cast to the config field's type.

    Raises:
        KeyError: an unknown method (lists the registered attribution methods).
        ValueError: a malformed variant, a repeated label, or a config error (names the variant).
    """
    from vlm_tools._registry import get_explainer
    from vlm_tools.core.config import ConfigError

    items = [text] if isinstance(text, str) else list(text)
    specs: list[MethodSpec] = []
    for chunk in items:
        for raw in split_variants(chunk):
            name, bracket, rest = raw.partition("[")
            name = name.strip()
            if not name or (bracket and not rest.endswith("]")) or "]" in name:
                raise ValueError(f"method variant {raw!r}: expected name or name[key=value;key=value]")
            values: dict[str, str] = {}
            last = None
            for part in (p.strip() for p in rest[:-1].split(";")) if bracket else ():
                if not part:
                    continue
                key, eq, value = part.partition("=")
                if eq:
                    last = key.strip()
                    if not last:
                        raise ValueError(f"method variant {raw!r}: empty key in {part!r}")
                    values[last] = value.strip()
                elif last is None:
                    raise ValueError(f"method variant {raw!r}: {part!r} is not key=value")
                else:
                    values[last] += ";" + part
            info = get_explainer(name)
            try:
                cfg = info.config_cls.from_dict(values, cast=True, method=name)
            except (ConfigError, TypeError, ValueError) as exc:
                raise ValueError(f"method variant {raw!r}: {exc}") from None
            label = raw.replace(" ", "")
            if any(s.label == label for s in specs):
                raise ValueError(f"method variant {label!r} is given twice")
            specs.append(MethodSpec(label=label, name=name, config={k: getattr(cfg, k) for k in values}))
    if not specs:
        raise ValueError("no method given")
    return specs


def eval_items(split: str = "quick", limit: int | None = None, photos: bool = True,
               photos_limit: int | None = None, kinds: Sequence[str] | None = None) -> dict[str, list[EvalItem]]:
    """The questions of both sets: the first `limit` of the `shapes_vqa` split (only questions of the given `kinds`,
    among "shape", "color", "yesno", when given) and the first `photos_limit` (default `limit`) `photos_yesno` items
    that have a box."""
    from PIL import Image

    from vlm_tools.assets import data

    for name, n in (("limit", limit), ("photos_limit", photos_limit)):
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError(f"{name} must be a positive int or None, got {n!r}")
    if kinds is not None:
        bad = sorted(set(kinds) - {"shape", "color", "yesno"})
        if bad or not kinds:
            raise ValueError(f"kinds must be among shape, color, yesno; got {list(kinds)!r}")
    out: dict[str, list[EvalItem]] = {}
    shapes = [r for r in data.load_shapes_vqa(split, with_arrays=True) if kinds is None or r["kind"] in kinds][:limit]
    out["shapes_vqa"] = [
        EvalItem(set="shapes_vqa", id=row["id"], image=Image.open(row["image"]).convert("RGB"),
                 mask=np.asarray(row["mask"], dtype=bool), question=row["question"], expected=row["answer"],
                 word=row["answer"] if row["kind"] in ("shape", "color") else None)
        for row in shapes]
    if photos:
        rows = [r for r in data.photos_yesno(with_arrays=True) if r["mask"] is not None]
        n = photos_limit if photos_limit is not None else limit
        out["photos_yesno"] = [
            EvalItem(set="photos_yesno", id=row["id"], image=Image.open(row["image"]).convert("RGB"),
                     mask=np.asarray(row["mask"], dtype=bool), question=row["question"], expected=row["answer"],
                     word=None)
            for row in rows[:n]]
    return out


def _prompt(processor: Any, question: str) -> str:
    """The question in the processor's chat template, or after the image placeholder when it has none."""
    from vlm_tools.loading import format_prompt

    if getattr(processor, "chat_template", None):
        return format_prompt(processor, question)
    return f"{getattr(processor, 'image_token', None) or '<image>'} {question}"


def _mean(values: list[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return float(np.mean(vals)) if vals else float("nan")


def run_explain_eval(model: Any, processor: Any, items: dict[str, list[EvalItem]], methods: Sequence[MethodSpec], *,
                     steps: int = 16, batch_size: int = 4, max_new_tokens: int = 8, progress: bool = True,
                     faithfulness_limit: int | None = None,
                     on_note: Callable[[str], None] | None = None) -> EvalResult:
    """Explain every item with every method and score the maps (see the module docstring).

    Args:
        model, processor: the model to explain (an HF LLaVA / LLaVA-NeXT model or a `WrappedModel`).
        items: per set, its items (`eval_items`).
        methods: the method variants (`parse_method_specs`).
        steps: deletion / insertion chunks (`vlm_tools.interpret.metrics.faithfulness_curves`).
        batch_size: samples per `explain` call.
        max_new_tokens: generation limit of the answers.
        progress: show a tqdm bar per set.
        faithfulness_limit: deletion / insertion AUC on the first this many answers of each set only (they cost
            `steps`-proportional passes through the model per answer and method); None: every answer.
        on_note: called with a line for each item whose generated answer is empty (its reference answer is
            explained instead, teacher-forced).

    Returns:
        An `EvalResult`: per set one row per method (means over the answers) and the per-answer records.
    """
    import torch
    from tqdm.auto import tqdm

    from vlm_tools.interpret import metrics
    from vlm_tools.interpret.api import explain
    from vlm_tools.interpret.forcing import generate_answers

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if faithfulness_limit is not None and (isinstance(faithfulness_limit, bool)
                                           or not isinstance(faithfulness_limit, int) or faithfulness_limit < 0):
        raise ValueError(f"faithfulness_limit must be a non-negative int or None, got {faithfulness_limit!r}")
    note = on_note or (lambda _line: None)
    tok = processor.tokenizer
    result = EvalResult(methods=list(methods), steps=steps, batch_size=batch_size, sets={},
                        faithfulness_limit=faithfulness_limit)
    for set_name, set_items in items.items():
        prompts = [_prompt(processor, it.question) for it in set_items]
        answers = []
        for i in range(0, len(set_items), batch_size):
            answers += generate_answers(model, processor, [it.image for it in set_items[i:i + batch_size]],
                                        prompts[i:i + batch_size], max_new_tokens=max_new_tokens)
        records = []
        for it, prompt, ids in zip(set_items, prompts, answers):
            source = "generated"
            if ids.numel() == 0:  # the model stopped at once: explain the reference answer (teacher-forced)
                ids = torch.tensor(tok(" " + it.expected, add_special_tokens=False)["input_ids"], dtype=torch.long)
                source = "reference"
                note(f"{set_name} {it.id}: empty generated answer; explaining the reference answer {it.expected!r}")
            text = tok.decode(ids.tolist(), skip_special_tokens=True)
            word = it.word if it.word and it.word.lower() in re.findall(r"[a-z]+", text.lower()) else None
            records.append({"id": it.id, "question": it.question, "expected": it.expected, "answer": text,
                            "answer_ids": ids.tolist(), "answer_source": source,
                            "explained": word if word is not None else "first token", "_item": it,
                            "_prompt": prompt, "_ids": ids, "_token": word if word is not None else 0,
                            "methods": {}})
        bar = tqdm(total=len(methods) * len(records), desc=set_name, unit="answer", disable=not progress)
        try:
            for spec in methods:
                for i in range(0, len(records), batch_size):
                    chunk = records[i:i + batch_size]
                    start = time.perf_counter()
                    expls = explain(model, processor, [r["_item"].image for r in chunk], [r["_prompt"] for r in chunk],
                                    spec.name, answers=[r["_ids"] for r in chunk], tokens=[[r["_token"]] for r in chunk],
                                    **spec.config)
                    per_answer = (time.perf_counter() - start) * 1000.0 / len(chunk)
                    for j, (r, expl) in enumerate(zip(chunk, expls)):
                        dele = ins = float("nan")
                        if faithfulness_limit is None or i + j < faithfulness_limit:
                            curves = metrics.faithfulness_curves(expl, model, processor, steps=steps, tokens=[0])
                            dele, ins = float(curves.deletion_auc[0]), float(curves.insertion_auc[0])
                        r["methods"][spec.label] = {
                            "pointing_game": float(metrics.pointing_game(expl, r["_item"].mask, token=0)),
                            "obj_iou": metrics.obj_iou(expl, r["_item"].mask, token=0),
                            "deletion_auc": dele, "insertion_auc": ins,
                            "ms_per_answer": per_answer,
                            "token": expl.tokens[0]}
                        bar.update(1)
        finally:
            bar.close()
        rows = [MethodRow(method=spec.label, n=len(records),
                          **{key: _mean([r["methods"][spec.label][key] for r in records]) for key, _, _ in COLUMNS})
                for spec in methods]
        result.sets[set_name] = SetResult(
            n=len(records), explained_word=sum(r["explained"] != "first token" for r in records), rows=rows,
            n_faithfulness=len(records) if faithfulness_limit is None else min(len(records), faithfulness_limit),
            items=[{k: v for k, v in r.items() if not k.startswith("_")} for r in records])
    return result


def comparison_rows(result: EvalResult) -> list[dict]:
    """One flat row per (set, method): the CSV's rows."""
    return [{"set": set_name, **dataclasses.asdict(row)} for set_name, block in result.sets.items()
            for row in block.rows]


def _fmt(v: float, key: str) -> str:
    if isinstance(v, float) and math.isnan(v):
        return "n/a"
    return f"{v:.0f}" if key == "ms_per_answer" else f"{v:.3f}"


def comparison_markdown(result: EvalResult, title: str | None = None) -> str:
    """The comparison as Markdown: one table per set (the photos table with its sanity-check caption)."""
    arrows = {"higher": "↑", "lower": "↓"}
    lines = [f"### {title}", ""] if title else []
    lines.append(f"Deletion / insertion: {result.steps} steps, the explained token's probability vs the fraction of "
                 f"cells removed / inserted in map order (AUC over x in [0, 1]); `explain` batch size "
                 f"{result.batch_size}; ms / answer: `explain` time per explained answer.")
    for set_name, block in result.sets.items():
        faith = "" if block.n_faithfulness == block.n else f", deletion / insertion on the first {block.n_faithfulness}"
        lines += ["", f"**{set_name}** ({block.n} answers{faith}"]
        if set_name == "shapes_vqa":
            lines[-1] += (f"; mask: the shape; explained token: the shape / colour word in {block.explained_word}, "
                          "else the answer's first token).")
        else:
            lines[-1] += "; mask: the object's box; explained token: the answer's first token). " + PHOTOS_CAPTION
        lines += ["", "| method | " + " | ".join(f"{h} {arrows[b]}" for _, h, b in COLUMNS) + " |",
                  "|---|" + "---:|" * len(COLUMNS)]
        for row in block.rows:
            lines.append(f"| {row.method} | " + " | ".join(_fmt(getattr(row, k), k) for k, _, _ in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def comparison_csv(result: EvalResult) -> str:
    """The comparison as CSV (columns: set, method, n, then the metrics)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["set", "method", "n", *(k for k, _, _ in COLUMNS)], lineterminator="\n")
    writer.writeheader()
    for row in comparison_rows(result):
        writer.writerow(row)
    return buf.getvalue()


def write_comparison(result: EvalResult, out: str | Path, title: str | None = None) -> list[Path]:
    """Write `comparison.md`, `comparison.csv` and `comparison.json` into `out` (atomic writes)."""
    from vlm_tools.core.io import write_json_atomic, write_text_atomic

    out = Path(out)
    return [write_text_atomic(out / "comparison.md", comparison_markdown(result, title)),
            write_text_atomic(out / "comparison.csv", comparison_csv(result)),
            write_json_atomic(out / "comparison.json", result.to_json(), indent=2, default=_json_default)]


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")
