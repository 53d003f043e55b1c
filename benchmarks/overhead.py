"""Overhead of `cls_topk`'s scoring hook on a CLIP-L/336-shaped vision tower (24 layers, hidden 1024, random weights).

Times the tower forward with the hook active (the fp32 [CLS]-row recomputation at the feature layer) against the
same tower without hooks, interleaved A/B repeats in one run, and reports the ratio of medians. The primary figure
is process CPU time with one torch thread (it does not depend on other jobs on a shared machine); wall time is
reported too.

    python benchmarks/overhead.py [--repeats 7] [--batch 1] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def clip_l336_llava(text_layers: int = 1):
    """A LLaVA-1.5-shaped model: CLIP ViT-L/14-336 tower (random weights), a tiny LM (unused here)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vcfg = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                            image_size=336, patch_size=14, projection_dim=768)
    tcfg = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=text_layers,
                       num_attention_heads=4, num_key_value_heads=4)
    cfg = LlavaConfig(vision_config=vcfg, text_config=tcfg, image_token_id=999, vision_feature_layer=-2,
                      vision_feature_select_strategy="default", image_seq_length=576)
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(cfg).eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from tower_pruning import TowerRunner  # the tower through the public Method API (attach, plan, select)

    model = clip_l336_llava()
    tower = model.model.vision_tower
    pixels = torch.randn(args.batch, 3, 336, 336)
    runner = TowerRunner(model, "cls_topk", keep=64)

    def bare():
        tower(pixels, output_hidden_states=True, return_dict=True)

    def hooked():
        kept = runner(pixels)  # tower with the scoring hook, then the top-k selection
        assert [k.numel() for k in kept] == [64] * args.batch

    cpu = {"bare": [], "hooked": []}
    wall = {"bare": [], "hooked": []}
    with torch.no_grad():
        bare(), hooked()  # warm-up
        for _ in range(args.repeats):
            for name, fn in (("bare", bare), ("hooked", hooked)):
                c, t = time.process_time(), time.perf_counter()
                fn()
                cpu[name].append(time.process_time() - c)
                wall[name].append(time.perf_counter() - t)
    runner.close()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch {args.batch}, "
          f"repeats {args.repeats}")
    for label, times in (("CPU time", cpu), ("wall time", wall)):
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"{label:9s}: tower {med['bare'] * 1000:8.1f} ms, with cls_topk {med['hooked'] * 1000:8.1f} ms, "
              f"ratio {med['hooked'] / med['bare']:.4f} (medians)")


if __name__ == "__main__":
    main()
