"""`integrated_gradients`: captum's `LayerIntegratedGradients` on the image features the language model receives.

The attributed layer is the input of the language model's first decoder layer (the input embeddings after the
image features have been scattered into the visual positions). That tensor exists whatever a pruning method did
in the vision tower or at the projector: the kept features sit at the visual positions the returned
`SequenceLayout` names, so per-position attributions land on the clean pass's frame with `ImageFrame.to_grid`.
(The projector's output would not: its rows are the kept tokens before LLaVA-NeXT's packing and newline tokens.)

The baseline is zero image features with the text unchanged. captum interpolates a layer between its values at the
forward function's inputs and baselines, so the forward function's input is one scale per example that multiplies
the image-patch features (pre-hook on the language model): 1 gives the real features, 0 the baseline. Target: the
log-probability of the explained answer token under teacher forcing (`teacher_force(..., grad=True)`). Every
(sample, explained token) pair is one captum example, so the `n_steps` interpolation steps of all of them are
evaluated in chunks of `internal_batch_size` forward rows. Attributions are summed over the feature dimension;
completeness holds per example: the sum over positions equals `log p(token) - log p(token | zero features)` up to
captum's convergence delta (reported in the scores).

Not supported: an LLM-stage drop whose returned sequence holds only the kept slots (FlowCut's LLaVA-NeXT stage):
the first decoder layer then runs on more positions than the layout describes, and the call raises a `ValueError`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from vlm_tools._registry import register_explainer
from vlm_tools.core.hooks import HookHandle
from vlm_tools.core.wrapped import WrappedModel
from vlm_tools.interpret.base import Attribution, ExplainConfig, ExplainContext, Explainer
from vlm_tools.interpret.forcing import teacher_force
from vlm_tools.interpret.methods.batching import repeated_inputs, row_samples, target_logprobs

__all__ = ["IntegratedGradientsConfig", "IntegratedGradients", "IGResult", "position_attributions"]


@dataclass(frozen=True)
class IntegratedGradientsConfig(ExplainConfig):
    """Attributes:
        n_steps: interpolation steps between zero features and the real ones (captum's Gauss-Legendre rule).
        internal_batch_size: forward rows per chunk (steps x examples); bounds the memory of one backward pass.
    """

    n_steps: int = 32
    internal_batch_size: int = 16

    def __post_init__(self) -> None:
        for name in ("n_steps", "internal_batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")


@dataclass
class IGResult:
    """One sample's integrated gradients.

    Attributes:
        attributions: `(T, L)` fp32 attribution of each position of the clean pass's sequence (0 off the image
            patches) for each explained token.
        logprob: `(T,)` log-probability of each explained token at the real features.
        delta: `(T,)` captum's convergence delta, `sum(attributions) - (f(x) - f(baseline))`.
    """

    attributions: torch.Tensor
    logprob: torch.Tensor
    delta: torch.Tensor

    @property
    def baseline_logprob(self) -> torch.Tensor:
        """`(T,)` log-probability at zero image features implied by completeness, `f(x) - sum + delta`."""
        return self.logprob - self.attributions.sum(1) + self.delta


def _scale_features_hook(module, args, kwargs, wrapper: WrappedModel, features: torch.Tensor, scale: torch.Tensor):
    """Pre-hook on the language model: multiply the image-patch features of row `r` (`features[r]`, positions of the
    returned sequence) by `scale[r]`."""
    if wrapper.context is None:
        return None
    emb = kwargs.get("inputs_embeds")
    if not isinstance(emb, torch.Tensor):
        raise RuntimeError("integrated_gradients: the language model was called without inputs_embeds")
    n = emb.shape[1]
    # left padding: a batch of fewer samples than the clean pass is narrower; its positions are the last `n`
    if emb.shape[0] != features.shape[0] or n > features.shape[1] or bool(features[:, :-n].any()):
        raise ValueError(f"integrated_gradients: the language model runs on {n} positions but the pass's layout "
                         f"has {features.shape[1]}; an LLM-stage drop that returns only the kept slots (e.g. "
                         "flowcut on LLaVA-NeXT) is not supported")
    mask = features[:, features.shape[1] - n:].to(emb.device)
    factor = torch.where(mask, scale.to(emb.device, emb.dtype)[:, None], torch.ones((), dtype=emb.dtype,
                                                                                   device=emb.device))
    return args, {**kwargs, "inputs_embeds": emb * factor[..., None]}


def _forward(scale: torch.Tensor, ctx: ExplainContext, samples: list[int], targets: list[int],
             features: list[torch.Tensor]) -> torch.Tensor:
    """captum's forward function: `(rows, 1)` feature scales -> `(rows,)` log-prob of each row's target token."""
    rows = row_samples(scale.shape[0], samples)
    n = len(samples)
    images, prompts, answers = repeated_inputs(ctx, rows)
    feats = torch.stack([features[s] for s in rows])
    with HookHandle("integrated_gradients") as handle:
        hook = functools.partial(_scale_features_hook, wrapper=ctx.model, features=feats, scale=scale[:, 0])
        handle.forward_pre_hook(ctx.adapter.language_model, hook, with_kwargs=True)
        forced = teacher_force(ctx.model, ctx.processor, images, prompts, answers, hidden_states=False,
                               grad=torch.is_grad_enabled())
    tgt = [torch.tensor([targets[r % n]]) for r in range(len(rows))]
    return target_logprobs(forced, tgt)[:, 0]


def position_attributions(ctx: ExplainContext, n_steps: int = 32, internal_batch_size: int = 16) -> list[IGResult]:
    """Per sample, integrated gradients of each explained token's log-prob w.r.t. the first decoder layer's input,
    summed over the feature dimension (see the module docstring)."""
    from captum.attr import LayerIntegratedGradients

    clean = ctx.clean
    features = [lay.patch >= 0 for lay in clean.layouts]  # image-patch positions (newline / CLS tokens stay)
    examples = [(s, int(j)) for s, smp in enumerate(ctx.samples) for j in smp.targets.tolist()]
    length = clean.logits.shape[1]
    attr = torch.zeros(len(examples), length)
    delta = torch.zeros(len(examples))
    device = next(ctx.model.model.parameters()).device
    layer = ctx.adapter.lm_layers[0]
    for start in range(0, len(examples), internal_batch_size):
        group = examples[start:start + internal_batch_size]
        fwd = functools.partial(_forward, ctx=ctx, samples=[s for s, _ in group], targets=[j for _, j in group],
                                features=features)
        lig = LayerIntegratedGradients(fwd, layer)
        ones = torch.ones(len(group), 1, device=device)
        a, d = lig.attribute(ones, baselines=torch.zeros_like(ones), n_steps=n_steps,
                             internal_batch_size=internal_batch_size, attribute_to_layer_input=True,
                             return_convergence_delta=True)
        a = a[0] if isinstance(a, (tuple, list)) else a
        attr[start:start + len(group), length - a.shape[1]:] = a.detach().float().sum(-1).cpu()
        delta[start:start + len(group)] = d.detach().float().cpu()
    logps = clean.answer_logprobs()
    out, i = [], 0
    for s, smp in enumerate(ctx.samples):
        t = smp.targets.numel()
        out.append(IGResult(attributions=attr[i:i + t], logprob=logps[s][smp.targets].detach().float().cpu(),
                            delta=delta[i:i + t]))
        i += t
    return out


@register_explainer("integrated_gradients", config=IntegratedGradientsConfig,
                    description="captum LayerIntegratedGradients on the image features (zero baseline), per token")
class IntegratedGradients(Explainer):
    """Integrated gradients of each explained token's log-prob w.r.t. the image features (see the module doc)."""

    def attribute(self, ctx: ExplainContext) -> list[Attribution]:
        cfg = self.config
        results = position_attributions(ctx, cfg.n_steps, cfg.internal_batch_size)
        out = []
        for frame, res in zip(ctx.frames(), results):
            maps = frame.to_grid(res.attributions)
            out.append(Attribution(maps=maps, text=None,
                                   scores={"logprob": res.logprob.tolist(),
                                           "ig_baseline_logprob": res.baseline_logprob.tolist(),
                                           "ig_delta": res.delta.tolist()}))
        return out
