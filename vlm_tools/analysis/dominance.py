"""`vlm_tools.dominance(...)`: MDI / AEI of one greedy generation, through `vlm_tools.wrap` when a method is given."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vlm_tools.analysis.collector import DominanceCollector
from vlm_tools.analysis.metrics import stage_layers
from vlm_tools.analysis.report import DominanceReport
from vlm_tools.core.adapters import get_adapter
from vlm_tools.loading import format_prompt

__all__ = ["dominance"]


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
        runner, base, wrapper = model, model.model, model
        method, method_config = model.method.name, model.method.config.to_dict()
    elif method is not None:
        wrapped = wrap(model, method, **method_config)
        runner, base, wrapper = wrapped, model, wrapped
        method, method_config = wrapped.method.name, wrapped.method.config.to_dict()
    else:
        if method_config:
            raise ValueError(f"method config {sorted(method_config)} given without a method")
        runner, base, wrapper = model, model, None
    stage_layers(len(get_adapter(base).lm_layers), boundaries)  # validate before running anything
    try:
        text = format_prompt(processor, prompt)
        inputs = processor(images=image, text=text, return_tensors="pt")
        param = next(base.parameters())
        inputs = {k: (v.to(param.device, param.dtype) if k == "pixel_values" else v.to(param.device))
                  for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        with DominanceCollector(base, wrapper=wrapper) as col, torch.no_grad():
            out = runner.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        seq = out if isinstance(out, torch.Tensor) else out.sequences
        generated = processor.tokenizer.decode(seq[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        report = col.report(0, boundaries, generated_text=generated.strip(), method=method,
                            method_config=method_config)
        report.prompt = prompt
        return report
    finally:
        if wrapped is not None:
            wrapped.unwrap()
