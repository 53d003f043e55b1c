"""Model helpers: tiny LLaVA / LLaVA-NeXT builders (offline, random weights) and loading helpers.

The tiny builders follow transformers' own testing style: configs with a few layers and small widths, random
initialisation, a word-level tokenizer built in memory. They exercise exactly the code paths of real checkpoints
(CLIP or DINOv2 vision tower with a CLS token, LLaMA text model, HF processors) and run in milliseconds on a CPU.
"""

from __future__ import annotations

from typing import Literal

import torch

__all__ = ["TINY_WORDS", "build_tiny_tokenizer", "build_tiny_llava", "tiny_vision_config", "tiny_text_config"]

#: Vocabulary of the tiny word-level tokenizer (prompts in tests and the offline demo use these words).
TINY_WORDS = (
    "what is in the image ? describe it a cat dog red blue green circle square triangle yes no how many "
    "colour shape picture there are of and left right top bottom small large one two three answer question "
    "USER : ASSISTANT please short word this that photo show me"
).split()

SPECIAL = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]


def build_tiny_tokenizer():
    """A word-level fast tokenizer with `<image>`, `<pad>`, BOS/EOS, left padding; built in memory (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL + TINY_WORDS)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split("<image>", behavior="isolated")]
    )
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="left",
        extra_special_tokens={"image_token": "<image>"},
    )
    return tok


def tiny_vision_config(vision: Literal["clip", "dinov2"] = "clip", image_size: int = 32, patch_size: int = 4,
                       layers: int = 4, hidden: int = 32, heads: int = 4):
    """Config of a tiny CLIP or DINOv2 vision tower (CLS + (image_size/patch_size)^2 patches)."""
    from transformers import CLIPVisionConfig, Dinov2Config

    if vision == "clip":
        return CLIPVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                                num_attention_heads=heads, image_size=image_size, patch_size=patch_size,
                                projection_dim=hidden)
    if vision == "dinov2":
        return Dinov2Config(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, mlp_ratio=2,
                            image_size=image_size, patch_size=patch_size, layerscale_value=1.0)
    raise ValueError(f"vision must be 'clip' or 'dinov2', got {vision!r}")


def tiny_text_config(vocab_size: int, layers: int = 2, hidden: int = 32, heads: int = 4, kv_heads: int = 2):
    """Config of a tiny LLaMA text model (GQA, RoPE) like LLaVA's language model."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                       max_position_embeddings=512, pad_token_id=0, bos_token_id=2, eos_token_id=3)


def build_tiny_llava(kind: Literal["llava", "llava_next"] = "llava", vision: Literal["clip", "dinov2"] = "clip",
                     seed: int = 0, image_size: int = 32, patch_size: int = 4, vision_layers: int = 4,
                     text_layers: int = 2, select_strategy: str = "default", feature_layer: int = -2,
                     attn_implementation: str = "sdpa"):
    """Build a tiny random-init LLaVA (or LLaVA-NeXT) model and its processor, fully offline.

    Args:
        kind: "llava" (LLaVA-1.5 layout) or "llava_next" (anyres crops, `image_newline`).
        vision: "clip" or "dinov2" vision tower (both have one CLS token).
        seed: torch seed for the random weights.
        image_size: vision tower input size (per crop for LLaVA-NeXT).
        patch_size: ViT patch size; the grid is `image_size // patch_size` squared.
        vision_layers: number of vision-tower layers.
        text_layers: number of decoder layers.
        select_strategy: `vision_feature_select_strategy` ("default" drops CLS, "full" keeps it).
        feature_layer: `vision_feature_layer`.
        attn_implementation: attention backend for all sub-models.

    Returns:
        `(model, processor)` in eval mode, fp32, on CPU.
    """
    from transformers import (CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration,
                              LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextImageProcessor,
                              LlavaNextProcessor, LlavaProcessor)

    tok = build_tiny_tokenizer()
    image_token_id = tok.convert_tokens_to_ids("<image>")
    vcfg = tiny_vision_config(vision, image_size=image_size, patch_size=patch_size, layers=vision_layers)
    tcfg = tiny_text_config(len(tok), layers=text_layers)
    mean, std = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
    common = dict(vision_config=vcfg, text_config=tcfg, image_token_id=image_token_id,
                  vision_feature_layer=feature_layer, vision_feature_select_strategy=select_strategy)
    torch.manual_seed(seed)
    if kind == "llava":
        cfg = LlavaConfig(**common, image_seq_length=(image_size // patch_size) ** 2)
        model = LlavaForConditionalGeneration(cfg)
        improc = CLIPImageProcessor(size={"shortest_edge": image_size},
                                    crop_size={"height": image_size, "width": image_size},
                                    image_mean=mean, image_std=std)
        proc_cls = LlavaProcessor
    elif kind == "llava_next":
        pinpoints = [[image_size, 2 * image_size], [2 * image_size, image_size], [2 * image_size, 2 * image_size]]
        cfg = LlavaNextConfig(**common, image_grid_pinpoints=pinpoints)
        model = LlavaNextForConditionalGeneration(cfg)
        improc = LlavaNextImageProcessor(size={"shortest_edge": image_size},
                                         crop_size={"height": image_size, "width": image_size},
                                         image_grid_pinpoints=pinpoints, image_mean=mean, image_std=std)
        proc_cls = LlavaNextProcessor
    else:
        raise ValueError(f"kind must be 'llava' or 'llava_next', got {kind!r}")
    model.set_attn_implementation(attn_implementation)
    model.eval()
    processor = proc_cls(image_processor=improc, tokenizer=tok, patch_size=patch_size,
                         vision_feature_select_strategy=select_strategy,
                         num_additional_image_tokens=1)
    return model, processor
