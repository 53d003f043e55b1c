"""DivPrune: the CONTRIBUTING.md example, a real method: its selection against a brute-force loop."""

from __future__ import annotations

import torch
import vlm_tools
from vlm_tools.testing import TinyCase


def test_divprune_matches_a_plain_loop():
    case = TinyCase("llava")
    model, single = case.model, case.singles[0]
    with vlm_tools.attached(model, "divprune", keep=6) as w, torch.no_grad():
        w(**single)
        kept = w.last_trace.kept[0][0]
        out = model.model.vision_tower(single["pixel_values"], output_hidden_states=True)
    feats = out.hidden_states[model.config.vision_feature_layer][0, 1:]  # feature layer, CLS dropped
    x = torch.nn.functional.normalize(feats.float(), dim=-1)
    d = 1 - x @ x.T
    ref = [int(d.sum(1).argmax())]
    while len(ref) < 6:  # brute force: the token whose nearest kept token is farthest
        ref.append(max((i for i in range(len(x)) if i not in ref), key=lambda i: min(d[i, j] for j in ref)))
    assert kept.tolist() == sorted(ref)


def test_divprune_config_errors_and_l2_metric():
    import pytest

    from vlm_tools.pruning.divprune.config import DivPruneConfig

    with pytest.raises(ValueError, match="metric must be 'cosine' or 'l2'"):
        DivPruneConfig(keep=4, metric="x")
    case = TinyCase("llava_next")
    with vlm_tools.attached(case.model, "divprune", keep=10, metric="l2") as w, torch.no_grad():
        w(**case.batch)
    assert [k.numel() for k in w.last_trace.kept[0]] == [10]
