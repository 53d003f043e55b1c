#!/usr/bin/env python
"""Train the default model's projector (then a rank-8 LoRA on SmolLM2's q/v projections) on easy-vqa, on CPU.

Recipe (see ``../shared/reference/offline_assets.md`` section 6 and ``benchmarks/RESULTS.md``):

* DINOv2-S penultimate-layer patch features of all easy-vqa images at 112 px (8 x 8 = 64 tokens) are computed once
  with the default model's own image processor and cached in fp16;
* stage 1 trains the 2-layer GELU projector (LLaVA's ``multi_modal_projector``) with the LM frozen;
* stage 2 adds LoRA (r=8, alpha=16) on the LM's ``q_proj``/``v_proj`` and keeps training the projector;
* the loss is cross-entropy on the answer word and ``<|im_end|>`` only; the prompt is
  :func:`vlm_tools.loading.format_prompt` (the default processor's chat template); the LM runs in bf16;
* a step takes ``--images-per-step`` images with all their questions, packed with a shared prefix (the image tokens
  go through the LM once per image; a block mask keeps each question's computation identical to its own sequence).

The run checkpoints every ``--ckpt-every`` steps into ``--work-dir`` and resumes from the latest checkpoint when
started again with the same arguments. At the end it writes ``projector.safetensors``, ``lora.safetensors``,
``lora_config.json`` into ``--out-dir``, assembles the HF LLaVA folder from them and evaluates it through
``generate`` on the fixed 1,000-question easy-vqa test subset: with the right image, with a mismatched image
(seeded derangement of the images) and against the per-wording training prior; the numbers go to
``--out-dir/train_results.json`` and the log to ``--out-dir/train_log.txt``.

Usage::

    python scripts/train_default_model.py                 # full run (resumes if interrupted)
    python scripts/train_default_model.py --eval-only     # re-evaluate the weights in --out-dir
    python scripts/train_default_model.py --bench 5       # time 5 steps of each stage and exit
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import pickle
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from vlm_tools.assets import convert, default_model, vqa_eval  # noqa: E402 (after the sys.path line)
from vlm_tools.core.io import write_bytes_atomic  # noqa: E402
from vlm_tools.loading import auto_dtype, format_prompt  # noqa: E402

LOG = logging.getLogger("train_default_model")
EVAL_IDS = REPO / "eval_configs" / "data" / "shapes_vqa" / "eval1000_ids.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--images-per-step", type=int, default=4, help="images per step, each with all its questions")
    p.add_argument("--stage1-steps", type=int, default=120, help="projector-only steps")
    p.add_argument("--stage2-steps", type=int, default=200, help="projector + LoRA steps (may be raised on resume)")
    p.add_argument("--lr1", type=float, default=1e-3, help="projector learning rate, stage 1")
    p.add_argument("--lr2-lora", type=float, default=5e-4, help="LoRA learning rate, stage 2")
    p.add_argument("--lr2-proj", type=float, default=2e-4, help="projector learning rate, stage 2")
    p.add_argument("--warmup", type=int, default=10, help="linear warm-up steps at the start of each stage")
    p.add_argument("--decay-steps", type=int, default=0,
                   help="the last N steps of stage 2 decay the learning rates linearly to 10%% (0: constant)")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-alpha", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    p.add_argument("--eval-every", type=int, default=40, help="quick first-token eval every N steps (0: never)")
    p.add_argument("--eval-quick-n", type=int, default=300, help="questions in the quick eval")
    p.add_argument("--ckpt-every", type=int, default=10)
    p.add_argument("--work-dir", type=Path, default=None, help="feature cache + checkpoints (default: cache/train)")
    p.add_argument("--out-dir", type=Path, default=REPO / "vlm_tools" / "assets" / "weights")
    p.add_argument("--eval-only", action="store_true", help="skip training; evaluate the weights in --out-dir")
    p.add_argument("--eval-dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                   help="dtype of the assembled LLaVA in the final evaluation (the LM was trained in bf16); auto: "
                   "vlm_tools.loading.auto_dtype (fp32 on CPUs without bf16 units, where bf16 is emulated)")
    p.add_argument("--export-checkpoint", action="store_true",
                   help="write the weights of the latest checkpoint to --out-dir (e.g. while training runs) and exit")
    p.add_argument("--bench", type=int, default=0, help="time N steps of each stage and exit")
    return p.parse_args(argv)


def setup_logging(log_path: Path) -> None:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S")
    LOG.setLevel(logging.INFO)
    for handler in (logging.FileHandler(log_path, mode="a"), logging.StreamHandler(sys.stdout)):
        handler.setFormatter(fmt)
        LOG.addHandler(handler)


# ----------------------------------------------------------------------------------------------- data + features
def load_easy_vqa() -> dict[str, Any]:
    import easy_vqa

    tr_q, tr_a, tr_i = easy_vqa.get_train_questions()
    te_q, te_a, te_i = easy_vqa.get_test_questions()
    return {
        "train": (tr_q, tr_a, tr_i, easy_vqa.get_train_image_paths()),
        "test": (te_q, te_a, te_i, easy_vqa.get_test_image_paths()),
    }


def image_features(split: str, paths: dict[int, str], processor: Any, work: Path) -> torch.Tensor:
    """DINOv2 penultimate-layer patch features (CLS dropped) of every image of a split, cached in fp16.

    Returns:
        ``[max_id + 1, 64, 384]`` fp16 tensor indexed by image id.
    """
    from PIL import Image
    from safetensors.torch import load_file, save
    from transformers import Dinov2Model

    cache = work / f"features_{split}_{default_model.IMAGE_SIZE}px.safetensors"
    if cache.is_file():
        return load_file(str(cache))["features"]
    folder = convert.ensure_dinov2_hf()
    tower = Dinov2Model.from_pretrained(str(folder), dtype=torch.float32).eval()
    ids = sorted(paths)
    n_tok = default_model.num_image_tokens()
    feats = torch.zeros(max(ids) + 1, n_tok, tower.config.hidden_size, dtype=torch.float16)
    start = time.perf_counter()
    for s in range(0, len(ids), 64):
        chunk = ids[s : s + 64]
        images = [Image.open(paths[i]).convert("RGB") for i in chunk]
        pixels = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            out = tower(pixels, output_hidden_states=True)
        feats[chunk] = out.hidden_states[-2][:, 1:].to(torch.float16)
    LOG.info("features %s: %d images in %.1f s", split, len(ids), time.perf_counter() - start)
    write_bytes_atomic(cache, save({"features": feats}))
    return feats


class Tokenized:
    """Token ids of prompts around the image placeholder run, and of the answers."""

    def __init__(self, processor: Any) -> None:
        self.tok = processor.tokenizer
        self.image_id = self.tok.convert_tokens_to_ids(default_model.IMAGE_TOKEN)
        self.n_img = default_model.num_image_tokens()
        self.end_ids = self.tok("<|im_end|>", add_special_tokens=False).input_ids
        self._cache: dict[str, tuple[list[int], list[int]]] = {}
        self._answers: dict[str, list[int]] = {}
        self.processor = processor

    def prompt(self, question: str) -> tuple[list[int], list[int]]:
        if question not in self._cache:
            text = format_prompt(self.processor, question)
            before, after = text.split(default_model.IMAGE_TOKEN)
            pre = self.tok(before, add_special_tokens=False).input_ids
            post = self.tok(after, add_special_tokens=False).input_ids
            self._cache[question] = (pre, post)
        return self._cache[question]

    def answer(self, answer: str) -> list[int]:
        if answer not in self._answers:
            self._answers[answer] = self.tok(" " + answer, add_special_tokens=False).input_ids + self.end_ids
        return self._answers[answer]

    def check(self, question: str, answer: str) -> None:
        """Assert that the piecewise ids equal the processor's own tokenisation of the full text."""
        from PIL import Image

        text = format_prompt(self.processor, question)
        full = self.processor(images=Image.new("RGB", (64, 64)), text=text + " " + answer + "<|im_end|>")
        pre, post = self.prompt(question)
        mine = pre + [self.image_id] * self.n_img + post + self.answer(answer)
        if list(full["input_ids"][0]) != mine:
            raise AssertionError(f"tokenisation mismatch:\n{full['input_ids'][0]}\n{mine}")


def make_batch(
    tk: Tokenized, feats: torch.Tensor, questions: list[str], answers: list[str] | None, image_ids: list[int]
) -> dict[str, torch.Tensor]:
    """Right-padded ids, attention mask, labels (answer tokens only), image positions and features."""
    seqs, labels, img_pos = [], [], []
    for k, q in enumerate(questions):
        pre, post = tk.prompt(q)
        ans = tk.answer(answers[k]) if answers is not None else []
        ids = pre + [tk.image_id] * tk.n_img + post + ans
        seqs.append(ids)
        labels.append([-100] * (len(ids) - len(ans)) + ans)
        img_pos.append(len(pre))
    width = max(len(s) for s in seqs)
    pad = tk.tok.pad_token_id
    input_ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    lab = torch.full((len(seqs), width), -100, dtype=torch.long)
    last = torch.zeros(len(seqs), dtype=torch.long)
    for i, (s, l_) in enumerate(zip(seqs, labels, strict=True)):
        input_ids[i, : len(s)] = torch.tensor(s)
        attn[i, : len(s)] = 1
        lab[i, : len(s)] = torch.tensor(l_)
        last[i] = len(s) - 1 - (len(tk.answer(answers[i])) if answers is not None else 0)
    return {
        "input_ids": input_ids,
        "attention_mask": attn,
        "labels": lab,
        "img_pos": torch.tensor(img_pos),
        "feats": feats[torch.tensor(image_ids)],
        "last_prompt": last,
    }


def make_packed_batch(
    tk: Tokenized, feats: torch.Tensor, groups: list[tuple[int, list[tuple[str, str]]]], dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Shared-prefix packing: one row per image holding the prompt prefix and image tokens once, then every question
    segment (rest of the prompt + answer) of that image.

    A block-diagonal 4-D mask lets each segment see the shared prefix and itself only, and each segment's position
    ids continue from the prefix, so every question is computed exactly as in its own sequence (the same logits as
    :func:`make_batch`) while the image tokens go through the LM once per image instead of once per question.
    """
    seqs, pos, seg_ids, labels, img_pos = [], [], [], [], []
    for image_id, qas in groups:
        pre, _ = tk.prompt(qas[0][0])
        ids = pre + [tk.image_id] * tk.n_img
        prefix_len = len(ids)
        p = list(range(prefix_len))
        sid = [0] * prefix_len
        lab = [-100] * prefix_len
        for k, (q, a) in enumerate(qas, start=1):
            pre_k, post = tk.prompt(q)
            if pre_k != pre:
                raise AssertionError("prompt prefixes differ between questions")
            ans = tk.answer(a)
            seg = post + ans
            ids += seg
            p += list(range(prefix_len, prefix_len + len(seg)))
            sid += [k] * len(seg)
            lab += [-100] * len(post) + ans
        seqs.append(ids)
        pos.append(p)
        seg_ids.append(sid)
        labels.append(lab)
        img_pos.append(len(pre))
    width = max(len(x) for x in seqs)
    n = len(seqs)
    input_ids = torch.full((n, width), tk.tok.pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((n, width), dtype=torch.long)
    segment = torch.full((n, width), -1, dtype=torch.long)
    lab = torch.full((n, width), -100, dtype=torch.long)
    for i in range(n):
        length = len(seqs[i])
        input_ids[i, :length] = torch.tensor(seqs[i])
        position_ids[i, :length] = torch.tensor(pos[i])
        segment[i, :length] = torch.tensor(seg_ids[i])
        lab[i, :length] = torch.tensor(labels[i])
    q_seg, k_seg = segment[:, :, None], segment[:, None, :]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    allowed = causal & (k_seg >= 0) & ((k_seg == 0) | (k_seg == q_seg))
    allowed |= torch.eye(width, dtype=torch.bool)  # padding rows attend to themselves (no NaN); they carry no loss
    mask = torch.zeros((n, 1, width, width), dtype=dtype)
    mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
    # labels shifted inside each segment: position t predicts token t+1 of the same segment
    targets = torch.full_like(lab, -100)
    same_seg = segment[:, 1:] == segment[:, :-1]
    targets[:, :-1] = torch.where(same_seg, lab[:, 1:], torch.full_like(lab[:, 1:], -100))
    return {
        "input_ids": input_ids,
        "position_ids": position_ids,
        "mask4d": mask,
        "targets": targets,
        "img_pos": torch.tensor(img_pos),
        "feats": feats[torch.tensor([g[0] for g in groups])],
    }


def packed_loss(lm: Any, projector: torch.nn.Module, batch: dict[str, torch.Tensor], n_img: int) -> torch.Tensor:
    """Cross-entropy on the answer tokens of a :func:`make_packed_batch` batch."""
    embeds = embed_batch(lm, projector, batch, n_img)
    hidden = lm.model(
        inputs_embeds=embeds, attention_mask=batch["mask4d"], position_ids=batch["position_ids"]
    ).last_hidden_state
    rows, cols = (batch["targets"] != -100).nonzero(as_tuple=True)
    logits = lm.lm_head(hidden[rows, cols]).float()
    return torch.nn.functional.cross_entropy(logits, batch["targets"][rows, cols])


# ----------------------------------------------------------------------------------------------- model pieces
def build_modules(args: argparse.Namespace, processor: Any) -> tuple[Any, torch.nn.Module]:
    """The frozen bf16 LM (LlamaForCausalLM, resized for ``<image>``) and a fresh fp32 LLaVA projector."""
    from transformers import AutoModelForCausalLM, Dinov2Config
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    folders = convert.ensure_converted()
    lm = AutoModelForCausalLM.from_pretrained(
        str(folders["smollm2"]), dtype=torch.bfloat16, attn_implementation=args.attn
    )
    lm.requires_grad_(False)
    vision_cfg = Dinov2Config.from_pretrained(str(folders["dinov2_hf"]))
    cfg = default_model.build_llava_config(vision_cfg, lm.config, tk_image_id(processor))
    torch.manual_seed(args.seed)
    projector = LlavaMultiModalProjector(cfg).float()
    return lm, projector


def tk_image_id(processor: Any) -> int:
    return processor.tokenizer.convert_tokens_to_ids(default_model.IMAGE_TOKEN)


def embed_batch(lm: Any, projector: torch.nn.Module, batch: dict[str, torch.Tensor], n_img: int) -> torch.Tensor:
    """Token embeddings with the projected image features written into the placeholder run."""
    ids = batch["input_ids"].clamp(max=lm.get_input_embeddings().weight.shape[0] - 1)
    embeds = lm.get_input_embeddings()(ids)
    img = projector(batch["feats"].float()).to(embeds.dtype)
    rows = []
    for i in range(ids.shape[0]):
        p = int(batch["img_pos"][i])
        rows.append(torch.cat([embeds[i, :p], img[i], embeds[i, p + n_img :]], dim=0))
    return torch.stack(rows)


def add_lora(lm: Any, args: argparse.Namespace) -> Any:
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    return get_peft_model(lm, cfg)


def lora_state(named: Any) -> dict[str, torch.Tensor]:
    """LoRA A/B matrices keyed relative to the LlamaModel (``layers.N.self_attn.q_proj.lora_A.weight``).

    Args:
        named: ``(name, tensor)`` pairs as from ``PeftModel.named_parameters()`` (other names are skipped).
    """
    out = {}
    for name, param in named:
        if "lora_" in name:
            key = name.split(".model.", 1)[1] if ".model.model." in name else name
            key = key.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")
            out[key.removeprefix("model.")] = param.detach().float().contiguous().clone()
    return out


def lr_at(step: int, base: float, warmup: int, total: int | None = None, decay: int = 0) -> float:
    """Linear warm-up, constant, then (when ``decay``) a linear decay to 10% over the last ``decay`` of ``total`` steps.

    The constant phase lets a run be extended on resume; the decay only touches the final steps.
    """
    factor = min(1.0, (step + 1) / warmup)
    if decay and total is not None and step >= total - decay:
        factor *= 1.0 - 0.9 * (step - (total - decay) + 1) / decay
    return base * factor


# ----------------------------------------------------------------------------------------------- quick eval
@torch.no_grad()
def quick_eval(lm: Any, projector: torch.nn.Module, tk: Tokenized, feats: torch.Tensor, data: Any, ids: list[int]):
    """First-token greedy accuracy (answers' first tokens are distinct), teacher-forced, no generation."""
    qs, ans, img = data
    first = {a: tk.answer(a)[0] for a in set(ans)}
    hits = {"overall": [], "shape": [], "color": [], "yesno": []}
    lm.eval()
    for s in range(0, len(ids), 32):
        chunk = ids[s : s + 32]
        batch = make_batch(tk, feats, [qs[i] for i in chunk], None, [img[i] for i in chunk])
        embeds = embed_batch(lm, projector, batch, tk.n_img)
        hidden = lm.model(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).last_hidden_state
        pred = lm.lm_head(hidden[torch.arange(len(chunk)), batch["last_prompt"]]).argmax(-1)
        for k, i in enumerate(chunk):
            ok = int(pred[k]) == first[ans[i]]
            hits["overall"].append(ok)
            hits[vqa_eval.answer_kind(ans[i])].append(ok)
    return {k: round(100 * sum(v) / max(1, len(v)), 1) for k, v in hits.items()}


# ----------------------------------------------------------------------------------------------- training
def train(args: argparse.Namespace, processor: Any, work: Path) -> None:
    data = load_easy_vqa()
    tr_q, tr_a, tr_i, tr_paths = data["train"]
    te_q, te_a, te_i, te_paths = data["test"]
    tk = Tokenized(processor)
    tk.check(tr_q[0], tr_a[0])
    feats_tr = image_features("train", tr_paths, processor, work)
    feats_te = image_features("test", te_paths, processor, work)
    eval_ids = json.loads(EVAL_IDS.read_text())["ids"][: args.eval_quick_n]

    lm, projector = build_modules(args, processor)
    total = args.stage1_steps + args.stage2_steps
    per_image: dict[int, list[tuple[str, str]]] = {}
    for q, a, i in zip(tr_q, tr_a, tr_i, strict=True):
        per_image.setdefault(i, []).append((q, a))
    image_order = [int(i) for i in np.random.default_rng(args.seed).permutation(sorted(per_image))]
    image_order = image_order * (1 + (total * args.images_per_step) // len(image_order))

    ckpt_path = work / "checkpoint.pt"
    step = 0
    state = load_checkpoint(ckpt_path) if ckpt_path.is_file() and not args.bench else None
    if state is not None and state["args"] != ckpt_args(args):
        raise SystemExit(f"{ckpt_path} was written with other arguments ({state['args']}); remove it to start over")

    def make_stage(stage: int) -> tuple[Any, Any]:
        nonlocal lm
        if stage == 1:
            model = lm
            groups = [{"params": list(projector.parameters()), "lr": args.lr1, "base": args.lr1}]
        else:
            model = add_lora(lm, args)
            lora_params = [p for n, p in model.named_parameters() if "lora_" in n]
            groups = [
                {"params": lora_params, "lr": args.lr2_lora, "base": args.lr2_lora},
                {"params": list(projector.parameters()), "lr": args.lr2_proj, "base": args.lr2_proj},
            ]
        return model, torch.optim.AdamW(groups, weight_decay=0.0)

    stage = 1
    model, opt = make_stage(1)
    if state is not None:
        step = state["step"]
        projector.load_state_dict(state["projector"])
        if step >= args.stage1_steps:
            stage = 2
            model, opt = make_stage(2)
            model.load_state_dict(state["lora"], strict=False)
        opt.load_state_dict(state["opt"])
        random.setstate(state["py_rng"])
        torch.set_rng_state(state["torch_rng"])
        LOG.info("resumed from %s at step %d (stage %d)", ckpt_path, step, stage)

    def save_ckpt() -> None:
        ck = {
            "step": step,
            "args": ckpt_args(args),
            "projector": projector.state_dict(),
            "lora": {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n},
            "opt": opt.state_dict(),
            "py_rng": random.getstate(),
            "torch_rng": torch.get_rng_state(),
        }
        save_checkpoint(ckpt_path, ck)

    t_start, t_log, seen_log, loss_acc = time.perf_counter(), time.perf_counter(), 0, 0.0
    questions_seen = sum(len(per_image[i]) for i in image_order[: step * args.images_per_step])
    bench_times: list[float] = []
    while step < total:
        if stage == 1 and step >= args.stage1_steps:
            if not args.bench:
                save_ckpt()
            LOG.info("stage 1 done at step %d; adding LoRA r=%d alpha=%d", step, args.lora_r, args.lora_alpha)
            stage = 2
            model, opt = make_stage(2)
        stage_step = step if stage == 1 else step - args.stage1_steps
        for g in opt.param_groups:
            if stage == 1:
                g["lr"] = lr_at(stage_step, g["base"], args.warmup)
            else:
                g["lr"] = lr_at(stage_step, g["base"], args.warmup, args.stage2_steps, args.decay_steps)
        chunk = image_order[step * args.images_per_step : (step + 1) * args.images_per_step]
        batch = make_packed_batch(tk, feats_tr, [(i, per_image[i]) for i in chunk], torch.bfloat16)
        t0 = time.perf_counter()
        model.train()
        loss = packed_loss(lm, projector, batch, tk.n_img)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        loss_acc += float(loss.detach())
        seen_log += 1
        if args.bench:
            bench_times.append(time.perf_counter() - t0)
            if stage == 1 and len(bench_times) == args.bench:
                LOG.info("bench stage 1: %.3f s/step (%s)", np.median(bench_times[1:]), args.attn)
                bench_times, step = [], args.stage1_steps
            elif stage == 2 and len(bench_times) == args.bench:
                LOG.info("bench stage 2: %.3f s/step (%s)", np.median(bench_times[1:]), args.attn)
                return
            continue
        questions_seen += sum(len(per_image[i]) for i in chunk)
        if step % 5 == 0:
            now = time.perf_counter()
            LOG.info(
                "step %d/%d stage %d loss %.4f lr %.2e %.2f s/step questions %d elapsed %.1f min",
                step, total, stage, loss_acc / seen_log, opt.param_groups[0]["lr"], (now - t_log) / seen_log,
                questions_seen, (now - t_start) / 60,
            )
            t_log, seen_log, loss_acc = now, 0, 0.0
        if step % args.ckpt_every == 0:
            save_ckpt()
        if args.eval_every and (step % args.eval_every == 0 or step == total):
            acc = quick_eval(lm, projector, tk, feats_te, (te_q, te_a, te_i), eval_ids)
            LOG.info("quick eval (first token, %d test questions) at step %d: %s", len(eval_ids), step, acc)
    save_ckpt()
    LOG.info("training done: %d steps in %.1f min this session", step, (time.perf_counter() - t_start) / 60)
    export_weights(args, projector.state_dict(), model.named_parameters())


def save_checkpoint(path: Path, checkpoint: dict[str, Any]) -> None:
    """Write a training checkpoint atomically (tensors, optimizer state, RNG states: ``weights_only``-loadable)."""
    buf = io.BytesIO()
    torch.save(checkpoint, buf)
    write_bytes_atomic(path, buf.getvalue())


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` with ``torch.load(weights_only=True)``.

    Raises:
        SystemExit: the file holds anything but tensors and plain Python values (nothing of it is run).
    """
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as err:
        raise SystemExit(f"{path}: not a checkpoint written by this script; torch.load(weights_only=True) refused "
                         f"it ({str(err).splitlines()[0]})") from None


def ckpt_args(args: argparse.Namespace) -> dict[str, Any]:
    keep = ("seed", "images_per_step", "stage1_steps", "lr1", "lr2_lora", "lr2_proj", "warmup", "lora_r",
            "lora_alpha", "attn")
    return {k: getattr(args, k) for k in keep}


def export_weights(args: argparse.Namespace, projector_state: dict[str, torch.Tensor], lora_named: Any) -> None:
    """Write ``projector.safetensors`` and (when LoRA was trained) ``lora.safetensors`` + ``lora_config.json``."""
    from safetensors.torch import save

    out = args.out_dir
    meta = {"format": "pt", "source": "scripts/train_default_model.py"}
    state = {k: v.detach().float().contiguous() for k, v in projector_state.items()}
    write_bytes_atomic(out / default_model.PROJECTOR_FILE, save(state, metadata=meta))
    lora = lora_state(lora_named)
    if lora:
        write_bytes_atomic(out / default_model.LORA_FILE, save(lora, metadata=meta))
        convert.write_json_atomic(
            out / default_model.LORA_CONFIG_FILE,
            {"r": args.lora_r, "lora_alpha": args.lora_alpha, "target_modules": ["q_proj", "v_proj"],
             "base": "model.language_model (LlamaModel) of the default LLaVA"},
        )
    LOG.info("exported weights to %s", out)


# ----------------------------------------------------------------------------------------------- final eval
def eval_dtype(args: argparse.Namespace) -> torch.dtype:
    """The final evaluation's dtype: ``--eval-dtype``, ``auto`` being :func:`vlm_tools.loading.auto_dtype` on CPU."""
    return auto_dtype("cpu") if args.eval_dtype == "auto" else getattr(torch, args.eval_dtype)


def final_eval(args: argparse.Namespace) -> dict[str, Any]:
    """Evaluate the exported weights through the assembled HF LLaVA with ``generate``."""
    from PIL import Image

    data = load_easy_vqa()
    tr_q, tr_a, _, _ = data["train"]
    te_q, te_a, te_i, te_paths = data["test"]
    ids = json.loads(EVAL_IDS.read_text())["ids"]
    model, processor = default_model.assemble_untrained()
    LOG.info("applied trained weights: %s", default_model.apply_trained_weights(model, args.out_dir))
    model = model.to(eval_dtype(args))
    refs = [te_a[i] for i in ids]
    questions = [te_q[i] for i in ids]
    images = {i: Image.open(te_paths[i]).convert("RGB") for i in sorted({te_i[j] for j in ids})}
    results: dict[str, Any] = {
        "n_questions": len(ids),
        "subset": str(EVAL_IDS.relative_to(REPO)),
        "eval_dtype": str(eval_dtype(args)).removeprefix("torch."),
        "decoding": "greedy, max_new_tokens=4, first word",
    }
    t0 = time.perf_counter()
    preds = vqa_eval.answer_questions(model, processor, [images[te_i[i]] for i in ids], questions, batch_size=16)
    results["seconds_right_image"] = round(time.perf_counter() - t0, 1)
    results["right_image"] = vqa_eval.accuracy_by_kind(preds, refs)
    LOG.info("right image: %s", results["right_image"])
    mapping = vqa_eval.derangement([te_i[i] for i in ids], seed=args.seed)
    preds_mm = vqa_eval.answer_questions(
        model, processor, [images[mapping[te_i[i]]] for i in ids], questions, batch_size=16
    )
    results["mismatched_image"] = vqa_eval.accuracy_by_kind(preds_mm, refs)
    results["mismatched_image"]["derangement_seed"] = args.seed
    LOG.info("mismatched image: %s", results["mismatched_image"])
    prior, fallback = vqa_eval.question_prior(tr_q, tr_a)
    preds_prior = [prior.get(q, fallback) for q in questions]
    results["question_prior"] = vqa_eval.accuracy_by_kind(preds_prior, refs)
    results["question_prior"]["unseen_wordings"] = sum(q not in prior for q in questions)
    LOG.info("per-wording training prior: %s", results["question_prior"])
    results["answers_equal_prior_yesno"] = _agreement(preds, preds_prior, refs)
    return results


def _agreement(preds: list[str], prior: list[str], refs: list[str]) -> float:
    pairs = [(p, q) for p, q, r in zip(preds, prior, refs, strict=True) if vqa_eval.answer_kind(r) == "yesno"]
    return sum(p == q for p, q in pairs) / max(1, len(pairs))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    work = args.work_dir or convert.cache_home() / "train_work"
    work.mkdir(parents=True, exist_ok=True)
    setup_logging((work / "bench_log.txt") if args.bench else (args.out_dir / "train_log.txt"))
    LOG.info("command: %s", " ".join([Path(sys.executable).name, *sys.argv]))
    LOG.info("args: %s", vars(args))
    LOG.info("torch %s, threads %d, cache %s", torch.__version__, torch.get_num_threads(), convert.cache_home())
    t0 = time.perf_counter()
    if args.export_checkpoint:
        state = load_checkpoint(work / "checkpoint.pt")
        export_weights(args, state["projector"], state["lora"].items())
        LOG.info("exported checkpoint of step %d", state["step"])
        return
    folders = convert.ensure_converted()
    processor = default_model.build_processor(folders["smollm2"])
    if not args.eval_only:
        train(args, processor, work)
        if args.bench:
            return
        LOG.info("training wall time this session: %.1f min", (time.perf_counter() - t0) / 60)
    results = final_eval(args)
    results["command"] = " ".join(["python", "scripts/train_default_model.py", *(argv or sys.argv[1:])])
    results["train_args"] = {**ckpt_args(args), "stage2_steps": args.stage2_steps, "decay_steps": args.decay_steps}
    name = f"eval_results_{results['eval_dtype']}.json" if args.eval_only else "train_results.json"
    convert.write_json_atomic(args.out_dir / name, results)
    LOG.info("wrote %s", args.out_dir / name)


if __name__ == "__main__":
    main()
