"""`DominanceReport`: MDI / AEI of one generation per layer and stage, as JSON and PNG charts."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlm_tools.analysis.metrics import DominanceStats
from vlm_tools.core.io import plain_text, pyplot, write_bytes_atomic, write_figure

__all__ = ["DominanceReport", "plot_comparison", "report_json"]


@dataclass
class DominanceReport:
    """MDI / AEI per decoder layer and per stage for one generation.

    Attributes:
        layers: one `DominanceStats` per decoder layer.
        stages: early / middle / late `DominanceStats`.
        boundaries: the stage boundaries `(a, b)` used.
        n_generated: number of query rows aggregated (generated tokens).
        generated_text: the decoded generation.
        method: the pruning method used (None for the base model), and its config.
        prompt: the prompt the generation answered (shown on the charts).
    """

    layers: list[DominanceStats]
    stages: dict[str, DominanceStats]
    boundaries: tuple[int, int]
    n_generated: int
    generated_text: str = ""
    method: str | None = None
    method_config: dict = field(default_factory=dict)
    prompt: str = ""

    @property
    def label(self) -> str:
        if self.method is None:
            return "base"
        cfg = ", ".join(f"{k}={v}" for k, v in self.method_config.items())
        return f"{self.method}({cfg})" if cfg else self.method

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "method_config": dict(self.method_config),
            "boundaries": list(self.boundaries),
            "n_generated": self.n_generated,
            "prompt": self.prompt,
            "generated_text": self.generated_text,
            "stages": {k: v.to_dict() for k, v in self.stages.items()},
            "layers": [v.to_dict() for v in self.layers],
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write `to_dict()` as JSON (atomically: a temp file renamed into place)."""
        return write_bytes_atomic(Path(path), report_json(self.to_dict()))

    def plot(self, path: str | os.PathLike) -> Path:
        """A PNG: per-layer MDI bars (log scale) and per-stage MDI / AEI_T bars, with the prompt and the answer."""
        return write_figure(self.figure(), Path(path))

    def figure(self):
        """The matplotlib figure `plot` writes (the caller closes it, e.g. through `vlm_tools.core.io.figure_png`)."""
        plt = pyplot()
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [2, 1]})
        xs = [s.layers[0] for s in self.layers]
        ys = [_finite(s.mdi) for s in self.layers]
        stage_of = {l: n for n, st in self.stages.items() for l in st.layers}
        colours = {"early": "#4c72b0", "middle": "#dd8452", "late": "#55a868"}
        ax1.bar(xs, ys, color=[colours.get(stage_of.get(x), "grey") for x in xs])
        ax1.axhline(1.0, color="black", lw=0.8, ls="--")
        ax1.set_yscale("log")
        ax1.set_xlabel("decoder layer")
        ax1.set_ylabel("MDI (text / image attention per token)")
        ax1.set_title(plain_text(f"MDI per layer: {self.label}"))
        names = list(self.stages)
        w = 0.38
        pos = range(len(names))
        ax2.bar([p - w / 2 for p in pos], [_finite(self.stages[n].mdi) for n in names], w, label="MDI")
        ax2.bar([p + w / 2 for p in pos], [_finite(self.stages[n].aei_text) for n in names], w, label="AEI (text)")
        ax2.axhline(1.0, color="black", lw=0.8, ls="--")
        ax2.set_xticks(list(pos), names)
        ax2.set_yscale("log")
        ax2.set_title("per stage")
        ax2.legend(fontsize=8)
        _caption(fig, self.prompt, self.generated_text)
        return fig


def report_json(payload: Any) -> bytes:
    """Standard JSON bytes of a report payload (tuples as lists; NaN / infinity are not allowed: `to_dict` maps
    them to null)."""
    return json.dumps(payload, indent=2, allow_nan=False, default=_json_default).encode()


def _caption(fig, prompt: str, answer: str) -> None:
    """Prompt and answer under the charts (user text: no mathtext, long lines wrapped)."""
    import textwrap

    text = "\n".join(textwrap.wrap(f"prompt: {' '.join(prompt.split())}", 150)[:3]
                     + textwrap.wrap(f"answer: {' '.join(answer.split())}", 150)[:2])
    fig.tight_layout(rect=(0, 0.06 + 0.035 * text.count("\n"), 1, 1))
    fig.text(0.01, 0.01, plain_text(text), fontsize=8, va="bottom", ha="left", family="monospace")


def _json_default(o: Any) -> Any:
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _finite(v: float) -> float:
    return 0.0 if v is None or not math.isfinite(v) else v


def plot_comparison(reports: dict[str, DominanceReport], path: str | os.PathLike) -> Path:
    """A PNG with grouped per-stage MDI and AEI_T bars, one group member per report (e.g. before / after pruning)."""
    return write_figure(comparison_figure(reports), Path(path))


def comparison_figure(reports: dict[str, DominanceReport]):
    """The matplotlib figure `plot_comparison` writes."""
    plt = pyplot()
    labels = list(reports)
    stages = list(next(iter(reports.values())).stages)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    w = 0.8 / max(1, len(labels))
    for ax, attr, title in ((axes[0], "mdi", "MDI"), (axes[1], "aei_text", "AEI (text)")):
        for i, lab in enumerate(labels):
            vals = [_finite(getattr(reports[lab].stages[s], attr)) for s in stages]
            ax.bar([p - 0.4 + w * (i + 0.5) for p in range(len(stages))], vals, w, label=plain_text(lab))
        ax.axhline(1.0, color="black", lw=0.8, ls="--")
        ax.set_xticks(list(range(len(stages))), stages)
        ax.set_yscale("log")
        ax.set_title(f"{title} per stage")
    axes[0].legend(fontsize=7)
    first = next(iter(reports.values()))
    fig.suptitle(plain_text("text dominance per stage: " + ", ".join(labels)), fontsize=9)
    _caption(fig, first.prompt, " | ".join(f"{k}: {r.generated_text}" for k, r in reports.items()))
    return fig
