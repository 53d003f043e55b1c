"""lmms-eval model class `VlmToolsModel` (`--model vlm_tools`): HF LLaVA / LLaVA-NeXT through `vlm_tools.wrap`.

Both request types go through the wrapped model, so the method prunes in both:

- `generate_until`: requests grouped by generation kwargs, sorted by prompt length, batched with left padding;
  `WrappedModel.generate` returns the caller's original prompt followed by the new tokens.
- `loglikelihood`: context and continuation are tokenised together; the wrapper shrinks each image's placeholder
  run, so positions shift, but with left padding the continuation stays at the end of every row: its log-probs are
  read from the last `len(continuation)` positions of the shrunk sequence.

Each response carries `PruningTokenCounts` (lmms-eval's `TokenCounts` plus visual tokens before/after pruning,
per-sample prefill latency and peak memory of its batch; batches never mix tasks), which lmms-eval writes into every
logged sample's `token_counts`.

`method=none` is the unpruned reference through the same code path. Model arguments are validated before the
checkpoint loads (see `vlm_tools.integrations.model_args`). lmms-eval's own `--batch_size` / `--device` are accepted
next to `model_args`; a key given in `model_args` wins (`VlmToolsModel.create_from_arg_string`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms
from tqdm import tqdm

from vlm_tools.integrations.model_args import (
    DistInfo,
    PluginArgs,
    merge_cli_args,
    parse_model_args,
    resolve_device,
    resolve_pretrained,
    split_model_args,
)

__all__ = [
    "PeakMemory",
    "PruningTokenCounts",
    "VlmToolsModel",
    "count_generated",
    "join_continuation",
    "load_pretrained",
    "plan_batches",
    "truncate_at_stop",
]

#: Task generation kwargs forwarded to HF `generate` (others, e.g. `until` or `image_aspect_ratio`, are not).
GENERATE_KEYS = frozenset({"max_new_tokens", "min_new_tokens", "temperature", "top_p", "top_k", "num_beams",
                           "do_sample", "repetition_penalty", "length_penalty", "no_repeat_ngram_size"})
_MODEL_INPUTS = ("input_ids", "attention_mask", "pixel_values", "image_sizes")


@dataclass
class PruningTokenCounts(TokenCounts):
    """lmms-eval's per-request `TokenCounts` plus what pruning changed.

    Attributes:
        input_tokens: prompt tokens the LLM saw (after the image placeholders were shrunk).
        output_tokens: generated tokens up to and including EOS (generation) or continuation tokens (loglikelihood).
        visual_tokens: visual tokens that reached the LLM, summed over the request's images.
        visual_tokens_before: visual tokens the LLM would have seen without pruning.
        prefill_ms: per-sample prefill latency: the batch's prefill wall time (from the wrapped call's start to the
            end of the LLM prefill: vision tower, projector, pruning, LLM prefill; CUDA synchronised) divided by
            the requests in the batch. Batches hold one task's requests only.
        batch_size: requests in the batch.
        peak_memory_mb: peak memory during the batch, model weights included (CUDA: `max_memory_allocated` on the
            device; CPU: the process peak resident set size, VmHWM, reset before each batch).
    """

    visual_tokens: int | None = None
    visual_tokens_before: int | None = None
    prefill_ms: float | None = None
    batch_size: int | None = None
    peak_memory_mb: float | None = None

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        for key in ("visual_tokens", "visual_tokens_before", "prefill_ms", "batch_size", "peak_memory_mb"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out


def plan_batches(keys: list[str], lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices of the requests per batch: grouped by `keys` (first-seen order), longest first, `batch_size` each.

    Longest-first puts out-of-memory errors at the start and keeps padding small within a batch.
    """
    groups: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    batches = []
    for members in groups.values():
        members = sorted(members, key=lambda i: -lengths[i])
        batches.extend(members[j:j + batch_size] for j in range(0, len(members), batch_size))
    return batches


def truncate_at_stop(text: str, until: list[str]) -> str:
    """`text` cut at the earliest occurrence of any non-empty stop string."""
    cut = len(text)
    for stop in until:
        if stop:
            pos = text.find(stop)
            if pos != -1:
                cut = min(cut, pos)
    return text[:cut]


def count_generated(tokens: list[int], eos_ids: set[int], pad_id: int | None) -> int:
    """Generated tokens up to and including the first EOS (padding after an early stop is not counted)."""
    for i, tok in enumerate(tokens):
        if tok in eos_ids:
            return i + 1
    return sum(1 for tok in tokens if pad_id is None or tok != pad_id)


def join_continuation(prompt: str, continuation: str) -> str:
    """Context + continuation, with one space between them unless either side already has whitespace there."""
    if not prompt or not continuation or prompt[-1].isspace() or continuation[0].isspace():
        return prompt + continuation
    return f"{prompt} {continuation}"


def _task_of(request: Instance) -> str:
    """The task a request belongs to (`Instance.task_name`, else the task field of its arguments)."""
    name = getattr(request, "task_name", None)
    if name is None and len(request.args) >= 6:
        name = request.args[4]
    return str(name or "")


class PeakMemory:
    """Peak memory of one batch: CUDA allocator peak on a GPU; the process peak RSS (VmHWM) on a CPU (Linux)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def reset(self) -> None:
        """Start a new measurement window."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:  # a kernel control file, not a data file: "5" resets the peak resident set size (Linux >= 4.0)
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass

    def peak_mb(self) -> float | None:
        """Peak memory in MiB since `reset()`, or None where it cannot be measured."""
        if self.device.type == "cuda":
            return round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
        except OSError:
            return None
        return None


def load_pretrained(path: str, device: str, dtype: str = "auto",
                    attn_implementation: str | None = None) -> tuple[torch.nn.Module, Any]:
    """Load an HF LLaVA / LLaVA-NeXT checkpoint and its processor onto `device` (eval mode).

    Args:
        path: checkpoint folder or hub id; `default` is another spelling of the default model's folder
            (`vlm_tools.default_model_path()`, assembled offline on first use), loaded exactly like that folder.
        device: target device.
        dtype: "auto" or a torch dtype name.
        attn_implementation: attention backend, or None for the transformers default.

    Raises:
        ValueError: the checkpoint is of another model type (names the supported ones).
    """
    from transformers import AutoConfig, AutoProcessor, LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    path = resolve_pretrained(path)
    classes = {"llava": LlavaForConditionalGeneration, "llava_next": LlavaNextForConditionalGeneration}
    config = AutoConfig.from_pretrained(path)
    if config.model_type not in classes:
        raise ValueError(f"{path} is a {config.model_type!r} checkpoint; the vlm_tools plugin supports model types "
                         f"{', '.join(classes)} (HF LlavaForConditionalGeneration / LlavaNextForConditionalGeneration)")
    kwargs: dict[str, Any] = {"dtype": dtype if dtype == "auto" else getattr(torch, dtype), "device_map": device}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = classes[config.model_type].from_pretrained(path, **kwargs).eval()
    processor = AutoProcessor.from_pretrained(path)
    return model, processor


class VlmToolsModel(lmms):
    """lmms-eval simple-mode model: a HF LLaVA / LLaVA-NeXT checkpoint wrapped with a vlm_tools method.

    `--model vlm_tools --model_args pretrained=PATH,method=cls_topk,keep=64,batch_size=8,dtype=bfloat16`.
    Plugin arguments: see `vlm_tools.integrations.model_args.PLUGIN_ARGS`; every other key is a field of the
    method's config (cast to its type). In Python, `model=` and `processor=` pass an already loaded model instead
    of `pretrained` (it is wrapped for this instance and unwrapped by `clean()`, which lmms-eval calls at the end).
    """

    is_simple = True

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> VlmToolsModel:
        """Build the model from lmms-eval's `--model_args` string and its own flags.

        `arg_string` is read by `split_model_args` (quoted values keep their commas and lose their quotes; a key
        given twice is an error). `additional_config` is what lmms-eval passes on top (`batch_size`, which its CLI
        always sets, default 1; `max_batch_size`; `device`): a key given in `model_args` wins, a flag fills a key
        that `model_args` leaves out, and an explicit flag that disagrees with `model_args` is logged as ignored.
        """
        merged, ignored = merge_cli_args(split_model_args(arg_string or ""), additional_config)
        if ignored:
            from loguru import logger

            for key, (kept, flag) in ignored.items():
                logger.warning(f"vlm_tools: model_args {key}={kept} wins over lmms-eval's --{key} {flag}")
        return cls(**merged)

    def __init__(self, pretrained: str | None = None, method: str = "none", batch_size: int | str = 1,
                 device: str | None = None, dtype: str = "auto", attn_implementation: str | None = None,
                 max_new_tokens: int = 256, prompt: str = "auto", use_cache: bool = True,
                 max_batch_size: int | None = None, assistant_prefix: str | None = None,
                 model: torch.nn.Module | None = None, processor: Any = None, **method_kwargs: Any) -> None:
        super().__init__()
        # validate everything before touching the checkpoint
        args = parse_model_args({"pretrained": pretrained, "method": method, "batch_size": batch_size,
                                 "device": device, "dtype": dtype, "attn_implementation": attn_implementation,
                                 "max_new_tokens": max_new_tokens, "prompt": prompt, "use_cache": use_cache,
                                 "assistant_prefix": assistant_prefix, **method_kwargs},
                                require_pretrained=model is None)
        if (model is None) != (processor is None):
            raise ValueError("pass both model= and processor= (a loaded model), or pretrained=PATH")
        dist = DistInfo.from_env()
        if dist.world_size > 1:
            from accelerate import Accelerator

            self.accelerator = Accelerator()
            self._rank, self._world_size = self.accelerator.process_index, self.accelerator.num_processes
        if model is None:
            target = resolve_device(args.device, dist, torch.cuda.is_available())
            model, processor = load_pretrained(args.pretrained, target, args.dtype, args.attn_implementation)
        self.args: PluginArgs = args
        self._setup(model, processor)

    def _setup(self, model: torch.nn.Module, processor: Any) -> None:
        from vlm_tools.core.wrapped import wrap

        self._model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.tokenizer.padding_side = "left"  # continuation at the end of every row; batched generation
        self._device = next(model.parameters()).device
        self.image_token = getattr(processor, "image_token", None) or "<image>"
        mode = self.args.prompt
        has_template = getattr(processor, "chat_template", None) is not None
        if mode == "chat" and not has_template:
            raise ValueError("prompt=chat was requested but the processor has no chat template; use prompt=plain")
        self.use_chat = mode == "chat" or (mode == "auto" and has_template)
        # one rule for every checkpoint, however it was spelled: the prompt is the task's text in the processor's
        # own chat template, plus `assistant_prefix` only when it is given (a model whose answers continue a prefix
        # carries it in its saved chat template, so lmms-eval's llava_hf sees the same prompt)
        self.assistant_prefix = self.args.assistant_prefix or ""
        self.memory = PeakMemory(self._device)
        self.wrapped = wrap(model, self.args.method, **self.args.method_kwargs)

    # -- lmms-eval properties ------------------------------------------------------------------------------------
    @property
    def model(self) -> torch.nn.Module:
        """The base HF model (the wrapper's hooks are attached to it until `clean()`)."""
        return self._model

    @property
    def config(self) -> Any:
        return self._model.config

    @property
    def batch_size(self) -> int:
        return self.args.batch_size

    @property
    def device(self) -> torch.device:
        return self._device

    def clean(self) -> None:
        """Remove the wrapper's hooks, then lmms-eval's clean-up (drops module references, frees the CUDA cache)."""
        wrapped = getattr(self, "wrapped", None)
        if wrapped is not None:
            wrapped.unwrap()
        super().clean()

    # -- prompts and inputs --------------------------------------------------------------------------------------
    def build_prompt(self, context: str, n_images: int) -> str:
        """The model prompt for a task context with `n_images` images (chat template, or `<image>\\n{context}`),
        followed by `assistant_prefix` when one is set."""
        return join_continuation(self._base_prompt(context, n_images), self.assistant_prefix)

    def _base_prompt(self, context: str, n_images: int) -> str:
        present = context.count(self.image_token)
        if present and present != n_images:
            raise ValueError(f"the task context holds {present} {self.image_token} tokens but the document has "
                             f"{n_images} images")
        if self.use_chat:
            text = context.replace(self.image_token, "").strip() if present else context
            content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": text}]
            return self.processor.apply_chat_template([{"role": "user", "content": content}],
                                                      add_generation_prompt=True, tokenize=False)
        if present or not n_images:
            return context
        return " ".join([self.image_token] * n_images) + "\n" + context

    def _visuals(self, doc_to_visual: Any, doc_id: int, task: str, split: str) -> list:
        from PIL import Image

        if doc_to_visual is None:
            return []
        raw = doc_to_visual(self.task_dict[task][split][doc_id])
        flat: list = []
        stack = list(raw or [])[::-1]
        while stack:
            item = stack.pop()
            if isinstance(item, (list, tuple)):
                stack.extend(list(item)[::-1])
            elif isinstance(item, Image.Image):
                flat.append(item.convert("RGB"))
            else:
                raise TypeError(f"task {task!r} gives a {type(item).__name__} visual; the vlm_tools plugin "
                                f"evaluates image tasks only (PIL images)")
        return flat

    def _encode(self, prompts: list[str], images: list) -> dict[str, torch.Tensor]:
        batch = self.processor(images=images or None, text=prompts, padding=True, return_tensors="pt")
        inputs = {k: batch[k].to(self._device) for k in _MODEL_INPUTS if k in batch}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self._model.dtype)
        return inputs

    def _counts(self, inputs: dict[str, torch.Tensor], row: int, n_batch: int, output_tokens: int,
                peak: float | None) -> PruningTokenCounts:
        trace = self.wrapped.last_trace
        sample = trace.samples[row]
        prompt_len = int(inputs["attention_mask"][row].sum())
        return PruningTokenCounts(
            input_tokens=prompt_len - (sample.tokens_before - sample.tokens_after), output_tokens=output_tokens,
            visual_tokens=sample.tokens_after, visual_tokens_before=sample.tokens_before,
            prefill_ms=round(trace.prefill_ms / n_batch, 3), batch_size=n_batch, peak_memory_mb=peak)

    def _progress(self, total: int, what: str) -> tqdm:
        return tqdm(total=total, disable=self.rank != 0, desc=f"vlm_tools {self.args.method} {what}")

    # -- generation ----------------------------------------------------------------------------------------------
    def generation_kwargs(self, gen_kwargs: dict | None) -> tuple[dict[str, Any], list[str]]:
        """HF `generate` kwargs and the stop strings from a task's generation kwargs (greedy unless temperature > 0)."""
        g = dict(gen_kwargs or {})
        until = g.pop("until", None)
        until = [until] if isinstance(until, str) else list(until or [])
        out = {k: g[k] for k in GENERATE_KEYS if k in g and g[k] is not None}
        out.setdefault("max_new_tokens", self.args.max_new_tokens)
        out["max_new_tokens"] = int(out["max_new_tokens"])
        temperature = float(out.get("temperature", 0.0) or 0.0)
        sample = temperature > 0 if "temperature" in out else bool(out.get("do_sample", False))
        if not sample:
            for k in ("temperature", "top_p", "top_k"):
                out.pop(k, None)
        out["do_sample"] = sample
        out["num_beams"] = int(out.get("num_beams", 1))
        out["use_cache"] = self.args.use_cache
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        out["pad_token_id"] = pad
        if getattr(self._model.generation_config, "eos_token_id", None) is None:
            out["eos_token_id"] = self.tokenizer.eos_token_id
        return out, until

    def _eos_ids(self, kwargs: dict[str, Any]) -> set[int]:
        eos = kwargs.get("eos_token_id", getattr(self._model.generation_config, "eos_token_id", None))
        if eos is None:
            eos = self.tokenizer.eos_token_id
        return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None}

    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        """Generate for each request through the wrapped model, `batch_size` requests of one task per call.

        lmms-eval hands over the requests of every task at once; batches never mix tasks, so each request's
        `prefill_ms` and `peak_memory_mb` belong to its own task.
        """
        args = [r.args for r in requests]
        keys = [json.dumps([_task_of(r), a[1]], sort_keys=True, default=str) for r, a in zip(requests, args)]
        lengths = [len(a[0]) for a in args]
        results: list[GenerationResult | None] = [None] * len(requests)
        bar = self._progress(len(requests), "generate")
        for idxs in plan_batches(keys, lengths, self.batch_size):
            batch = [args[i] for i in idxs]
            visuals = [self._visuals(a[2], a[3], a[4], a[5]) for a in batch]
            prompts = [self.build_prompt(a[0], len(v)) for a, v in zip(batch, visuals)]
            kwargs, until = self.generation_kwargs(batch[0][1])
            inputs = self._encode(prompts, [im for v in visuals for im in v])
            self.memory.reset()
            with torch.inference_mode():
                out = self.wrapped.generate(**inputs, **kwargs)
            peak = self.memory.peak_mb()
            seqs = out if isinstance(out, torch.Tensor) else out.sequences
            new = seqs[:, inputs["input_ids"].shape[1]:].cpu()
            texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
            eos = self._eos_ids(kwargs)
            for row, i in enumerate(idxs):
                n_out = count_generated(new[row].tolist(), eos, kwargs.get("pad_token_id"))
                text = truncate_at_stop(texts[row], until)
                results[i] = GenerationResult(text=text, token_counts=self._counts(inputs, row, len(idxs), n_out, peak))
            bar.update(len(idxs))
        bar.close()
        return results

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("the vlm_tools plugin evaluates single-turn tasks (generate_until, loglikelihood)")

    # -- loglikelihood -------------------------------------------------------------------------------------------
    def _ll_request(self, req: Instance) -> tuple[str, str, list]:
        a = req.args
        if len(a) == 2:  # unconditional request of a multiple-choice task: ("", continuation), no image
            return "", str(a[1]), []
        context, target, doc_to_visual, doc_id, task, split = a[:6]
        continuation = target(self.task_dict[task][split][doc_id]) if callable(target) else target
        if isinstance(continuation, (list, tuple)):
            continuation = continuation[0]
        images = self._visuals(doc_to_visual, doc_id, task, split)
        return self.build_prompt(context, len(images)), str(continuation), images

    def loglikelihood(self, requests: list[Instance]) -> list[GenerationResult]:
        """Summed log-probability of each continuation and whether greedy decoding would produce it.

        Each response is a `GenerationResult` whose `text` is the `(logprob, is_greedy)` pair: lmms-eval 0.7.3
        passes every response through `unwrap_generation_output`, which turns a bare tuple into its string but
        keeps a `GenerationResult`'s payload as is (and its token counts). Task `process_results` therefore
        receives `[(logprob, is_greedy)]`, as for lmms-eval's own models.
        """
        items = [self._ll_request(r) for r in requests]
        fulls = [join_continuation(p, c) for p, c, _ in items]
        n_cont = [max(0, len(self.tokenizer(f).input_ids) - len(self.tokenizer(p).input_ids)) if c else 0
                  for (p, c, _), f in zip(items, fulls)]
        results: list[GenerationResult | None] = [None] * len(requests)
        bar = self._progress(len(requests), "loglikelihood")
        for idxs in plan_batches([_task_of(r) for r in requests], [len(f) for f in fulls], self.batch_size):
            inputs = self._encode([fulls[i] for i in idxs], [im for i in idxs for im in items[i][2]])
            keep = max(n_cont[i] for i in idxs) + 1
            self.memory.reset()
            with torch.inference_mode():
                logits = self.wrapped(**inputs, logits_to_keep=keep).logits[:, -keep:].float()
            peak = self.memory.peak_mb()
            ids = inputs["input_ids"]
            for row, i in enumerate(idxs):
                n = n_cont[i]
                if n == 0:
                    value: tuple[float, bool] = (0.0, True)
                else:
                    logprobs = torch.log_softmax(logits[row, keep - 1 - n:keep - 1], dim=-1)
                    target = ids[row, ids.shape[1] - n:].to(logprobs.device)
                    picked = logprobs.gather(1, target[:, None])[:, 0]
                    value = (float(picked.sum()), bool((logprobs.argmax(-1) == target).all()))
                results[i] = GenerationResult(text=value, token_counts=self._counts(inputs, row, len(idxs), n, peak))
            bar.update(len(idxs))
        bar.close()
        return results
