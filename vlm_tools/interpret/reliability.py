"""Per-token visual reliability ("Grounding or Guessing?", Hamidullah et al., arXiv 2510.18439), for image VLMs.

`reliability(model, processor, image, prompt)` says, per generated answer token, whether the model read it off the
image or guessed it. The answer is generated once (or given), then teacher-forced under three conditions: exactly
three forward passes per call, each batched over the samples (`vlm_tools.interpret.forcing.teacher_force`):

1. clean: the image as given;
2. image masked: `masked="attention"` (default) zeroes the attention mask over the image positions and keeps the
   position ids (the image is there but no text token can see it); `masked="mean_color"` replaces the image by one
   filled with its per-channel mean colour (the documented alternative: the same pass with no visual content);
3. mismatched image: `mismatched=` (one image per sample, same size and mode as the clean one), or drawn
   deterministically from `reference=` (a set of images; those with the clean image's size and mode are candidates,
   one is chosen by a hash of the clean image's pixels), or by default a uniform-noise image of the same size and
   mode seeded by that hash (an unrelated image).

Per answer token `y_t` (all from the position that predicts it, `answer_position - 1`):

* `s_hid = arccos(cos(h_clean, h_masked)) / pi` at hidden-state `layer` (default -1: the final-norm output);
* `attn_diff`: attention mass of that query row on the image positions (fp32 rows, mean over layers and heads),
  clean minus mismatched; `s_attn` is it quantile-scaled to [0, 1] on the combiner's fixed reference quantiles;
* `p_cf = max(p_masked, p_mismatched)`, `s_log = log p_clean - log p_cf`, `s_logit` the same margin on logits
  (`logit_clean - max(logit_masked, logit_mismatched)`), `s_prob = sigmoid(s_log)`, `d_clean = p_clean - p_masked`,
  `d_mis = p_clean - p_mismatched`;
* `confidence = p_clean` and `entropy` of the clean next-token distribution; at sentence level also the
  perplexity `exp(-mean log p_clean)`.

A `Combiner` turns the features into `r_t` in [0, 1]: the unsupervised default standardises the seven grounding
features with fixed reference means / stds, averages the z-scores and squashes them with a sigmoid; a fitted
combiner (`Combiner.fit`, scikit-learn logistic regression on sentence labels through tail pooling; `meta=True` adds
confidence, entropy and log-perplexity) gives `r_t = sigmoid(w . z_t + b)`. The sentence score is the mean of the
lowest `ceil(0.1 T)` values of `r_t`. A combiner is a few numbers, saved and loaded as JSON; every statistic is
fixed, so a batch scores exactly like single calls. The default's constants are generic; `Combiner.from_reference`
computes the statistics of a given model on a reference set (no labels).
"""

from __future__ import annotations

import hashlib
import html
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vlm_tools.core.adapters import get_adapter
from vlm_tools.core.attention import check_lm_attention
from vlm_tools.core.wrapped import WrappedModel
from vlm_tools.interpret.forcing import ForcedPass, generate_answers, load_images, teacher_force

__all__ = ["reliability", "Reliability", "Combiner", "GROUNDING_FEATURES", "META_FEATURES", "MASKED_MODES",
           "tail_mean"]

#: The seven grounding features (larger = more grounded), in the order the combiners use.
GROUNDING_FEATURES = ("s_hid", "s_attn", "s_log", "s_logit", "s_prob", "d_clean", "d_mis")
#: What the META combiner adds (per token; the log-perplexity is the sentence's, repeated on every token).
META_FEATURES = ("confidence", "entropy", "log_perplexity")
#: Ways to build the image-masked pass.
MASKED_MODES = ("attention", "mean_color")
#: Features whose large values mean *less* reliable (tail pooling takes their highest values).
_NEGATIVE = ("entropy", "log_perplexity")
_COMBINER_KINDS = ("unsupervised", "fitted", "meta")

# Generic reference statistics of the unsupervised default (use `Combiner.from_reference` for a given model).
_DEFAULT_MEAN = {"s_hid": 0.15, "s_attn": 0.5, "s_log": 0.0, "s_logit": 0.0, "s_prob": 0.5, "d_clean": 0.0,
                 "d_mis": 0.0, "confidence": 0.5, "entropy": 1.5, "log_perplexity": 1.0}
_DEFAULT_STD = {"s_hid": 0.1, "s_attn": 0.289, "s_log": 1.5, "s_logit": 1.5, "s_prob": 0.2, "d_clean": 0.2,
                "d_mis": 0.2, "confidence": 0.3, "entropy": 1.5, "log_perplexity": 1.0}
_DEFAULT_ATTN_QUANTILES = tuple(float(x) for x in np.linspace(-0.1, 0.1, 11))


def tail_mean(values: Sequence[float] | np.ndarray | torch.Tensor, q: float = 0.1) -> float:
    """Mean of the lowest `ceil(q * T)` values (R_tail-q; at least one value)."""
    v = np.sort(np.asarray(values, dtype=np.float64).ravel())
    if v.size == 0:
        raise ValueError("tail_mean of an empty sequence")
    k = max(1, math.ceil(q * v.size))
    return float(v[:k].mean())


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


# -- combiners ---------------------------------------------------------------------------------------------------

@dataclass
class Combiner:
    """Turns per-token features into `r_t` in [0, 1] (JSON-serialisable; every statistic fixed).

    Attributes:
        kind: "unsupervised" (mean z-score, sigmoid), "fitted" or "meta" (logistic regression weights).
        features: the feature names it reads (`GROUNDING_FEATURES`, plus `META_FEATURES` for "meta").
        mean: reference mean per feature (standardisation).
        std: reference std per feature.
        attn_quantiles: raw `attn_diff` values at evenly spaced probabilities 0..1 of the reference set; `s_attn`
            is the piecewise-linear CDF through them (quantile scaling to [0, 1]).
        weights: per feature, the logistic-regression weight on the z-score (fitted kinds only).
        bias: the logistic-regression intercept.
        tail: q of the sentence score (mean of the lowest `ceil(q T)` values of `r_t`).
    """

    kind: str = "unsupervised"
    features: tuple[str, ...] = GROUNDING_FEATURES
    mean: dict[str, float] = field(default_factory=lambda: dict(_DEFAULT_MEAN))
    std: dict[str, float] = field(default_factory=lambda: dict(_DEFAULT_STD))
    attn_quantiles: tuple[float, ...] = _DEFAULT_ATTN_QUANTILES
    weights: dict[str, float] | None = None
    bias: float = 0.0
    tail: float = 0.1

    def __post_init__(self) -> None:
        if self.kind not in _COMBINER_KINDS:
            raise ValueError(f"Combiner kind must be one of {_COMBINER_KINDS}, got {self.kind!r}")
        self.features = tuple(self.features)
        known = GROUNDING_FEATURES + META_FEATURES
        bad = [f for f in self.features if f not in known]
        if bad:
            raise ValueError(f"unknown combiner feature(s) {bad}; known: {known}")
        missing = [f for f in self.features if f not in self.mean or f not in self.std]
        if missing:
            raise ValueError(f"combiner has no reference mean/std for {missing}")
        if any(float(self.std[f]) <= 0 for f in self.features):
            raise ValueError(f"combiner stds must be positive, got {self.std}")
        q = tuple(float(x) for x in self.attn_quantiles)
        if len(q) < 2 or any(b < a for a, b in zip(q, q[1:])):
            raise ValueError(f"attn_quantiles must be >= 2 non-decreasing values, got {self.attn_quantiles}")
        self.attn_quantiles = q
        if self.kind != "unsupervised" and (self.weights is None or set(self.weights) != set(self.features)):
            raise ValueError(f"a {self.kind!r} combiner needs one weight per feature {self.features}")
        if not 0 < float(self.tail) <= 1:
            raise ValueError(f"tail must be in (0, 1], got {self.tail}")

    # -- scoring ---------------------------------------------------------------------------------------------
    def scale_attention(self, attn_diff: np.ndarray) -> np.ndarray:
        """Quantile-scale raw `attn_diff` values to [0, 1] (the reference CDF, piecewise linear)."""
        q = np.asarray(self.attn_quantiles, dtype=np.float64)
        probs = np.linspace(0.0, 1.0, q.size)
        x = np.asarray(attn_diff, dtype=np.float64)
        if np.all(q == q[0]):
            return np.where(x > q[0], 1.0, np.where(x < q[0], 0.0, 0.5))
        # ties in the reference quantiles: np.interp needs increasing xp, so average the probabilities of equal values
        uq, inv = np.unique(q, return_inverse=True)
        up = np.bincount(inv, weights=probs) / np.bincount(inv)
        return np.interp(x, uq, up, left=0.0, right=1.0)

    def z(self, features: dict[str, np.ndarray]) -> np.ndarray:
        """`(T, F)` standardised features (columns in `self.features` order)."""
        cols = [(np.asarray(features[f], dtype=np.float64) - float(self.mean[f])) / float(self.std[f])
                for f in self.features]
        return np.stack(cols, axis=1)

    def token_scores(self, features: dict[str, np.ndarray]) -> np.ndarray:
        """`r_t` in [0, 1] per token."""
        z = self.z(features)
        if self.kind == "unsupervised":
            return _sigmoid(z.mean(axis=1))
        w = np.asarray([float(self.weights[f]) for f in self.features])
        return _sigmoid(z @ w + float(self.bias))

    def sentence_score(self, r: np.ndarray) -> float:
        """Mean of the lowest `ceil(tail * T)` token scores."""
        return tail_mean(r, self.tail)

    # -- construction ------------------------------------------------------------------------------------------
    @classmethod
    def from_reference(cls, results: Sequence[Reliability], n_quantiles: int = 101) -> Combiner:
        """The unsupervised combiner with statistics of a reference set (no labels): the `attn_diff` quantiles, then
        each feature's mean and std over all answer tokens."""
        if not results:
            raise ValueError("from_reference needs at least one Reliability result")
        raw = np.concatenate([np.asarray(r.features["attn_diff"], dtype=np.float64) for r in results])
        quantiles = tuple(float(x) for x in np.quantile(raw, np.linspace(0, 1, n_quantiles)))
        base = cls(attn_quantiles=quantiles)
        feats = [r.rescored(base).features for r in results]
        mean, std = dict(_DEFAULT_MEAN), dict(_DEFAULT_STD)
        for f in GROUNDING_FEATURES + META_FEATURES:
            v = np.concatenate([np.asarray(x[f], dtype=np.float64) for x in feats])
            mean[f] = float(v.mean())
            std[f] = float(max(v.std(), 1e-6))
        return cls(mean=mean, std=std, attn_quantiles=quantiles)

    @classmethod
    def fit(cls, results: Sequence[Reliability], labels: Sequence[int], *, meta: bool = False,
            reference: Combiner | None = None, C: float = 1.0) -> Combiner:
        """A logistic-regression combiner fitted on sentence labels (1 = grounded / correct, 0 = wrong / guessed).

        Each sample's standardised features are tail-pooled (per feature, the mean of its `ceil(0.1 T)` least
        reliable values: lowest, or highest for entropy and log-perplexity), the regression is fitted on the pooled
        vectors and its weights are applied per token: `r_t = sigmoid(w . z_t + b)`.

        Args:
            results: reliability results of the training split.
            labels: one 0/1 label per result (both classes present).
            meta: also use confidence, entropy and log-perplexity (the META variant).
            reference: the standardisation statistics (default: `Combiner.from_reference(results)`).
            C: inverse regularisation strength of the regression.
        """
        from sklearn.linear_model import LogisticRegression

        y = np.asarray(labels).astype(int).ravel()
        if len(results) != y.size:
            raise ValueError(f"got {len(results)} results and {y.size} labels")
        if set(np.unique(y).tolist()) != {0, 1}:
            raise ValueError(f"labels must be 0/1 with both classes present, got {sorted(set(y.tolist()))}")
        ref = reference if reference is not None else cls.from_reference(results)
        feats = GROUNDING_FEATURES + (META_FEATURES if meta else ())
        proto = cls(features=feats, mean=dict(ref.mean), std=dict(ref.std), attn_quantiles=ref.attn_quantiles,
                    tail=ref.tail)
        pooled = np.stack([_tail_pool(proto.z(r.rescored(proto).features), feats, proto.tail) for r in results])
        reg = LogisticRegression(C=C, max_iter=2000).fit(pooled, y)
        weights = {f: float(w) for f, w in zip(feats, reg.coef_[0])}
        return replace(proto, kind="meta" if meta else "fitted", weights=weights, bias=float(reg.intercept_[0]))

    # -- JSON ----------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "features": list(self.features),
                "mean": {f: float(self.mean[f]) for f in self.mean}, "std": {f: float(self.std[f]) for f in self.std},
                "attn_quantiles": list(self.attn_quantiles),
                "weights": None if self.weights is None else {f: float(w) for f, w in self.weights.items()},
                "bias": float(self.bias), "tail": float(self.tail)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Combiner:
        known = {"kind", "features", "mean", "std", "attn_quantiles", "weights", "bias", "tail"}
        extra = sorted(set(d) - known)
        if extra:
            raise ValueError(f"unknown Combiner field(s) {extra}; known: {sorted(known)}")
        d = dict(d)
        for key in ("features", "attn_quantiles"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)

    def save(self, path: str | Path) -> Path:
        """Write the combiner as JSON (atomically)."""
        from vlm_tools.core.io import write_json_atomic

        return write_json_atomic(path, self.to_dict(), indent=1)

    @classmethod
    def load(cls, path: str | Path) -> Combiner:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read a Combiner from {path}: {exc}") from None
        return cls.from_dict(data)


def _tail_pool(z: np.ndarray, feats: Sequence[str], q: float) -> np.ndarray:
    """Per feature, the mean of its `ceil(q T)` least reliable standardised values."""
    k = max(1, math.ceil(q * z.shape[0]))
    sign = np.asarray([-1.0 if f in _NEGATIVE else 1.0 for f in feats])
    return sign * np.sort(z * sign, axis=0)[:k].mean(axis=0)


# -- the result ----------------------------------------------------------------------------------------------------

#: Per-token features kept in a result, in `to_dict` order.
TOKEN_FEATURES = ("s_hid", "s_attn", "attn_diff", "s_log", "s_logit", "s_prob", "d_clean", "d_mis", "p_clean",
                  "p_masked", "p_mis", "confidence", "entropy", "log_perplexity")


@dataclass
class Reliability:
    """Per-token grounding reliability of one answer.

    Attributes:
        tokens: the answer tokens as text (one per answer token id).
        token_ids: the answer token ids.
        answer: the decoded answer.
        reliability: `r_t` in [0, 1] per token.
        sentence_score: mean of the lowest `ceil(0.1 T)` values of `r_t`.
        features: per-token features by name (see `TOKEN_FEATURES`), 1-D float arrays.
        confidence: mean `p_clean` over the answer.
        entropy: mean token entropy (nats) of the clean pass.
        perplexity: `exp(-mean log p_clean)`.
        layer: the hidden-state layer of `s_hid`.
        masked: how the masked pass was built (`MASKED_MODES`).
        combiner: the combiner that produced `reliability`.
    """

    tokens: list[str]
    token_ids: list[int]
    answer: str
    reliability: np.ndarray
    sentence_score: float
    features: dict[str, np.ndarray]
    confidence: float
    entropy: float
    perplexity: float
    layer: int
    masked: str
    combiner: Combiner

    def rescored(self, combiner: Combiner) -> Reliability:
        """The same measurements scored by another combiner (`s_attn` rescaled on its quantiles)."""
        feats = dict(self.features)
        feats["s_attn"] = combiner.scale_attention(feats["attn_diff"])
        r = combiner.token_scores(feats)
        return replace(self, features=feats, reliability=r, sentence_score=combiner.sentence_score(r),
                       combiner=combiner)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: `tokens`, `reliability`, `sentence_score`, every per-token feature by name, and the rest."""
        out: dict[str, Any] = {"tokens": list(self.tokens), "reliability": [float(x) for x in self.reliability],
                               "sentence_score": float(self.sentence_score)}
        for name in TOKEN_FEATURES:
            out[name] = [float(x) for x in self.features[name]]
        out.update({"token_ids": list(self.token_ids), "answer": self.answer, "confidence": float(self.confidence),
                    "entropy": float(self.entropy), "perplexity": float(self.perplexity), "layer": self.layer,
                    "masked": self.masked, "combiner": self.combiner.to_dict()})
        return out

    def strip_html(self) -> str:
        """An HTML snippet: the answer tokens on a red (guessed) to green (grounded) background by `r_t`."""
        spans = []
        for tok, r in zip(self.tokens, self.reliability):
            red, green, blue = (int(round(255 * c)) for c in _colour(float(r)))
            spans.append(f'<span title="r={float(r):.3f}" style="background:rgb({red},{green},{blue});'
                         f'padding:1px 2px;margin:1px;border-radius:3px;white-space:pre">{html.escape(tok)}</span>')
        return (f'<div class="reliability-strip" title="sentence score {self.sentence_score:.3f}">'
                + "".join(spans) + "</div>")

    def strip_png(self, path: str | Path, dpi: int = 120) -> Path:
        """Write the token strip (tokens coloured by `r_t`, red = guessed, green = grounded) as a PNG."""
        from vlm_tools.core.io import plain_text, pyplot, write_figure

        plt = pyplot()
        per_row = 12
        n = max(1, len(self.tokens))
        rows = math.ceil(n / per_row)
        fig, ax = plt.subplots(figsize=(min(per_row, n) * 1.0 + 0.6, 0.55 * rows + 0.7))
        ax.set_xlim(0, min(per_row, n))
        ax.set_ylim(rows, -0.6)
        ax.axis("off")
        for i, (tok, r) in enumerate(zip(self.tokens, self.reliability)):
            x, y = i % per_row, i // per_row
            ax.add_patch(plt.Rectangle((x + 0.03, y + 0.05), 0.94, 0.9, color=_colour(float(r))))
            ax.text(x + 0.5, y + 0.5, plain_text(tok.replace("\n", "\\n")) or " ", ha="center", va="center",
                    fontsize=8, clip_on=True)
        ax.text(0, -0.3, plain_text(f"sentence score {self.sentence_score:.3f}  (red: guessed, green: grounded)"),
                fontsize=8, va="center")
        fig.tight_layout()
        return write_figure(fig, path, dpi=dpi)


def _colour(r: float) -> tuple[float, float, float]:
    """Red (0) - yellow (0.5) - green (1), light enough for black text."""
    r = min(1.0, max(0.0, r))
    if r < 0.5:
        return (1.0, 0.55 + 0.9 * r, 0.55)
    return (1.0 - 0.9 * (r - 0.5), 1.0, 0.55)


# -- inputs --------------------------------------------------------------------------------------------------------

def _raw_images(images: Any, what: str) -> list:
    """PIL images as given (paths opened, mode and size untouched)."""
    import os

    from PIL import Image, UnidentifiedImageError

    items = list(images) if isinstance(images, (list, tuple)) else [images]
    out = []
    for item in items:
        if isinstance(item, (str, os.PathLike)):
            try:
                with Image.open(item) as im:
                    im.load()
                    item = im.copy()
            except (OSError, UnidentifiedImageError) as exc:
                raise ValueError(f"cannot read {what} image {item}: {exc}") from None
        elif not isinstance(item, Image.Image):
            raise TypeError(f"{what} images must be PIL images or paths, got {type(item).__name__}")
        out.append(item)
    return out


def _pixel_seed(image) -> int:
    return int.from_bytes(hashlib.sha256(image.tobytes() + repr((image.size, image.mode)).encode()).digest()[:8],
                          "little")


def _mismatched_images(clean: list, mismatched: Any, reference: Any) -> list:
    """Per sample, the mismatched image (same size and mode as the clean one)."""
    from PIL import Image

    if mismatched is not None and reference is not None:
        raise ValueError("give mismatched= or reference=, not both")
    if mismatched is not None:
        mis = _raw_images(mismatched, "mismatched")
        if len(mis) != len(clean):
            raise ValueError(f"got {len(mis)} mismatched images for {len(clean)} samples; give one per sample")
        for s, (c, m) in enumerate(zip(clean, mis)):
            if (c.size, c.mode) != (m.size, m.mode):
                raise ValueError(f"sample {s}: the mismatched image is {m.size[0]}x{m.size[1]} {m.mode} but the clean "
                                 f"image is {c.size[0]}x{c.size[1]} {c.mode}; they must have the same size and mode")
        return mis
    if reference is not None:
        pool = _raw_images(reference, "reference")
        out = []
        for s, c in enumerate(clean):
            cands = [r for r in pool if (r.size, r.mode) == (c.size, c.mode) and r.tobytes() != c.tobytes()]
            if not cands:
                sizes = sorted({f"{r.size[0]}x{r.size[1]} {r.mode}" for r in pool})
                raise ValueError(f"sample {s}: no reference image has the clean image's size and mode "
                                 f"({c.size[0]}x{c.size[1]} {c.mode}); the reference set has {sizes}")
            out.append(cands[_pixel_seed(c) % len(cands)])
        return out
    out = []
    for c in clean:
        rng = np.random.default_rng(_pixel_seed(c))
        rgb = Image.fromarray(rng.integers(0, 256, (c.size[1], c.size[0], 3), dtype=np.uint8))
        out.append(rgb.convert(c.mode))
    return out


def _mean_colour(image):
    from PIL import Image

    mean = tuple(int(round(v)) for v in np.asarray(image, dtype=np.float64).reshape(-1, 3).mean(0))
    return Image.new("RGB", image.size, mean)


def _answer_ids(processor: Any, answers: Any, n: int, single: bool) -> list[torch.Tensor] | None:
    if answers is None:
        return None
    items = [answers] if single or isinstance(answers, str) else answers
    if not isinstance(items, (list, tuple)):
        raise TypeError(f"answers of a batch must be a list of strings, got {type(answers).__name__}: {answers!r}")
    if len(items) != n:
        raise ValueError(f"got {len(items)} answers for {n} samples; give one per sample")
    out = []
    for s, a in enumerate(items):
        if not isinstance(a, str):
            raise TypeError(f"answer must be a string (or None to generate it), got {type(a).__name__}: {a!r}")
        ids = processor.tokenizer(a, add_special_tokens=False)["input_ids"]
        if not a.strip() or not ids:
            raise ValueError(f"answer {s} is empty ({a!r}); give the answer text or None to generate it")
        out.append(torch.tensor(ids, dtype=torch.long))
    return out


# -- the three passes ------------------------------------------------------------------------------------------------

def _image_mass(forced: ForcedPass, s: int) -> np.ndarray:
    """Per answer token, attention mass of its predicting row on the image positions (mean over layers)."""
    rows = forced.attentions[s]  # (layers, T, L)
    vis = forced.layouts[s].visual_positions()
    return rows[..., vis].sum(-1).mean(0).double().numpy()


def _token_stats(forced: ForcedPass, s: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per answer token: log p, logit and (for the clean pass) the entropy of the predicting distribution."""
    ids, pos = forced.answer_ids[s], forced.answer_positions[s]
    logits = forced.logits[s, pos - 1].double()
    logp = torch.log_softmax(logits, dim=-1)
    lp = logp.gather(1, ids[:, None])[:, 0]
    lg = logits.gather(1, ids[:, None])[:, 0]
    ent = -(logp.exp() * logp).sum(-1)
    return lp.numpy(), lg.numpy(), ent.numpy()


def _angle(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    a, b = a.double(), b.double()
    cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-300)
    return (torch.arccos(cos.clamp(-1.0, 1.0)) / math.pi).numpy()


@torch.no_grad()
def reliability(model: nn.Module | WrappedModel, processor: Any, images: Any, prompts: str | Sequence[str],
                answer: str | Sequence[str] | None = None, *, mismatched: Any = None, reference: Any = None,
                layer: int = -1, combiner: Combiner | None = None, masked: str = "attention",
                max_new_tokens: int = 32) -> Reliability | list[Reliability]:
    """Per-token visual reliability of an answer (see the module docstring).

    Args:
        model: an HF LLaVA / LLaVA-NeXT model, or a `WrappedModel` (pruned: generation and the three forced
            passes go through it).
        processor: its processor.
        images: one image (PIL or path) or a list, one per prompt.
        prompts: one prompt or a list (with the image placeholder; see `vlm_tools.loading.format_prompt`).
        answer: the answer text (one per prompt; tokenized without special tokens), or None to generate it greedily.
        mismatched: the mismatched image(s), one per sample, each of the clean image's size and mode.
        reference: instead, a set of images to draw the mismatched image from (deterministically).
        layer: hidden-state layer of `s_hid` (index into the embeddings + per-layer outputs; -1 = final norm).
        combiner: how features become `r_t` (default: the unsupervised `Combiner()`).
        masked: "attention" (mask the image positions) or "mean_color" (a mean-colour image).
        max_new_tokens: generation limit when `answer` is None.

    Returns:
        A `Reliability` (or a list of them when `images` / `prompts` are lists).
    """
    base = model.model if isinstance(model, WrappedModel) else model
    adapter = get_adapter(base)  # an unsupported model raises here, before any hook
    for lyr in adapter.lm_layers:
        check_lm_attention(lyr.self_attn)
    single = isinstance(prompts, str)
    prompt_list = [prompts] if single else list(prompts)
    if not prompt_list or not all(isinstance(p, str) for p in prompt_list):
        raise TypeError(f"prompts must be a string or a non-empty list of strings, got {prompts!r}")
    if masked not in MASKED_MODES:
        raise ValueError(f"masked must be one of {MASKED_MODES}, got {masked!r}")
    n_hidden = len(adapter.lm_layers) + 1
    if isinstance(layer, bool) or not isinstance(layer, int) or not -n_hidden <= layer < n_hidden:
        raise ValueError(f"layer must be an int in {-n_hidden}..{n_hidden - 1} (embeddings + {n_hidden - 1} decoder "
                         f"layers), got {layer!r}")
    combiner = combiner if combiner is not None else Combiner()
    if not isinstance(combiner, Combiner):
        raise TypeError(f"combiner must be a Combiner, got {type(combiner).__name__}")
    raw = _raw_images(images, "clean")
    if len(raw) != len(prompt_list):
        raise ValueError(f"got {len(raw)} images for {len(prompt_list)} prompts; give one image per prompt")
    mis_raw = _mismatched_images(raw, mismatched, reference)
    clean_imgs, mis_imgs = load_images(raw), load_images(mis_raw)
    answers = _answer_ids(processor, answer, len(prompt_list), single)
    if answers is None:
        answers = generate_answers(model, processor, clean_imgs, prompt_list, max_new_tokens=max_new_tokens)
        empty = [s for s, a in enumerate(answers) if a.numel() == 0]
        if empty:
            raise ValueError(f"the model generated an empty answer for sample(s) {empty}; pass answer= to score a "
                             "given answer")

    # the rows predicting the answer tokens, counted from the end of each pass's returned sequence
    queries = [torch.arange(-len(a) - 1, -1) for a in answers]
    clean = teacher_force(model, processor, clean_imgs, prompt_list, answers, attention_queries=queries)
    if masked == "attention":
        mask_pass = teacher_force(model, processor, clean_imgs, prompt_list, answers, mask_images=True)
    else:
        mask_pass = teacher_force(model, processor, [_mean_colour(im) for im in clean_imgs], prompt_list, answers)
    mis = teacher_force(model, processor, mis_imgs, prompt_list, answers, hidden_states=False,
                        attention_queries=queries)

    tok = processor.tokenizer
    results = []
    for s, ids in enumerate(answers):
        lp_c, lg_c, ent = _token_stats(clean, s)
        lp_m, lg_m, _ = _token_stats(mask_pass, s)
        lp_x, lg_x, _ = _token_stats(mis, s)
        h_c = clean.hidden_states[layer][s, clean.answer_positions[s] - 1]
        h_m = mask_pass.hidden_states[layer][s, mask_pass.answer_positions[s] - 1]
        attn_diff = _image_mass(clean, s) - _image_mass(mis, s)
        s_log = lp_c - np.maximum(lp_m, lp_x)
        log_ppl = float(-lp_c.mean())
        feats = {"s_hid": _angle(h_c.cpu(), h_m.cpu()), "attn_diff": attn_diff,
                 "s_attn": combiner.scale_attention(attn_diff), "s_log": s_log,
                 "s_logit": lg_c - np.maximum(lg_m, lg_x), "s_prob": _sigmoid(s_log),
                 "d_clean": np.exp(lp_c) - np.exp(lp_m), "d_mis": np.exp(lp_c) - np.exp(lp_x),
                 "p_clean": np.exp(lp_c), "p_masked": np.exp(lp_m), "p_mis": np.exp(lp_x),
                 "confidence": np.exp(lp_c), "entropy": ent, "log_perplexity": np.full(len(ids), log_ppl)}
        r = combiner.token_scores(feats)
        id_list = [int(t) for t in ids]
        results.append(Reliability(
            tokens=[tok.decode([t]) for t in id_list], token_ids=id_list, answer=tok.decode(id_list),
            reliability=r, sentence_score=combiner.sentence_score(r), features=feats,
            confidence=float(np.exp(lp_c).mean()), entropy=float(ent.mean()), perplexity=float(math.exp(log_ppl)),
            layer=layer, masked=masked, combiner=combiner))
    return results[0] if single else results
