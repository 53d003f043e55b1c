"""Prefill time of a LLaVA-1.5-7B-shaped model with FlowCut / VTC-CLS at 576 / 192 / 128 / 64 visual tokens.

Model (random weights, fp32 CPU): CLIP ViT-L/14-336 tower (feature layer -2), the 2-layer GELU projector
1024 -> 4096 -> 4096, and LLaMA-7B-wide decoder layers (hidden 4096, MLP 11008, 32 heads, MHA), but only
`--text-layers` of them (default 2) so that a run fits in minutes on two CPU cores; the vocabulary is the tiny
offline tokenizer's. One prompt with one 336 px image; the forward computes the logits of the last position only
(`logits_to_keep=1`, as generate's prefill does). `base` is the unwrapped model (576 visual tokens); the methods run
through `vlm_tools.wrap`, so their time includes the prepare step (tower with hooks, projector, placeholder shrink).

The tower's q/k projections are scaled by `--sharpen` (default 16) so that FlowCut's adaptive count prunes from
block 1 on, as it does on a trained tower (random weights give a near-uniform [CLS] attention and no early pruning;
see `benchmarks/tower_pruning.py`). The FLOP ratio counts the tower blocks (per-block token counts from the trace),
the projector and the decoder layers; the last column extrapolates it to all 32 decoder layers of LLaVA-1.5-7B.

Medians of the process CPU time (primary: with one torch thread it does not depend on other load) and wall time.

    python benchmarks/tower_prefill.py [--repeats 3] [--text-layers 2] [--sharpen 16] [--threads 1]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tower_pruning import IMAGE, D, block_lengths, clip_l336_llava, load_qk, sharpened_weights, tower_flops

HIDDEN, FFN_LLM, HEADS_LLM, FULL_LAYERS = 4096, 11008, 32, 32
PROMPT = "USER : <image> what is in the image ? please answer in one short word . ASSISTANT :"


def llm_flops(seq: int, layers: int) -> float:
    """FLOPs of `layers` LLaMA-7B decoder layers on `seq` tokens (projections, SwiGLU MLP, causal attention)."""
    per_layer = 2 * seq * (4 * HIDDEN * HIDDEN + 3 * HIDDEN * FFN_LLM) + 2 * seq * seq * HIDDEN
    return layers * per_layer


def projector_flops(tokens: int) -> float:
    return 2 * tokens * (D * HIDDEN + HIDDEN * HIDDEN)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--text-layers", type=int, default=2)
    ap.add_argument("--sharpen", type=float, default=16.0)
    ap.add_argument("--keeps", default="192,128,64")
    ap.add_argument("--methods", default="flowcut,vtc_cls")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads; 1 (default) makes the CPU-time column robust on a shared machine")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import numpy as np
    from PIL import Image
    from transformers import CLIPImageProcessor, LlavaProcessor

    import vlm_tools
    from vlm_tools.core.models import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    image_token_id = tok.convert_tokens_to_ids("<image>")
    model = clip_l336_llava(text_hidden=HIDDEN, text_ffn=FFN_LLM, text_heads=HEADS_LLM,
                            text_layers=args.text_layers, vocab=len(tok), image_token_id=image_token_id)
    adapter = vlm_tools.get_adapter(model)
    load_qk(adapter, sharpened_weights(adapter, args.sharpen))
    improc = CLIPImageProcessor(size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE})
    processor = LlavaProcessor(image_processor=improc, tokenizer=tok, patch_size=14,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1)
    rng = np.random.default_rng(0)
    image = Image.fromarray((rng.random((IMAGE, IMAGE, 3)) * 255).astype("uint8"))
    inputs = processor(images=[image], text=[PROMPT], return_tensors="pt")
    text_tokens = int(inputs["input_ids"].shape[1]) - 576

    runs = [("base", None, 576)] + [(m, m, int(k)) for k in args.keeps.split(",") for m in args.methods.split(",")]
    wall: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    schedules: dict[str, list] = {}
    with torch.no_grad():
        model(**inputs, logits_to_keep=1)  # warm-up
        for _ in range(args.repeats):
            for label, method, keep in runs:
                name = f"{label} {keep}"
                with contextlib.ExitStack() as stack:
                    call = model if method is None else stack.enter_context(vlm_tools.attached(model, method,
                                                                                               keep=keep))
                    t, c = time.perf_counter(), time.process_time()
                    call(**inputs, logits_to_keep=1)
                    wall.setdefault(name, []).append(time.perf_counter() - t)
                    cpu.setdefault(name, []).append(time.process_time() - c)
                    if method is not None:
                        schedules[name] = call.last_trace.layer_tokens

    med = {k: statistics.median(v) for k, v in wall.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    full_tower = tower_flops([577] * 24)

    def flops(name: str, keep: int, layers: int) -> float:
        tower = tower_flops(block_lengths(schedules[name])) if name in schedules else full_tower
        return tower + projector_flops(keep) + llm_flops(text_tokens + keep, layers)

    base = "base 576"
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, fp32 CPU, {args.text_layers} decoder layers "
          f"(LLaMA-7B widths), {text_tokens} text tokens, tower q/k x{args.sharpen:g}, "
          f"repeats {args.repeats} (medians)")
    print(f"{'run':<14} {'cpu ms':>8} {'ratio':>6} {'wall ms':>8} {'ratio':>6} {'FLOPs':>6} {'FLOPs, 32 layers':>17}")
    for label, _, keep in runs:
        name = f"{label} {keep}"
        r = flops(name, keep, args.text_layers) / flops(base, 576, args.text_layers)
        r32 = flops(name, keep, FULL_LAYERS) / flops(base, 576, FULL_LAYERS)
        print(f"{name:<14} {med_cpu[name] * 1000:8.0f} {med_cpu[name] / med_cpu[base]:6.3f} {med[name] * 1000:8.0f} "
              f"{med[name] / med[base]:6.3f} {r:6.3f} {r32:17.3f}")


if __name__ == "__main__":
    main()
