"""`Explanation.save` / `Explanation.load` (vlm_tools/interpret/export.py) on synthetic explanations (no model).

Checked: bit-exact arrays and equal fields after a round trip; `report.html` escapes every piece of user text and
loads nothing from outside; the PNGs have the documented sizes and show the heat and the pruned cells where the
frame puts them; matplotlib never parses user text as mathtext; damaged or missing files raise errors naming them;
the folder is replaced as a set.
"""

from __future__ import annotations

import os

import base64
import json
import re
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from vlm_tools.interpret.explanation import Explanation
from vlm_tools.interpret.export import overlay_file_names

pytest.importorskip("matplotlib")

PROMPT = "<image>\nWhat is <script>alert(1)</script> here? cost $5 and $\\undefinedcmd$"
TOKENS = [" cat", "<&$x$", " dog$\\nocmd$"]  # the last would stop mathtext: it must never be parsed
ROWS, COLS = 6, 8
BOX = (16.0, 0.0, 144.0, 90.0)  # the frame spans x 16..144 of a 160 x 90 image
HOT, PRUNED_CELL, COLD = (1, 6), (4, 1), (5, 6)


def _explanation(image: Image.Image | None, image_size=(160, 90), box=BOX, **kw) -> Explanation:
    rng = np.random.default_rng(0)
    pruned = np.zeros((ROWS, COLS), dtype=bool)
    pruned[3:5, 0:3] = True
    maps = np.zeros((3, ROWS, COLS), dtype=np.float32)
    maps[:, HOT[0], HOT[1]] = 1.0  # one hot cell per token, everything else 0
    maps[1] += rng.random((ROWS, COLS), dtype=np.float32) * 1e-3
    maps[:, pruned] = 0.0
    relevance = rng.standard_normal((3, 5)).astype(np.float32)
    relevance[0, 0] = -0.0  # bit-exact: the sign of zero survives
    relevance[0, 1] = np.float32(1e-45)  # a subnormal
    fields = {
        "method": "msea", "config": {"scales": (1.0, 1.5, 2.0), "variant": "a&b"}, "prompt": PROMPT,
        "answer": "a cat <&$x$ dog", "answer_ids": np.array([11, 12, 13, 14], dtype=np.int64),
        "answer_tokens": ["a", *TOKENS], "targets": np.array([1, 2, 3]), "tokens": list(TOKENS), "maps": maps,
        "pruned": pruned, "text_tokens": ["What", " is", " <", "script", ">"], "text_relevance": relevance,
        "box": box, "image_size": image_size, "scores": {"logprob": [-0.5, float("nan"), -2.25], "p": [0.6, 0.5, 0.1]},
        "image": image, "metadata": {"model": "tiny <llava>", "versions": {"torch": "2.x"}, "kept": [1, 2, 3],
                                     "t": np.float32(0.25), "inf": float("inf")}}
    fields.update(kw)
    return Explanation(**fields)


@pytest.fixture(scope="module")
def grey_image() -> Image.Image:
    return Image.new("RGB", (160, 90), (128, 128, 128))


@pytest.fixture(scope="module")
def saved(tmp_path_factory, grey_image):
    exp = _explanation(grey_image)
    folder = tmp_path_factory.mktemp("exp") / "out"
    assert exp.save(folder) == folder
    return exp, folder


def test_round_trip_is_bit_exact(saved):
    exp, folder = saved
    back = Explanation.load(folder)
    for name in ("maps", "pruned", "answer_ids", "targets", "text_relevance"):
        a, b = getattr(exp, name), getattr(back, name)
        assert b.dtype == a.dtype and b.shape == a.shape, name
        assert np.array_equal(a, b) and a.tobytes() == b.tobytes(), name
    assert np.signbit(back.text_relevance[0, 0]) and back.text_relevance[0, 1] == np.float32(1e-45)
    for name in ("method", "prompt", "answer", "answer_tokens", "tokens", "text_tokens"):
        assert getattr(back, name) == getattr(exp, name), name
    assert back.box == BOX and isinstance(back.box, tuple)
    assert back.image_size == (160, 90) and all(isinstance(v, int) for v in back.image_size)
    assert back.config == {"scales": [1.0, 1.5, 2.0], "variant": "a&b"}  # tuples come back as lists
    assert back.metadata == {"model": "tiny <llava>", "versions": {"torch": "2.x"}, "kept": [1, 2, 3], "t": 0.25,
                             "inf": None}  # non-finite -> null
    assert back.scores["p"] == [0.6, 0.5, 0.1]
    lp = back.scores["logprob"]
    assert lp[0] == -0.5 and np.isnan(lp[1]) and lp[2] == -2.25
    assert back.image.size == (160, 90) and back.image.mode == "RGB"
    assert np.array_equal(np.asarray(back.image), np.asarray(exp.image))
    # a second save of the loaded explanation gives the same arrays file and JSON
    again = back.save(folder.parent / "again")
    assert (again / "maps.npz").read_bytes() == (folder / "maps.npz").read_bytes()
    assert (again / "explanation.json").read_text() == (folder / "explanation.json").read_text()


def test_json_is_strict_and_npz_has_no_pickles(saved):
    _, folder = saved
    text = (folder / "explanation.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard constant {c}"))
    with np.load(folder / "maps.npz", allow_pickle=False) as npz:
        assert sorted(npz.files) == ["answer_ids", "maps", "pruned", "targets", "text_relevance"]


def test_report_escapes_text_and_is_self_contained(saved):
    exp, folder = saved
    page = (folder / "report.html").read_text(encoding="utf-8")
    assert "<script>alert(1)</script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert re.search(r"<\s*script", page, re.IGNORECASE) is None
    assert "&lt;&amp;$x$" in page and "<&$x$" not in page  # the token string
    assert "tiny &lt;llava&gt;" in page and "a&amp;b" in page  # metadata and config
    low = page.lower()
    for bad in ('src="http', "src='http", 'href="http', "href='http", "<link", "@import", "url(", "<iframe",
                "<object", "<embed", "\\documentclass", "\\begin{"):
        assert bad not in low, bad
    srcs = re.findall(r'src="([^"]*)"', page)
    assert len(srcs) == 3 and all(s.startswith("data:image/png;base64,") for s in srcs)
    # the inlined overlays are the overlay files
    names = overlay_file_names(exp.tokens)
    for src, name in zip(srcs, names):
        assert base64.b64decode(src.split(",", 1)[1]) == (folder / name).read_bytes()
    assert page.count('class="chip"') == 3 + 3  # 3 coloured answer chips + 3 section titles
    assert page.count('class="chip plain"') == 1  # the unexplained answer token
    assert "6 of 48" in page  # pruned-cell legend
    assert "default-src 'none'; img-src data:;" in page.replace("&#x27;", "'")  # the browser loads nothing else


class _Tags(HTMLParser):
    VOID = frozenset({"meta", "img", "br", "hr", "link", "input"})

    def __init__(self):
        super().__init__()
        self.open: list[str] = []
        self.seen: set[str] = set()
        self.urls: list[str] = []
        self.errors: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.seen.add(tag)
        self.urls += [v or "" for k, v in attrs if k in ("src", "href", "action", "srcset", "poster", "data")]
        self.errors += [k for k, _ in attrs if k.startswith("on")]  # no event handlers
        if tag not in self.VOID:
            self.open.append(tag)

    def handle_endtag(self, tag):
        if not self.open or self.open.pop() != tag:
            self.errors.append(f"</{tag}>")


def test_report_is_well_formed(saved):
    _, folder = saved
    tags = _Tags()
    tags.feed((folder / "report.html").read_text(encoding="utf-8"))
    tags.close()
    assert tags.errors == [] and tags.open == []
    assert "script" not in tags.seen and {"h1", "img", "section", "style"} <= tags.seen
    assert tags.urls and all(u.startswith("data:image/png;base64,") for u in tags.urls)


def test_no_tokens(tmp_path, grey_image):
    exp = _explanation(grey_image, maps=np.zeros((0, ROWS, COLS), np.float32), targets=[], tokens=[],
                       text_relevance=np.zeros((0, 5), np.float32), scores={})
    folder = exp.save(tmp_path / "z")
    back = Explanation.load(folder)
    assert back.maps.shape == (0, ROWS, COLS) and back.tokens == [] and not list(folder.glob("token_*"))
    with Image.open(folder / "summary.png") as im:
        assert im.size[0] == 256 + 16


def test_pngs_sizes_and_content(saved):
    exp, folder = saved
    names = overlay_file_names(exp.tokens)
    assert names == ["token_00_cat.png", "token_01_x.png", "token_02_dog_nocmd.png"]
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["image.png", "maps.npz", "explanation.json", "report.html", "summary.png", *names])
    with Image.open(folder / "image.png") as im:
        assert im.size == (160, 90)
    # panel: 160 x 90 scaled to 384 on the long side = 384 x 216; margins 8 + 80 wide, 30 + 24 high
    for name in names:
        with Image.open(folder / name) as im:
            assert im.format == "PNG" and im.size == (472, 270)
            px = np.asarray(im.convert("RGB")).astype(int)

        def at(cell, px=px):  # the overlay pixel at a cell's centre: panel origin (8, 30), scale 384 / 160 = 2.4
            r, c = cell
            x = (BOX[0] + (c + 0.5) * (BOX[2] - BOX[0]) / COLS) * 2.4
            y = (BOX[1] + (r + 0.5) * (BOX[3] - BOX[1]) / ROWS) * 2.4
            return px[30 + int(y), 8 + int(x)]

        hot, cold, grey = at(HOT), at(COLD), at(PRUNED_CELL)
        assert hot[0] > hot[1] + 40 and hot[0] > hot[2] + 40, (name, hot)  # jet top: red
        assert cold[2] > cold[0] + 40 and cold[2] > cold[1] + 40, (name, cold)  # jet bottom: blue
        assert np.ptp(grey) < 8, (name, grey)  # pruned: grey hatching, no heat colour
        assert np.abs(px[30 + 100, 8 + 10] - 128).max() <= 6  # left of the frame's box: the grey image as is
        assert (folder / name).stat().st_size < 150_000
    with Image.open(folder / "summary.png") as im:
        assert im.size[0] == 3 * (256 + 8) + 8  # three panels of 256 px, 8 px gaps
        assert 300 > im.size[1] > 144 + 22


def test_portrait_image_without_pruning(tmp_path):
    img = Image.new("RGB", (60, 100), (10, 200, 30))
    exp = _explanation(img, image_size=(60, 100), box=(0.0, 0.0, 60.0, 100.0),
                       pruned=np.zeros((ROWS, COLS), dtype=bool))
    folder = exp.save(tmp_path / "p")
    with Image.open(folder / "image.png") as im:
        assert im.size == (60, 100)
    for name in overlay_file_names(exp.tokens):
        with Image.open(folder / name) as im:
            assert im.size == (230 + 88, 384 + 54)  # 60 x 100 -> 230.4 x 384
    assert "0 of 48" in (folder / "report.html").read_text()


def test_no_image_and_a_nan_relevance(tmp_path):
    rel = np.ones((3, 5), np.float32)
    rel[0, 2] = np.nan
    exp = _explanation(None, text_relevance=rel)
    folder = exp.save(tmp_path / "n")
    assert not (folder / "image.png").exists()
    back = Explanation.load(folder)
    assert back.image is None and np.array_equal(back.maps, exp.maps)
    assert back.text_relevance.tobytes() == rel.tobytes()  # NaN kept bit for bit
    page = (folder / "report.html").read_text()
    assert page.count('title="nan"') == 1 and page.count("rgba(220,40,40,1.000)") == 14


def test_damaged_files_are_named(tmp_path, grey_image):
    folder = _explanation(grey_image).save(tmp_path / "d")
    good, good_image = (folder / "maps.npz").read_bytes(), (folder / "image.png").read_bytes()
    for bad in (b"not a zip file", good[: len(good) // 2], good[:-30] + bytes(30)):
        (folder / "maps.npz").write_bytes(bad)
        with pytest.raises(ValueError, match="maps.npz"):
            Explanation.load(folder)
    arrays = {"maps": np.zeros((3, ROWS, COLS), np.float64), "pruned": np.zeros((ROWS, COLS), bool),
              "answer_ids": np.zeros(4, np.int64), "targets": np.zeros(3, np.int64),
              "text_relevance": np.zeros((3, 5), np.float32)}
    with open(folder / "maps.npz", "wb") as f:
        np.savez(f, **arrays)
    with pytest.raises(ValueError, match=r"maps.npz.*'maps'.*float32"):
        Explanation.load(folder)
    arrays["maps"] = np.array([object()] * 3, dtype=object)
    with open(folder / "maps.npz", "wb") as f:
        np.savez(f, **arrays)
    with pytest.raises(ValueError, match="maps.npz"):  # a pickled object array is refused, not loaded
        Explanation.load(folder)
    (folder / "maps.npz").unlink()
    with pytest.raises(ValueError, match="maps.npz"):
        Explanation.load(folder)
    (folder / "maps.npz").write_bytes(good)
    Explanation.load(folder)

    (folder / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(ValueError, match="image.png"):
        Explanation.load(folder)
    (folder / "image.png").unlink()
    with pytest.raises(ValueError, match="image.png"):
        Explanation.load(folder)
    (folder / "image.png").write_bytes(good_image)

    text = (folder / "explanation.json").read_text()
    (folder / "explanation.json").write_text(text[:40])
    with pytest.raises(ValueError, match="explanation.json"):
        Explanation.load(folder)
    record = json.loads(text)
    record["tokens"] = ["a", "b"]  # disagrees with the arrays
    (folder / "explanation.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match="explanation.json"):
        Explanation.load(folder)
    with pytest.raises(ValueError, match="explanation.json"):
        Explanation.load(tmp_path / "nowhere")


def test_folder_is_replaced_as_a_set(tmp_path, grey_image):
    folder = tmp_path / "s"
    _explanation(grey_image).save(folder)
    one = _explanation(grey_image, maps=np.ones((1, ROWS, COLS), np.float32) * 0.5, targets=[1], tokens=[" cat"],
                       text_relevance=np.zeros((1, 5), np.float32), scores={})
    one.save(folder)  # fewer tokens: no stale overlay of the earlier export stays
    assert sorted(p.name for p in folder.glob("token_*")) == ["token_00_cat.png"]
    assert [p.name for p in tmp_path.iterdir()] == ["s"]  # no temporary left beside it
    umask = os.umask(0)
    os.umask(umask)
    assert folder.stat().st_mode & 0o777 == 0o777 & ~umask  # a normal folder's mode, not mkdtemp's 0o700
    assert "No text relevance" in (folder / "report.html").read_text()

    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="notes.txt"):
        one.save(other)
    assert [p.name for p in other.iterdir()] == ["notes.txt"]
    (tmp_path / "afile").write_text("x")
    with pytest.raises(FileExistsError, match="afile"):
        one.save(tmp_path / "afile")


def test_unstorable_metadata_is_named(tmp_path, grey_image):
    exp = _explanation(grey_image, metadata={"timings": {"bad": object()}})
    with pytest.raises(TypeError, match=r"metadata\['timings'\]\['bad'\]"):
        exp.save(tmp_path / "u")
    assert not (tmp_path / "u").exists()


def test_usetex_of_the_caller_is_not_used(tmp_path, grey_image):
    import matplotlib

    with matplotlib.rc_context({"text.usetex": True}):  # without LaTeX installed, any drawn text would fail
        folder = _explanation(grey_image).save(tmp_path / "t")
    assert (folder / "summary.png").is_file()


def test_bad_geometry_is_named(tmp_path, grey_image):
    with pytest.raises(ValueError, match="image_size"):
        _explanation(grey_image, image_size=(0, 90)).save(tmp_path / "g")
    with pytest.raises(ValueError, match="box"):
        _explanation(grey_image, box=(10.0, 0.0, 10.0, 90.0)).save(tmp_path / "g")
    with pytest.raises(TypeError, match="PIL"):
        _explanation(np.zeros((90, 160, 3), np.uint8)).save(tmp_path / "g")
    assert not (tmp_path / "g").exists()


def test_overlay_file_names():
    assert overlay_file_names(["<&$x$", " cat", "", "é", "a b/c"]) == [
        "token_00_x.png", "token_01_cat.png", "token_02_tok.png", "token_03_tok.png", "token_04_a_b_c.png"]
    assert overlay_file_names(["a"] * 101)[100] == "token_100_a.png"
    assert overlay_file_names(["a"] * 101)[7] == "token_007_a.png"
