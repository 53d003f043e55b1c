"""`scripts/train_default_model.py` loads its checkpoints with `torch.load(weights_only=True)` (issue 13.15)."""

from __future__ import annotations

import importlib.util
import pathlib
import random
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_default_model.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("train_default_model", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Payload:
    """Unpickling this object creates a file: what `weights_only=False` would run from a crafted checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_crafted_checkpoint_is_refused_without_running_its_code(script, tmp_path):
    work, out, marker = tmp_path / "work", tmp_path / "out", tmp_path / "payload_ran"
    work.mkdir()
    torch.save({"step": 1, "projector": {}, "lora": {}, "evil": _Payload(marker)}, work / "checkpoint.pt")
    with pytest.raises(SystemExit, match=r"checkpoint\.pt.*weights_only=True"):
        script.main(["--export-checkpoint", "--work-dir", str(work), "--out-dir", str(out)])
    assert not marker.exists()
    assert not (out / "projector.safetensors").exists()


def test_checkpoint_round_trip_with_weights_only(script, tmp_path):
    """The script's own checkpoint content (tensors, optimizer state, Python and torch RNG states) loads safely."""
    layer = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-3)
    layer(torch.randn(4, 3)).sum().backward()
    opt.step()
    ck = {"step": 7, "args": {"seed": 0, "lr1": 1e-3, "attn": "sdpa"}, "projector": layer.state_dict(),
          "lora": {"a.lora_A.weight": torch.ones(2, 2)}, "opt": opt.state_dict(), "py_rng": random.getstate(),
          "torch_rng": torch.get_rng_state()}
    path = tmp_path / "checkpoint.pt"
    script.save_checkpoint(path, ck)
    back = script.load_checkpoint(path)
    assert back["step"] == 7 and back["args"] == ck["args"] and back["py_rng"] == ck["py_rng"]
    assert torch.equal(back["torch_rng"], ck["torch_rng"])
    assert torch.equal(back["projector"]["weight"], layer.weight.detach())
    opt2 = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=1e-3)
    opt2.load_state_dict(back["opt"])
    assert not list(tmp_path.glob(".checkpoint.pt.*"))  # written atomically: no temporary file left
