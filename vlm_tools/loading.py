"""Loading a model for the command line and building prompts: one implementation for every `vlm-tools` verb.

`load_model(spec)` takes `default` (the embedded default VLM), `tiny` / `tiny_next` (random tiny LLaVA / LLaVA-NeXT
models built offline, for smoke tests) or a local HF LLaVA / LLaVA-NeXT folder. `format_prompt(processor, prompt)`
turns a plain question into the model's own chat format with one image placeholder; `cli_prompt(spec, ...)` adds the
default model's trained prompt format.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["load_model", "format_prompt", "cli_prompt", "MODEL_SPECS"]

MODEL_SPECS = ("default", "tiny", "tiny_next")


def load_model(spec: str, dtype: str = "float32") -> tuple[Any, Any]:
    """`(model, processor)` for a `--model` value: "default", "tiny", "tiny_next" or an HF model folder.

    Raises:
        UsageError: `spec` is neither a known name nor an existing folder (names the valid values).
    """
    import torch

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    if spec == "default":
        from vlm_tools.assets.default_model import load_default

        return load_default(dtype=torch_dtype)
    if spec in ("tiny", "tiny_next"):
        from vlm_tools.core.models import build_tiny_llava

        return build_tiny_llava("llava" if spec == "tiny" else "llava_next")
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = Path(spec)
    if not path.is_dir():
        from vlm_tools.errors import UsageError

        raise UsageError(f"--model {spec!r}: no such folder (use 'default', 'tiny', 'tiny_next' or an HF model "
                         "folder)")
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch_dtype).eval()
    return model, AutoProcessor.from_pretrained(path)


def format_prompt(processor: Any, prompt: str) -> str:
    """`prompt` as is when it holds the image placeholder; else one user turn (image, then the text) rendered with the
    processor's chat template, with the generation prompt appended.

    Raises:
        ValueError: no placeholder in `prompt` and no chat template on the processor.
    """
    token = getattr(processor, "image_token", None) or "<image>"
    if token in prompt:
        return prompt
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    raise ValueError(f"the prompt has no image placeholder {token!r} and the processor has no chat template; "
                     f"put {token!r} where the image goes")


def cli_prompt(spec: str, processor: Any, prompt: str) -> str:
    """The prompt a `vlm-tools` verb sends for `--model spec`: the default model's trained format for a plain
    question, `<image> question` for the tiny models, otherwise `prompt` unchanged."""
    if spec == "default":
        from vlm_tools.assets.default_model import IMAGE_TOKEN
        from vlm_tools.assets.default_model import format_prompt as default_format

        if IMAGE_TOKEN not in prompt:
            return default_format(processor, prompt)
    if spec in MODEL_SPECS[1:] and "<image>" not in prompt:
        return f"<image> {prompt}"
    return prompt
