"""ZOO-Prune scoring cost and FastV prefill ratio on a LLaVA-1.5-7B-shaped model (random weights, CPU, fp32).

Model: CLIP ViT-L/14-336 tower (24 layers, hidden 1024; 576 patches), the LLaVA projector (1024 -> 4096 -> 4096,
GELU) and LLaMA-7B-wide decoder layers (hidden 4096, MLP 11008, 32 heads, vocab 32000), but only `--layers` of
them (default 3) so a prefill fits CPU time. The prompt is LLaVA-shaped: 35 text tokens, 576 image tokens, 21 text
tokens (632 in all), batch 1.

Extrapolation to 32 decoder layers: every component is timed with forward hooks during real prefills (tower,
projector, each decoder layer, the rest = embeddings, final norm, `lm_head` on the last position and Python
overhead). A 32-layer prefill is `tower + projector + rest + 32 x t_layer` (median decoder-layer time); with
FastV (K=2) it is `tower + projector + rest + t_layer x (1 + a + 30 b)`, where `a` = layer 1 (which also runs the
ranking) / layer 0 and `b` = a pruned layer (K.., on the shortened sequence) / layer 0, both within the same FastV
run (the machine is shared, so ratios inside one run are steadier than times across runs). The same quantities
are also given from an analytic FLOP count (2 FLOPs per multiply-add; attention over all keys), which does not
depend on the machine's load.

ZOO-Prune scoring per image: the zeroth-order estimator's cost is linear in the number of directions m, so it is
timed with `--zo-directions` (default 8) on all 576 tokens and scaled to m=64; the Jacobian estimator is timed as
is (its per-model matrix precomputation is reported separately: it is paid once per model). SADS (k=192) and the
projection of all tokens (needed by SADS) are included in both.

Rank agreement: Spearman correlation of the Jacobian score with the zeroth-order score (m=64) and of both with the
projected-feature norm ||M(x_i)||, on `--spearman-tokens` tokens of this model and on all tokens of the tiny
test model.

    python benchmarks/projector_llm_pruning.py [--layers 3] [--repeats 1] [--json out/bench.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

N_TEXT_BEFORE, N_TEXT_AFTER, N_IMAGE = 35, 21, 576


def llava15_7b_shaped(text_layers: int):
    """LLaVA-1.5-7B widths with `text_layers` decoder layers (random weights, fp32, eval mode)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vcfg = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                            image_size=336, patch_size=14, projection_dim=768)
    tcfg = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=text_layers,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                       tie_word_embeddings=True)
    cfg = LlavaConfig(vision_config=vcfg, text_config=tcfg, image_token_id=31999, vision_feature_layer=-2,
                      vision_feature_select_strategy="default", image_seq_length=N_IMAGE,
                      projector_hidden_act="gelu", tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(cfg).eval()
    model.set_attn_implementation("sdpa")
    return model


def inputs_for(model) -> dict:
    gen = torch.Generator().manual_seed(0)
    img_id = model.config.image_token_id
    before = torch.randint(3, 31000, (N_TEXT_BEFORE,), generator=gen)
    before[0] = 1
    after = torch.randint(3, 31000, (N_TEXT_AFTER,), generator=gen)
    ids = torch.cat([before, torch.full((N_IMAGE,), img_id), after])[None]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "pixel_values": torch.randn(1, 3, 336, 336, generator=gen)}


class Timer:
    """Forward pre/post hooks that record wall time per module call (plain benchmark instrumentation)."""

    def __init__(self, modules: dict) -> None:
        self.times: dict[str, list[float]] = {k: [] for k in modules}
        self._start: dict[str, float] = {}
        self._handles = []
        for name, mod in modules.items():
            self._handles.append(mod.register_forward_pre_hook(self._pre(name)))
            self._handles.append(mod.register_forward_hook(self._post(name)))

    def _pre(self, name):
        def hook(_m, _a):
            self._start[name] = time.perf_counter()
        return hook

    def _post(self, name):
        def hook(_m, _a, _o):
            self.times[name].append(time.perf_counter() - self._start.pop(name))
        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def timed_prefill(runner, model, inputs) -> dict[str, float]:
    """One prefill (`logits_to_keep=1`, as in generate) with per-component wall times in seconds."""
    lm = model.model.language_model
    mods = {"tower": model.model.vision_tower, "projector": model.model.multi_modal_projector}
    mods.update({f"layer{i}": layer for i, layer in enumerate(lm.layers)})
    timer = Timer(mods)
    try:
        t = time.perf_counter()
        with torch.no_grad():
            runner(**inputs, logits_to_keep=1)
        total = time.perf_counter() - t
    finally:
        timer.remove()
    out = {k: sum(v) for k, v in timer.times.items()}  # the projector may run more than once (e.g. zoo_prune)
    out["total"] = total
    out["rest"] = total - sum(out[k] for k in mods)
    return out


def best(runs: list[dict]) -> dict:
    return {k: min(r[k] for r in runs) for k in runs[0]}


# -- FLOP model ---------------------------------------------------------------------------------------------------

def flops_clip(n_layers=24, n=577, d=1024, m=4096) -> float:
    return n_layers * (2 * n * (4 * d * d + 2 * d * m) + 4 * n * n * d)


def flops_projector(rows: int, d_in=1024, d=4096) -> float:
    return 2 * rows * (d_in * d + d * d)


def flops_llama_layer(n: int, d=4096, m=11008) -> float:
    return 2 * n * (4 * d * d + 3 * d * m) + 4 * n * n * d


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra = torch.argsort(torch.argsort(a.double())).double()
    rb = torch.argsort(torch.argsort(b.double())).double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def rank_agreement(projector, x: torch.Tensor, m: int = 64, seed: int = 0) -> dict[str, float]:
    """Spearman between the Jacobian score, the zeroth-order score (m directions) and ||M(x)||."""
    from vlm_tools.pruning.zoo_prune.scores import (
        jacobian_gram,
        jacobian_sensitivity,
        projected_norm,
        projector_parts,
        random_directions,
        zeroth_order_sensitivity,
    )

    l1, act, l2 = projector_parts(projector)
    with torch.no_grad():
        jac = jacobian_sensitivity(x, l1, act, jacobian_gram(l1, l2))
        zo = zeroth_order_sensitivity(projector, x, random_directions(m, x.shape[1], seed), 0.01)
        norm = projected_norm(projector, x)
    return {"tokens": x.shape[0], "m": m, "jacobian_vs_zo": spearman(jac, zo), "jacobian_vs_norm": spearman(jac, norm),
            "zo_vs_norm": spearman(zo, norm), "zo_over_jacobian_mean": float((zo / jac).mean()),
            "zo_over_jacobian_cv": float((zo / jac).std() / (zo / jac).mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=3, help="decoder layers built (>= 3 for FastV with K=2)")
    ap.add_argument("--repeats", type=int, default=1, help="prefills per configuration (minimum is kept)")
    ap.add_argument("--zo-directions", type=int, default=8, help="m used to time the zeroth-order estimator")
    ap.add_argument("--spearman-tokens", type=int, default=96)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    if args.layers < 3:
        raise SystemExit("--layers must be >= 3 (FastV prunes from layer 2)")
    import vlm_tools
    from vlm_tools.pruning.zoo_prune.config import ZooPruneConfig
    from vlm_tools.pruning.zoo_prune.method import ZooPrune
    from vlm_tools.pruning.zoo_prune.scores import minmax, sads_select

    t0 = time.perf_counter()
    model = llava15_7b_shaped(args.layers)
    inputs = inputs_for(model)
    n_total = inputs["input_ids"].shape[1]
    n_dec = args.layers
    res: dict = {"threads": torch.get_num_threads(), "torch": torch.__version__, "layers_built": n_dec,
                 "prompt_tokens": n_total}
    print(f"built in {time.perf_counter() - t0:.1f}s; torch {torch.__version__}, {torch.get_num_threads()} threads")

    # -- base prefill ------------------------------------------------------------------------------------------
    base = best([timed_prefill(model, model, inputs) for _ in range(args.repeats)])
    t_layer = statistics.median(base[f"layer{i}"] for i in range(n_dec))
    base32 = base["tower"] + base["projector"] + base["rest"] + 32 * t_layer
    f_base32 = flops_clip() + flops_projector(N_IMAGE) + 32 * flops_llama_layer(n_total)
    res["base"] = {**base, "layer_median": t_layer, "prefill_32_s": base32, "prefill_32_flops": f_base32}
    print(f"base prefill ({n_dec} layers) {base['total']:.2f}s: tower {base['tower']:.2f}s, projector "
          f"{base['projector']:.3f}s, decoder layer {t_layer:.2f}s, rest {base['rest']:.2f}s -> 32 layers "
          f"{base32:.1f}s ({f_base32 / 1e12:.2f} TFLOP)")

    # -- ZOO-Prune scoring -------------------------------------------------------------------------------------
    with torch.no_grad():
        feats = model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True).hidden_states[-2][0, 1:]
    proj = model.model.multi_modal_projector
    k = 192
    zo = ZooPrune(ZooPruneConfig(keep=k, directions=args.zo_directions))
    jac = ZooPrune(ZooPruneConfig(keep=k, estimator="jacobian"))
    with torch.no_grad():
        t = time.perf_counter()
        s_zo = zo.sensitivity(proj, feats)
        t_zo_m = time.perf_counter() - t
        t = time.perf_counter()
        jac.gram(proj)
        t_gram = time.perf_counter() - t
        t_jac = min(_timed(lambda: jac.sensitivity(proj, feats)) for _ in range(3))
        t = time.perf_counter()
        z = proj(feats)
        t_z = time.perf_counter() - t
        t = time.perf_counter()
        sads_select(minmax(s_zo), z, k)
        t_sads = time.perf_counter() - t
    t_zo64 = t_zo_m * 64 / args.zo_directions
    cost_zo = t_zo64 + t_z + t_sads
    cost_jac = t_jac + t_z + t_sads
    f_sads = 2 * k * N_IMAGE * 4096
    f_zo = flops_projector(2 * 64 * N_IMAGE) + flops_projector(N_IMAGE) + f_sads
    f_jac = 2 * N_IMAGE * 1024 * 4096 + 2 * N_IMAGE * 4096 * 4096 + flops_projector(N_IMAGE) + f_sads
    f_gram = 2 * 4096 ** 3 + 2 * 4096 ** 2 * 1024
    res["zoo_prune"] = {
        "zo_time_m": args.zo_directions, "zo_time_at_m": t_zo_m, "zo64_s": t_zo64, "jacobian_s": t_jac,
        "gram_once_s": t_gram, "project_all_s": t_z, "sads_k192_s": t_sads,
        "zo64_fraction_time": cost_zo / base32, "jacobian_fraction_time": cost_jac / base32,
        "zo64_fraction_flops": f_zo / f_base32, "jacobian_fraction_flops": f_jac / f_base32,
        "gram_once_fraction_flops": f_gram / f_base32, "jacobian_speedup_time": cost_zo / cost_jac,
        "jacobian_speedup_flops": f_zo / f_jac,
    }
    print(f"zoo_prune zeroth-order m={args.zo_directions}: {t_zo_m:.2f}s -> m=64 {t_zo64:.1f}s; + project "
          f"{t_z:.2f}s + SADS {t_sads:.2f}s = {cost_zo:.1f}s = {cost_zo / base32:.1%} of a 32-layer prefill "
          f"(FLOPs {f_zo / f_base32:.1%})")
    print(f"zoo_prune jacobian: {t_jac:.2f}s (+ once per model {t_gram:.2f}s) + project + SADS = {cost_jac:.2f}s = "
          f"{cost_jac / base32:.2%} of a 32-layer prefill (FLOPs {f_jac / f_base32:.2%}; precompute "
          f"{f_gram / f_base32:.1%} once)")

    # -- FastV prefill ratio -----------------------------------------------------------------------------------
    res["fastv"] = {}
    for ratio in (0.5, 0.75):
        with vlm_tools.attached(model, "fastv", ratio=ratio, layer=2) as wrapped:
            runs = [timed_prefill(wrapped, model, inputs) for _ in range(args.repeats)]
            kept = wrapped.last_trace.tokens_after[0]
        r = best(runs)
        t_short = statistics.median(r[f"layer{i}"] for i in range(2, n_dec))
        # the machine is shared: normalise the pruned layers by the full layers of the same run (layer 1 also
        # carries the ranking), then apply that to the base run's components
        rel_short = t_short / r["layer0"]
        rel_rank = r["layer1"] / r["layer0"]
        fv32 = base["tower"] + base["projector"] + base["rest"] + t_layer * (1 + rel_rank + 30 * rel_short)
        n_short = n_total - (N_IMAGE - kept)
        f_fv32 = flops_clip() + flops_projector(N_IMAGE) + 2 * flops_llama_layer(n_total) \
            + 30 * flops_llama_layer(n_short)
        res["fastv"][str(ratio)] = {**r, "kept_image_tokens": kept, "pruned_layer_median": t_short,
                                    "pruned_layer_rel": rel_short, "ranking_layer_rel": rel_rank,
                                    "prefill_32_s": fv32, "ratio_time": fv32 / base32, "ratio_flops": f_fv32 / f_base32,
                                    "lm_only_ratio_flops": (2 * flops_llama_layer(n_total) + 30 * flops_llama_layer(
                                        n_short)) / (32 * flops_llama_layer(n_total))}
        print(f"fastv R={ratio:.0%} (K=2, {kept} image tokens kept): pruned layer {rel_short:.3f} x a full layer, "
              f"ranking layer {rel_rank:.3f} x; "
              f"32-layer prefill {fv32:.1f}s = {fv32 / base32:.3f} x base (FLOPs {f_fv32 / f_base32:.3f}; LLM only "
              f"{res['fastv'][str(ratio)]['lm_only_ratio_flops']:.3f})")

    # -- rank agreement ----------------------------------------------------------------------------------------
    gen = torch.Generator().manual_seed(1)
    sub = feats[torch.randperm(feats.shape[0], generator=gen)[:args.spearman_tokens]]
    res["spearman_7b_shaped"] = rank_agreement(proj, sub)
    from vlm_tools.core.models import build_tiny_llava
    from vlm_tools.testing import make_images

    tiny, processor = build_tiny_llava("llava")
    tin = processor(images=make_images()[:1], text=["<image> what is it ?"], return_tensors="pt")
    with torch.no_grad():
        tf = tiny.model.vision_tower(tin["pixel_values"], output_hidden_states=True).hidden_states[-2][0, 1:]
    res["spearman_tiny"] = rank_agreement(tiny.model.multi_modal_projector, tf)
    for key in ("spearman_7b_shaped", "spearman_tiny"):
        s = res[key]
        print(f"{key}: {s['tokens']} tokens, m={s['m']}: jacobian~zo {s['jacobian_vs_zo']:.3f}, jacobian~||Mx|| "
              f"{s['jacobian_vs_norm']:.3f}, zo~||Mx|| {s['zo_vs_norm']:.3f}; zo/jacobian mean "
              f"{s['zo_over_jacobian_mean']:.4f} (cv {s['zo_over_jacobian_cv']:.4f})")
    res["wall_s"] = time.perf_counter() - t0
    print(f"total wall time {res['wall_s']:.0f}s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=2))


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


if __name__ == "__main__":
    main()
