"""Shared fixtures: tiny random LLaVA / LLaVA-NeXT models built from configs, and their inputs (offline)."""

from __future__ import annotations

import os

import pytest
import torch

from vlm_tools.testing import TinyCase

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session", params=["llava-clip", "llava_next-clip", "llava-dinov2"])
def tiny(request) -> TinyCase:
    """Each supported family, and the DINOv2 tower on LLaVA."""
    kind, vision = request.param.split("-")
    return TinyCase(kind, vision)


@pytest.fixture(scope="session")
def tiny_llava() -> TinyCase:
    return TinyCase("llava")


@pytest.fixture(scope="session")
def tiny_llava_next() -> TinyCase:
    return TinyCase("llava_next")


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """The tiny LLaVA saved as an HF folder (CLIs load it through the real `from_pretrained` path)."""
    from vlm_tools.core.models import build_tiny_llava

    model, processor = build_tiny_llava("llava")
    path = tmp_path_factory.mktemp("tiny_llava")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture()
def one_thread():
    """One intra-op thread for tiny models: avoids OpenMP oversubscription stalls on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
