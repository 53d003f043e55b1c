"""Text-dominance metrics MDI and AEI ("When Language Overrules", arXiv 2508.10552) measured during `generate`.

For every decoder layer l, the attention rows of the queries that produce generated tokens (the last prompt
position in the prefill, then each decoding step's input token) are recomputed in fp32 from the attention module's
inputs (a forward pre-hook; the model keeps SDPA, see `vlm_tools.pruning.fastv.rows`), summed over heads and over
those queries, and split by key type:

- text tokens T: the prompt's non-image tokens (system/template tokens and BOS included, padding excluded);
- non-text tokens O: the image placeholder tokens the LLM sees (after any pruning; LLaVA-NeXT newlines included);
- tokens generated earlier belong to neither set; their attention is left out and `A_T + A_O = 1` is restored by
  normalising `A_T, A_O` over T and O.

Then `MDI = (A_T / |T|) / (A_O / |O|)`, `AEI_T = P_T / Q_T` with `P_T = A_T / (A_T + A_O)`, `Q_T = |T| / (|T| + |O|)`
(and `AEI_O` likewise, so `MDI = AEI_T / AEI_O`). A stage (early / middle / late; default the three thirds of the
layers, `boundaries=(a, b)` gives `[0, a)`, `[a, b)`, `[b, L)`) sums `A_T` and `A_O` over its layers before
normalising; its `|T|`, `|O|` are the mean counts over its layers (they differ only inside an LLM-pruning method
such as FastV, whose pruned layers see fewer image tokens).

`dominance(model, processor, image, prompt, method="cls_topk", ratio=0.9)` runs one greedy generation (through
`vlm_tools.wrap` when a method is given) and returns a `DominanceReport` (per layer and per stage, `to_dict()`,
`save()` for JSON, `plot()` for a PNG bar chart; matplotlib is imported only there).
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlm_tools.core.hooks import HookHandle
from vlm_tools.core.io import write_bytes_atomic
from vlm_tools.pruning.fastv.rows import (
    attention_rows,
    check_lm_attention,
    layer_inputs,
    rotated_keys,
    rotated_queries,
    visible_keys,
)

__all__ = ["DominanceStats", "DominanceReport", "DominanceCollector", "dominance", "stage_layers", "compute_stats",
           "plot_comparison", "write_bytes_atomic", "format_prompt", "PAD", "TEXT", "IMAGE", "GENERATED"]

#: Key types.
PAD, TEXT, IMAGE, GENERATED = 0, 1, 2, 3
STAGES = ("early", "middle", "late")
LM_INDEX_KEY = "lm_index"  # published by LLM-shortening methods (see vlm_tools.pruning.fastv.method)


@dataclass
class DominanceStats:
    """MDI / AEI of one layer or one stage.

    Attributes:
        name: "layer 3" or a stage name.
        layers: the decoder layers aggregated.
        text_attention: P_T, the share of the attention to T and O that goes to text tokens.
        image_attention: P_O = 1 - P_T.
        n_text: |T| (mean over the layers).
        n_image: |O| (mean over the layers).
        mdi: (P_T / |T|) / (P_O / |O|); NaN without image tokens or layers, inf if P_O = 0.
        aei_text: P_T / Q_T.
        aei_image: P_O / Q_O.
    """

    name: str
    layers: list[int]
    text_attention: float
    image_attention: float
    n_text: float
    n_image: float
    mdi: float
    aei_text: float
    aei_image: float

    def to_dict(self) -> dict[str, Any]:
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(self).items()}


def _ratio(a: float, b: float) -> float:
    if b == 0:
        return float("nan") if a == 0 else float("inf")
    return a / b


def compute_stats(name: str, layers: list[int], a_text: float, a_image: float, n_text: float,
                  n_image: float) -> DominanceStats:
    """MDI / AEI from attention masses (any scale: they are normalised) and token counts."""
    total = a_text + a_image
    if not layers or total <= 0 or n_text <= 0 or n_image <= 0:
        nan = float("nan")
        return DominanceStats(name, list(layers), nan, nan, n_text, n_image, nan, nan, nan)
    p_t, p_o = a_text / total, a_image / total
    q_t = n_text / (n_text + n_image)
    q_o = 1.0 - q_t
    return DominanceStats(name, list(layers), p_t, p_o, n_text, n_image, _ratio(p_t / n_text, p_o / n_image),
                          p_t / q_t, p_o / q_o)


def stage_layers(n_layers: int, boundaries: tuple[int, int] | None = None) -> dict[str, list[int]]:
    """Layers of the early / middle / late stages: `[0, a)`, `[a, b)`, `[b, L)`; default thirds (rounded).

    Raises:
        ValueError: boundaries outside `0 <= a <= b <= L`.
    """
    if boundaries is None:
        boundaries = (round(n_layers / 3), round(2 * n_layers / 3))
    if len(boundaries) != 2:
        raise ValueError(f"boundaries must be two layer indices (a, b), got {boundaries!r}")
    a, b = (int(x) for x in boundaries)
    if not 0 <= a <= b <= n_layers:
        raise ValueError(f"stage boundaries must satisfy 0 <= a <= b <= {n_layers} (the number of decoder layers), "
                         f"got {boundaries!r}")
    return {"early": list(range(a)), "middle": list(range(a, b)), "late": list(range(b, n_layers))}


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
    """

    layers: list[DominanceStats]
    stages: dict[str, DominanceStats]
    boundaries: tuple[int, int]
    n_generated: int
    generated_text: str = ""
    method: str | None = None
    method_config: dict = field(default_factory=dict)

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
            "generated_text": self.generated_text,
            "stages": {k: v.to_dict() for k, v in self.stages.items()},
            "layers": [v.to_dict() for v in self.layers],
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write `to_dict()` as JSON (atomically: a temp file renamed into place)."""
        return write_bytes_atomic(Path(path), json.dumps(self.to_dict(), indent=2, allow_nan=False,
                                                    default=_json_default).encode())

    def plot(self, path: str | os.PathLike) -> Path:
        """A PNG: per-layer MDI bars (log scale) and per-stage MDI / AEI_T bars."""
        plt = _pyplot()
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
        ax1.set_title(f"MDI per layer: {self.label}")
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
        fig.tight_layout()
        return _save_fig(fig, Path(path))


def _json_default(o: Any) -> Any:
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _finite(v: float) -> float:
    return 0.0 if v is None or not math.isfinite(v) else v


def _pyplot():
    try:
        import matplotlib
    except ImportError as exc:  # optional dependency
        raise ImportError("plotting needs matplotlib: pip install matplotlib (or vlm_tools[dev])") from exc
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save_fig(fig, path: Path) -> Path:
    import io

    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=120)
    finally:
        _pyplot().close(fig)
    return write_bytes_atomic(path, buf.getvalue())


def plot_comparison(reports: dict[str, DominanceReport], path: str | os.PathLike) -> Path:
    """A PNG with grouped per-stage MDI and AEI_T bars, one group member per report (e.g. before / after pruning)."""
    plt = _pyplot()
    labels = list(reports)
    stages = list(next(iter(reports.values())).stages)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    w = 0.8 / max(1, len(labels))
    for ax, attr, title in ((axes[0], "mdi", "MDI"), (axes[1], "aei_text", "AEI (text)")):
        for i, lab in enumerate(labels):
            vals = [_finite(getattr(reports[lab].stages[s], attr)) for s in stages]
            ax.bar([p - 0.4 + w * (i + 0.5) for p in range(len(stages))], vals, w, label=lab)
        ax.axhline(1.0, color="black", lw=0.8, ls="--")
        ax.set_xticks(list(range(len(stages))), stages)
        ax.set_yscale("log")
        ax.set_title(f"{title} per stage")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return _save_fig(fig, Path(path))


# -- collection --------------------------------------------------------------------------------------------------

class _State:
    """Per-generation accumulators (created by `DominanceCollector.attach`, dropped by `remove`)."""

    def __init__(self, n_layers: int, image_token_id: int, slot: Any) -> None:
        self.n_layers = n_layers
        self.image_token_id = image_token_id
        self.slot = slot
        self.types: torch.Tensor | None = None  # (B, full length) key types in original positions
        self.prompt_len: int | None = None
        self.full_pass = True
        self.keys: dict[int, torch.Tensor] = {}
        self.a_text: dict[int, torch.Tensor] = {}
        self.a_image: dict[int, torch.Tensor] = {}
        self.n_text: dict[int, torch.Tensor] = {}
        self.n_image: dict[int, torch.Tensor] = {}
        self.queries = 0


def _vlm_pre_hook(module, args, kwargs, state: _State) -> None:
    ids = kwargs.get("input_ids", args[0] if args else None)
    if ids is None:
        raise RuntimeError("the dominance metrics need input_ids (to tell image from text tokens)")
    am = kwargs.get("attention_mask")
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    state.full_pass = cache is None or cache.get_seq_length() == 0
    if state.full_pass:
        real = am.bool() if isinstance(am, torch.Tensor) and am.dim() == 2 else torch.ones_like(ids, dtype=torch.bool)
        types = torch.where(ids == state.image_token_id, IMAGE, TEXT)
        types = torch.where(real, types, PAD)
        if state.prompt_len is None:
            state.prompt_len = ids.shape[1]
        types[:, state.prompt_len:] = torch.where(real[:, state.prompt_len:], GENERATED, PAD)
        state.types = types
        state.keys.clear()
    else:
        if state.types is None:
            raise RuntimeError("the dominance metrics must see the whole generation (prefill first)")
        new = torch.full(ids.shape, GENERATED, dtype=state.types.dtype, device=state.types.device)
        state.types = torch.cat([state.types, new], dim=1)


def _key_types(state: _State, layer: int, n_keys: int) -> torch.Tensor:
    """`(B, n_keys)` types of this layer's keys (mapped through an LLM-pruning method's kept index if any)."""
    types = state.types
    ctx = getattr(state.slot, "ctx", None) if state.slot is not None else None
    info = ctx.state.get(LM_INDEX_KEY) if ctx is not None else None
    if info is not None and layer >= info["from_layer"]:
        index, valid, length = info["index"], info["valid"], info["length"]
        short = torch.where(valid.to(types.device), types.gather(1, index.to(types.device)), PAD)
        extra = n_keys - short.shape[1]
        out = torch.cat([short, types[:, length:length + extra]], dim=1)
    else:
        out = types[:, :n_keys]
    if out.shape[1] != n_keys:
        raise RuntimeError(f"layer {layer} attends to {n_keys} keys but {out.shape[1]} token types are known; an "
                           "LLM-pruning method must publish its kept index (ctx.state['lm_index'])")
    return out


def _attn_pre_hook(module, args, kwargs, state: _State, layer: int) -> None:
    hidden, pos_emb, mask = layer_inputs(args, kwargs)
    b, q_len, _ = hidden.shape
    new_keys = rotated_keys(module, hidden, pos_emb)
    if state.full_pass or layer not in state.keys:
        keys = new_keys
    else:
        keys = torch.cat([state.keys[layer], new_keys], dim=2)
    state.keys[layer] = keys
    n_keys = keys.shape[2]
    rows = torch.full((b,), q_len - 1, dtype=torch.long, device=hidden.device)
    q = rotated_queries(module, hidden, pos_emb, rows)
    vis = visible_keys(mask, rows, n_keys, q_len)
    probs = attention_rows(q, keys, module.scaling, vis, module.num_key_value_groups).sum(1)  # (B, n_keys)
    types = _key_types(state, layer, n_keys).to(probs.device)
    is_t, is_o = (types == TEXT) & vis, (types == IMAGE) & vis
    state.a_text[layer] = state.a_text.get(layer, 0) + (probs * is_t).sum(1).double().cpu()
    state.a_image[layer] = state.a_image.get(layer, 0) + (probs * is_o).sum(1).double().cpu()
    state.n_text[layer] = is_t.sum(1).cpu()
    state.n_image[layer] = is_o.sum(1).cpu()
    if layer == 0:
        state.queries += 1


class DominanceCollector:
    """Hooks that accumulate, per decoder layer, the attention generated tokens pay to text vs image tokens.

    Use `with DominanceCollector(model) as col: model.generate(...)`, then `col.report()`. Works on a plain HF
    LLaVA / LLaVA-NeXT model or inside a `WrappedModel` call (pass the wrapper's context slot as `slot` when the
    method shortens the sequence inside the LLM, e.g. FastV).

    Args:
        model: the base HF model (not the wrapper).
        slot: the wrapper's per-call context slot, or None.
    """

    def __init__(self, model: nn.Module, slot: Any = None) -> None:
        from vlm_tools.core.adapters import get_adapter

        self.adapter = get_adapter(model)
        for layer in self.adapter.lm_layers:
            check_lm_attention(layer.self_attn)
        self.slot = slot
        self.state: _State | None = None
        self._handle: HookHandle | None = None

    def attach(self) -> DominanceCollector:
        """Register the hooks (fresh accumulators); `remove()` or the context manager exit removes them."""
        if self._handle is not None and not self._handle.removed:
            raise RuntimeError("this DominanceCollector is already attached")
        ad = self.adapter
        self.state = _State(len(ad.lm_layers), ad.image_token_id, self.slot)
        handle = HookHandle("dominance")
        try:
            handle.forward_pre_hook(ad.model.model, functools.partial(_vlm_pre_hook, state=self.state),
                                    with_kwargs=True)
            for i, layer in enumerate(ad.lm_layers):
                handle.forward_pre_hook(layer.self_attn, functools.partial(_attn_pre_hook, state=self.state, layer=i),
                                        with_kwargs=True)
        except BaseException:
            handle.remove()
            raise
        self._handle = handle
        return self

    def remove(self) -> None:
        """Remove the hooks (idempotent); the accumulated statistics stay available to `report()`."""
        if self._handle is not None:
            self._handle.remove()
        if self.state is not None:
            self.state.keys.clear()
            self.state.slot = None

    def __enter__(self) -> DominanceCollector:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def report(self, sample: int = 0, boundaries: tuple[int, int] | None = None, generated_text: str = "",
               method: str | None = None, method_config: dict | None = None) -> DominanceReport:
        """Per-layer and per-stage MDI / AEI of one sample of the collected generation."""
        st = self.state
        if st is None or not st.a_text:
            raise RuntimeError("nothing collected: run generate() while the collector is attached")
        n = st.n_layers
        stages = stage_layers(n, boundaries)
        bounds = (len(stages["early"]), len(stages["early"]) + len(stages["middle"]))
        at = [float(st.a_text[l][sample]) for l in range(n)]
        ao = [float(st.a_image[l][sample]) for l in range(n)]
        nt = [float(st.n_text[l][sample]) for l in range(n)]
        no = [float(st.n_image[l][sample]) for l in range(n)]
        layers = [compute_stats(f"layer {l}", [l], at[l], ao[l], nt[l], no[l]) for l in range(n)]
        per_stage = {}
        for name, ls in stages.items():
            mean_t = sum(nt[l] for l in ls) / len(ls) if ls else 0.0
            mean_o = sum(no[l] for l in ls) / len(ls) if ls else 0.0
            per_stage[name] = compute_stats(name, ls, sum(at[l] for l in ls), sum(ao[l] for l in ls), mean_t, mean_o)
        return DominanceReport(layers=layers, stages=per_stage, boundaries=bounds, n_generated=st.queries,
                               generated_text=generated_text, method=method, method_config=dict(method_config or {}))


def format_prompt(processor: Any, prompt: str) -> str:
    """`prompt` as is when it holds the image placeholder; else one user turn (image, then the text) rendered with the
    processor's chat template, with the generation prompt appended."""
    token = getattr(processor, "image_token", None) or "<image>"
    if token in prompt:
        return prompt
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    raise ValueError(f"the prompt has no image placeholder {token!r} and the processor has no chat template; "
                     f"put {token!r} where the image goes")


def dominance(model: nn.Module, processor: Any, image: Any, prompt: str, method: Any = None, *,
              max_new_tokens: int = 16, boundaries: tuple[int, int] | None = None,
              **method_config: Any) -> DominanceReport:
    """MDI / AEI of one greedy generation, per decoder layer and per stage.

    Args:
        model: an HF LLaVA / LLaVA-NeXT model (or a `WrappedModel`, then `method` must be None).
        processor: its processor.
        image: a PIL image (or what the processor accepts).
        prompt: the prompt with the image placeholder, or plain text to put in the chat template after the image.
        method: a registered pruning method (or a Pruner instance) to run through `vlm_tools.wrap` (e.g.
            "cls_topk"), or None for the base model.
        max_new_tokens: tokens generated greedily (each is one query row per layer).
        boundaries: stage boundaries `(a, b)`: early `[0, a)`, middle `[a, b)`, late `[b, L)`; default thirds.
        **method_config: the method's config (e.g. `ratio=0.9`).

    Returns:
        A `DominanceReport`.
    """
    from vlm_tools.core.wrapped import WrappedModel, wrap

    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    wrapped = None
    if isinstance(model, WrappedModel):
        if method is not None or method_config:
            raise ValueError("model is already wrapped: pass method=None and no method config")
        runner, base, slot = model, model.model, model._slot
        method, method_config = model.method.name, model.method.config.to_dict()
    elif method is not None:
        wrapped = wrap(model, method, **method_config)
        runner, base, slot = wrapped, model, wrapped._slot
        method, method_config = wrapped.method.name, wrapped.method.config.to_dict()
    else:
        if method_config:
            raise ValueError(f"method config {sorted(method_config)} given without a method")
        runner, base, slot = model, model, None
    stage_layers(len(_lm_layers(base)), boundaries)  # validate before running anything
    try:
        text = format_prompt(processor, prompt)
        inputs = processor(images=image, text=text, return_tensors="pt")
        param = next(base.parameters())
        inputs = {k: (v.to(param.device, param.dtype) if k == "pixel_values" else v.to(param.device))
                  for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        with DominanceCollector(base, slot=slot) as col, torch.no_grad():
            out = runner.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        seq = out if isinstance(out, torch.Tensor) else out.sequences
        generated = processor.tokenizer.decode(seq[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        return col.report(0, boundaries, generated_text=generated.strip(), method=method,
                          method_config=method_config)
    finally:
        if wrapped is not None:
            wrapped.unwrap()


def _lm_layers(model: nn.Module) -> nn.ModuleList:
    from vlm_tools.core.adapters import get_adapter

    return get_adapter(model).lm_layers
