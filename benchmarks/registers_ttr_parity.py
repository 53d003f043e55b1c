"""Test-time registers: `vlm_tools.registers.test_time` against the authors' own code on the same tensors (issue 14.3).

Runs `shared/algorithms.py::find_register_neurons` and `shared/hook_fn.py::activate_on_registers` of
`nickjiang2378/test-time-registers` (read from a local checkout or git mirror given with `--authors-repo`; nothing is
downloaded, nothing of it is copied into vlm_tools) through a small adapter that hands them the activations our hooks
capture, and compares with `find_register_neurons` / `edit_activations`:

* the planted-artifact ViT of `tests/test_registers_test_time.py` (position-locked outliers written by MLP neuron 0
  of block 1), sparsity filter on and off;
* with `--dinov2`, the default model's DINOv2-S at 224 px on local photos (tau = the 99th percentile of the
  block -2 token norms; its artifacts are weak).

Reported: the largest difference of the per-neuron scores, whether the rankings agree (entries with distinct
scores), whether the top-k neuron dict agrees, and the intervention on batch item 0 (identical) and item 1 (theirs
leaves it unedited; ours edits it with its own sign_max).

    python benchmarks/registers_ttr_parity.py --authors-repo /path/to/test-time-registers [--dinov2]
"""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

MODULES = ("algorithms", "utils", "hook_fn", "hook_manager")


def load_authors(repo: Path, into: Path):
    """Import the authors' `shared` package from a checkout, or from a bare git dir (`git show HEAD:shared/...`)."""
    pkg = into / "shared"
    pkg.mkdir(parents=True, exist_ok=True)
    for name in MODULES:
        src = repo / "shared" / f"{name}.py"
        if src.is_file():
            text = src.read_text()
        else:
            text = subprocess.run(["git", "--git-dir", str(repo), "show", f"HEAD:shared/{name}.py"], check=True,
                                  capture_output=True, text=True).stdout
        (pkg / f"{name}.py").write_text(text)
    sys.path.insert(0, str(into))
    commit = subprocess.run(["git", "--git-dir", str(repo if (repo / "HEAD").is_file() else repo / ".git"),
                             "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    return importlib.import_module("shared.algorithms"), importlib.import_module("shared.hook_fn"), commit


class CaptureManager:
    """The part of the authors' `HookManager` their `find_register_neurons` uses, fed by vlm_tools' tower hooks."""

    def __init__(self, vit):
        from vlm_tools.core.adapters import get_tower

        self.tower = get_tower(vit)
        self.acts: dict[int, torch.Tensor] = {}
        self.outs: dict[int, torch.Tensor] = {}

    def reinit(self, mode=None):
        self.acts, self.outs = {}, {}

    def finalize(self):
        pass

    def run(self, model, image):
        from vlm_tools.core.hooks import HookHandle

        tower = self.tower
        with HookHandle("parity") as h, torch.no_grad():
            for b in range(len(tower.blocks)):
                h.forward_pre_hook(tower.mlp(b)[2], lambda m, a, b=b: self.acts.__setitem__(b, a[0][0].clone()))
                h.forward_hook(tower.blocks[b], lambda m, a, o, b=b: self.outs.__setitem__(
                    b, (o[0] if isinstance(o, tuple) else o)[0].clone()))
            tower.tokens(image, None)

    def get_neuron_activations(self):
        return np.stack([self.acts[b].numpy() for b in sorted(self.acts)])

    def get_layer_outputs(self):
        return np.stack([self.outs[b].numpy() for b in sorted(self.outs)])


def compare(name, vit, folder, preprocess, tau, detect, algorithms, hook_fn, top_k, highest):
    from vlm_tools.registers import test_time
    from vlm_tools.registers.data import list_images

    from PIL import Image

    files = list_images(folder)
    images = torch.stack([preprocess(Image.open(f).convert("RGB")) for f in files])
    manager = CaptureManager(vit)
    tower = manager.tower
    depth, width = len(tower.blocks), tower.mlp(0)[2].in_features
    state = {"model": vit, "preprocess": lambda im: preprocess(im.convert("RGB")),
             "run_model": manager.run, "hook_manager": manager, "num_layers": depth, "num_neurons_per_layer": width}
    rows = []
    for sparsity in (True, False):
        theirs = algorithms.find_register_neurons(state, str(folder), register_norm_threshold=tau,
                                                  detect_outliers_layer=detect, device="cpu",
                                                  processed_image_cnt=len(files) + 1,
                                                  apply_sparsity_filter=sparsity)
        ours = test_time.find_register_neurons(vit, images, threshold=tau, detect_block=detect, top_k=depth * width,
                                               sparsity_filter=sparsity)
        t_scores = {(b, n): s for b, n, s in theirs}
        o_scores = {(b, n): s for b, n, s in ours.ranking}
        diff = max(abs(t_scores[k] - o_scores[k]) for k in t_scores)
        distinct = [e for e in theirs if e[2] > 0]
        mine = ours.ranking[:len(distinct)]
        swaps = [i for i, (t, o) in enumerate(zip(distinct, mine)) if t[:2] != o[:2]]
        scale = max(e[2] for e in distinct)
        near = all(abs(t_scores[distinct[i][:2]] - t_scores[mine[i][:2]]) <= 1e-5 * scale for i in swaps)
        ranks_agree = "equal" if not swaps else (f"{len(swaps)} swaps, all between scores within 1e-5 of the top "
                                                 "score" if near else f"{len(swaps)} swaps, NOT near-ties")
        t_sel = [e for e in theirs if e[0] <= highest][:top_k]
        o_sel = test_time.find_register_neurons(vit, images, threshold=tau, detect_block=detect, top_k=top_k,
                                                highest_layer=highest, sparsity_filter=sparsity)
        sel_agree = [(b, n) for b, n, _ in t_sel] == [(b, n) for b, n, _ in o_sel.ranking]
        rows.append((name, sparsity, len(files), ours.settings["images_with_outliers"], diff, ranks_agree,
                     sel_agree, o_sel.layers))
    # the intervention, on the MLP hidden of a selected block (registers appended), batch of 2
    layer, neurons = next(iter(sorted(o_sel.layers.items())))
    handle = test_time.attach_test_time_registers(vit, {layer: neurons})
    store = {}
    from vlm_tools.core.hooks import HookHandle

    with HookHandle("parity") as h, torch.no_grad():
        # prepended so it sees the hidden before the edit hook rewrites it
        h.forward_pre_hook(tower.mlp(layer)[2], lambda m, a: store.__setitem__("a", a[0].clone()), prepend=True)
        tower.tokens(images[:2], None)
    handle.remove()
    a = store["a"]
    theirs_a = a.clone()
    hook_fn.activate_on_registers(None, None, theirs_a, 1, neurons)
    ours_a = test_time.edit_activations(a, neurons, tower.spec.num_prefix_tokens, 1)
    item0 = bool(torch.equal(theirs_a[0], ours_a[0]))
    item1_theirs_unedited = bool(torch.equal(theirs_a[1], a[1]))
    item1_ours_edited = not torch.equal(ours_a[1], a[1])
    return rows, (layer, neurons, item0, item1_theirs_unedited, item1_ours_edited)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--authors-repo", required=True, type=Path, help="checkout or git dir of test-time-registers")
    ap.add_argument("--dinov2", action="store_true", help="also compare on the default model's DINOv2-S")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import timm
    from PIL import Image

    from vlm_tools.core.adapters import get_tower
    from vlm_tools.registers import synthetic
    from vlm_tools.registers.data import preprocess

    work = Path(tempfile.mkdtemp(prefix="ttr_parity_"))
    algorithms, hook_fn, commit = load_authors(args.authors_repo, work / "authors")
    results = []
    interventions = []

    kw = {"img_size": 64, "patch_size": 8, "embed_dim": 32, "depth": 4, "num_heads": 2, "num_classes": 0}
    torch.manual_seed(0)
    vit = timm.create_model("test_vit", pretrained=False, **kw).eval()
    calib = torch.randn(6, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    synthetic.plant_position_outliers(vit, calib, cells=[9, 30, 45], block=1, trigger_scale=1.5, gain=20.0)
    folder = work / "planted_images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)).save(folder / f"{i}.png")
    spec = get_tower(vit).spec
    with torch.no_grad():
        norms = get_tower(vit).tokens(calib, -1).norm(dim=-1)
    tau = 5 * float(norms[:, 1:].median())
    rows, inter = compare("planted ViT (8 random images)", vit, folder, lambda im: preprocess(im, 64, spec.mean,
                                                                                                 spec.std),
                          tau, -1, algorithms, hook_fn, top_k=3, highest=3)
    results += rows
    interventions.append(("planted ViT", *inter))

    if args.dinov2:
        from registers_planted import _image

        from vlm_tools.registers import load_backbone

        dino = load_backbone("dinov2-s")
        folder = work / "photos"
        folder.mkdir()
        for n in ("astronaut", "chelsea", "coffee", "rocket", "grace_hopper", "motorcycle_left"):
            _image(n).resize((224, 224)).save(folder / f"{n}.png")
        dspec = get_tower(dino).spec
        pre = lambda im: preprocess(im, 224, dspec.mean, dspec.std)  # noqa: E731
        from vlm_tools.registers.data import list_images

        batch = torch.stack([pre(Image.open(f).convert("RGB")) for f in list_images(folder)])
        with torch.no_grad():
            dn = get_tower(dino).tokens(batch, -2).norm(dim=-1)
        dtau = float(dn.flatten().quantile(0.99))
        rows, inter = compare("DINOv2-S 224 px (6 photos)", dino, folder, pre, dtau, -2, algorithms, hook_fn,
                              top_k=10, highest=8)
        results += rows
        interventions.append(("DINOv2-S", *inter))

    lines = ["| tensors | sparsity filter | images (with outliers) | max score difference | ranking (nonzero "
             "scores) | top-k dict equal | top-k |", "|---|---|---|---|---|---|---|"]
    for name, sp, n, c, diff, ra, sa, layers in results:
        lines.append(f"| {name} | {'on' if sp else 'off'} | {n} ({c}) | {diff:.2e} | {ra} | {sa} | "
                     f"{ {int(k): v for k, v in layers.items()} } |")
    lines += ["", "| tensors | block, neurons | batch item 0 identical | item 1: authors leave it unedited | item 1: "
              "ours edits it |", "|---|---|---|---|---|"]
    for name, layer, neurons, i0, t1, o1 in interventions:
        lines.append(f"| {name} | {layer}, {neurons} | {i0} | {t1} | {o1} |")
    body = (f"Authors' code: `nickjiang2378/test-time-registers` at `{commit}` (`shared/algorithms.py::"
            "find_register_neurons`, `shared/hook_fn.py::activate_on_registers`), fed the activations of "
            "vlm_tools' hooks through a small adapter of their HookManager interface.\n\n" + "\n".join(lines)
            + "\n\nDifferences by design: the edit applies to every batch item with its own sign_max (theirs: item 0 "
            "only); ties in the ranking are broken in flat (block, neuron) order (theirs: unstable sort), so only "
            "entries with a nonzero score are compared in order.")
    print(body)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _results import write_section

    write_section("registers-ttr-parity", "Test-time registers vs the authors' code (issue 14.3)", body, dtype="fp32")


if __name__ == "__main__":
    main()
