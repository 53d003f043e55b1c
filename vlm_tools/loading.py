"""Loading a model for the command line and building prompts: one implementation for every `vlm-tools` verb.

`load_model(spec)` takes `default` (the embedded default VLM), `tiny` / `tiny_next` (random tiny LLaVA / LLaVA-NeXT
models built offline, for smoke tests) or a local HF LLaVA / LLaVA-NeXT folder. `format_prompt(processor, prompt)`
turns a plain question into the model's own chat format with one image placeholder (for the default model its saved
chat template renders the trained question format and the `Answer:` prefix); `cli_prompt(spec, ...)` is the prompt a
CLI verb sends. `auto_dtype(device)` is the one dtype rule for running a model on a device.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["load_model", "format_prompt", "cli_prompt", "auto_dtype", "cpu_has_native_bf16", "MODEL_SPECS", "DTYPES"]

MODEL_SPECS = ("default", "tiny", "tiny_next")
DTYPES = ("auto", "float32", "bfloat16", "float16")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 matmuls in hardware (x86 AVX512-BF16 or AMX), as torch reports it.

    `torch.backends.cpu.get_cpu_capability()` alone does not tell: it says AVX512 on CPUs with and without bf16
    units. Without them a bf16 matmul is emulated and about 13x slower than fp32.
    """
    import torch

    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def auto_dtype(device: Any = "cpu") -> Any:
    """The dtype to run a model in on `device`: bf16 on CUDA GPUs that support it and on CPUs with native bf16
    (see `cpu_has_native_bf16`), else fp32.

    Args:
        device: a torch device or its name ("cpu", "cuda", "cuda:1").

    Returns:
        `torch.bfloat16` or `torch.float32`.
    """
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float32
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    return torch.float32


def load_model(spec: str, dtype: str = "float32") -> tuple[Any, Any]:
    """`(model, processor)` for a `--model` value: "default", "tiny", "tiny_next" or an HF model folder.

    `dtype` is one of `DTYPES`; "auto" is `auto_dtype("cpu")`. The tiny models are always fp32.

    Raises:
        UsageError: `spec` is neither a known name nor an existing folder (names the valid values).
        ValueError: an unknown `dtype`.
    """
    import torch

    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    torch_dtype = auto_dtype("cpu") if dtype == "auto" else getattr(torch, dtype)
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
    """The prompt a `vlm-tools` verb sends for `--model spec`: the default model's chat template (its trained format)
    for a plain question, `<image> question` for the tiny models, otherwise `prompt` unchanged."""
    if spec == "default":
        return format_prompt(processor, prompt)
    if spec in MODEL_SPECS[1:] and "<image>" not in prompt:
        return f"<image> {prompt}"
    return prompt
