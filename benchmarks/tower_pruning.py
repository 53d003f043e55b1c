"""FlowCut and VTC-CLS inside a CLIP-L/336-shaped vision tower (24 layers, hidden 1024, 16 heads, 336 px, fp32).

Times the tower forward, interleaved repeats in one run, medians of the process CPU time (the primary figure: with
one torch thread it does not depend on what else runs on the machine) and of the wall time:

* `bare`: the tower without hooks (what LLaVA-1.5 runs unpruned);
* `flowcut`: FlowCut at `--keep` (default 64), hooks attached through the registered Pruner. Random weights give an
  almost uniform [CLS] attention (entropy ratio ~1), so FlowCut's adaptive count removes nothing early and the
  schedule degenerates to the final cut before the feature block. It is therefore also timed on the same tower with
  the q/k projections scaled by `--sharpen` (default 16: [CLS]-attention entropy ratio ~0.65), where the adaptive
  count prunes from block 1 on. A trained CLIP-L's schedule is not known here (no weights offline); the per-block
  token counts of each run are printed, and the analytic FLOP ratio of each schedule is shown next to the time ratio;
* `vtc_cls`: VTC-CLS at `--keep` (three fp32 [CLS]-row recomputations, the tower is not shortened): its scoring
  overhead against `bare`.

    python benchmarks/tower_pruning.py [--repeats 3] [--keep 64] [--sharpen 16] [--batch 1] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

D, FFN, LAYERS, HEADS, IMAGE, PATCH = 1024, 4096, 24, 16, 336, 14


def clip_l336_llava(text_hidden: int = 256, text_ffn: int = 512, text_heads: int = 4, text_layers: int = 1,
                    vocab: int = 1000, image_token_id: int = 999):
    """A LLaVA-1.5-shaped model: CLIP ViT-L/14-336 tower, feature layer -2, a LLaMA text model (random weights)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vcfg = CLIPVisionConfig(hidden_size=D, intermediate_size=FFN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                            image_size=IMAGE, patch_size=PATCH, projection_dim=768)
    tcfg = LlamaConfig(vocab_size=vocab, hidden_size=text_hidden, intermediate_size=text_ffn,
                       num_hidden_layers=text_layers, num_attention_heads=text_heads, num_key_value_heads=text_heads,
                       max_position_embeddings=4096, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    cfg = LlavaConfig(vision_config=vcfg, text_config=tcfg, image_token_id=image_token_id, vision_feature_layer=-2,
                      vision_feature_select_strategy="default", image_seq_length=(IMAGE // PATCH) ** 2)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(cfg).eval()
    model.set_attn_implementation("sdpa")
    return model


def sharpened_weights(adapter, factor: float) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Copies of every block's q/k weights scaled by `factor` (attention logits scale by `factor ** 2`)."""
    return {b: (adapter.vision_attention(b).q_proj.weight * factor, adapter.vision_attention(b).k_proj.weight * factor)
            for b in range(adapter.n_layers)}


def load_qk(adapter, weights: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
    with torch.no_grad():
        for b, (q, k) in weights.items():
            adapter.vision_attention(b).q_proj.weight.copy_(q)
            adapter.vision_attention(b).k_proj.weight.copy_(k)


def tower_flops(block_tokens: list[int]) -> float:
    """FLOPs of the CLIP-L blocks for the given sequence length of each block (projections, MLP, attention)."""
    return sum(2 * n * (4 * D * D + 2 * D * FFN) + 4 * n * n * D for n in block_tokens)


def block_lengths(layer_tokens: list[tuple[str, list[int]]], n_prefix: int = 1) -> list[int]:
    """Input length of each vision block (row 0) from a trace's `vision.<block>` output counts."""
    counts = {int(w.split(".")[1]): c[0] for w, c in layer_tokens if w.startswith("vision.")}
    lengths, current = [], (IMAGE // PATCH) ** 2
    for b in range(LAYERS):
        lengths.append(n_prefix + current)
        current = counts.get(b, current)
    return lengths


class TowerRunner:
    """Runs the tower with one registered method's hooks, through the public Pruner API (attach, plan, select)."""

    def __init__(self, model, method: str, **config) -> None:
        import vlm_tools
        from vlm_tools.core.method import ContextSlot

        self.adapter = vlm_tools.get_adapter(model)
        info = vlm_tools.get_method(method)
        self.method = info.cls(info.config_cls.from_dict(config))
        self.slot = ContextSlot()
        self.handle = self.method.attach(model, self.adapter, self.slot)
        self.keep = config.get("keep")
        self.layer_tokens: list = []

    def __call__(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        from vlm_tools.core.method import CallContext

        rows, plan = self.adapter.plan(pixels, None, list(range(pixels.shape[0])), self.keep, None, True)
        ctx = CallContext(plan=plan)
        self.slot.ctx = ctx
        try:
            out = self.adapter.vision_tower(rows, output_hidden_states=True, return_dict=True)
            kept = self.method.select(out.hidden_states[self.adapter.feature_layer][:, 1:], ctx, self.adapter)
            self.layer_tokens = list(ctx.layer_tokens)
            return kept
        finally:
            self.slot.ctx = None

    def close(self) -> None:
        self.handle.remove()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--keep", type=int, default=64)
    ap.add_argument("--sharpen", type=float, default=16.0)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads; 1 (default) makes the CPU-time column robust on a shared machine")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import vlm_tools

    model = clip_l336_llava()
    adapter = vlm_tools.get_adapter(model)
    tower = adapter.vision_tower
    torch.manual_seed(1)
    pixels = torch.randn(args.batch, 3, IMAGE, IMAGE)
    original = sharpened_weights(adapter, 1.0)
    sharp = sharpened_weights(adapter, args.sharpen)
    runs = {"bare": (None, original), "flowcut (random init)": ("flowcut", original),
            f"flowcut (q/k x{args.sharpen:g})": ("flowcut", sharp), "vtc_cls": ("vtc_cls", original)}
    wall: dict[str, list[float]] = {name: [] for name in runs}
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    schedules = {}
    with torch.no_grad():
        tower(pixels, output_hidden_states=True)  # warm-up
        for _ in range(args.repeats):
            for name, (method, weights) in runs.items():
                load_qk(adapter, weights)
                runner = TowerRunner(model, method, keep=args.keep) if method else None
                try:
                    t, c = time.perf_counter(), time.process_time()
                    if runner is None:
                        tower(pixels, output_hidden_states=True)
                    else:
                        runner(pixels)
                    wall[name].append(time.perf_counter() - t)
                    cpu[name].append(time.process_time() - c)
                finally:
                    if runner is not None:
                        runner.close()
                if method == "flowcut":
                    schedules[name] = runner.layer_tokens
    load_qk(adapter, original)
    report(wall, cpu, schedules, args)


def report(wall: dict, cpu: dict, schedules: dict, args) -> None:
    """Print medians, ratios to `bare`, the FLOP ratio of each run's schedule and the schedule itself."""
    med_wall = {k: statistics.median(v) for k, v in wall.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    full = tower_flops([1 + (IMAGE // PATCH) ** 2] * LAYERS)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch {args.batch}, "
          f"repeats {args.repeats} (medians), keep {args.keep}, fp32 CPU")
    print(f"{'run':<22} {'cpu ms':>8} {'ratio':>6} {'wall ms':>8} {'ratio':>6} {'FLOPs':>6}  "
          "patch tokens after each block")
    for name in wall:
        if name in schedules:
            flop = tower_flops(block_lengths(schedules[name])) / full
            sched = ",".join(str(c[0]) for w, c in schedules[name] if w.startswith("vision."))
        else:
            flop, sched = 1.0, "576 in every block"
        print(f"{name:<22} {med_cpu[name] * 1000:8.0f} {med_cpu[name] / med_cpu['bare']:6.3f} "
              f"{med_wall[name] * 1000:8.0f} {med_wall[name] / med_wall['bare']:6.3f} {flop:6.3f}  {sched}")


if __name__ == "__main__":
    main()
