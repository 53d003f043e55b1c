"""The offline cache's integrity rules (issue 13.3, 13.9, 13.11), on small folders built by a fake builder.

* a same-size change of a cached file (one flipped byte) is found by its sha256 and the folder is rebuilt with a
  message naming the file; verified hashes are cached per file (size, mtime, ctime, inode), so the check stays cheap,
  and ``deep=True`` (``vlm-tools setup --verify``) re-reads every byte;
* build folders left by a killed build (``.NAME.tmp-*``, ``.NAME.old-*``) are removed on the next start, unless a
  live build holds the lock;
* an unwritable cache root or demo output folder is refused first, with a one-line error and exit status 2.
"""

from __future__ import annotations

import fcntl
import json
import os
import time

import pytest

from vlm_tools.assets import convert


def _builder(calls: list):
    def build(tmp):
        calls.append(tmp)
        (tmp / "weights.bin").write_bytes(bytes(range(256)) * 8)
        (tmp / "config.json").write_text(json.dumps({"hidden_size": 384, "layers": 12}))
        return {"recipe": "test"}

    return build


def _flip_byte(path, offset: int = 100) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0xFF]))


@pytest.mark.parametrize("name", ["weights.bin", "config.json"])
def test_same_size_change_is_rebuilt_with_message(tmp_path, capsys, name):
    calls: list = []
    target = tmp_path / "thing"
    convert.build_folder(target, _builder(calls), verbose=False)
    good = (target / name).read_bytes()
    if name == "config.json":  # same size, another value
        (target / name).write_text((target / name).read_text().replace("384", "768"))
    else:
        _flip_byte(target / name)
    assert (target / name).stat().st_size == len(good) and (target / name).read_bytes() != good
    assert any(name in p and "sha256" in p for p in convert.verify_folder(target))
    capsys.readouterr()
    convert.build_folder(target, _builder(calls), verbose=True, what="thing")
    err = capsys.readouterr().err
    assert str(target / name) in err and "Rebuilding" in err
    assert len(calls) == 2 and (target / name).read_bytes() == good


def test_verified_hashes_are_cached_and_deep_rereads(tmp_path):
    calls: list = []
    target = tmp_path / "thing"
    convert.build_folder(target, _builder(calls), verbose=False)
    time.sleep(convert.STAMP_MIN_AGE_S + 0.1)  # fresh files are not stamped (a write within the same tick)
    assert convert.verify_folder(target) == []
    stamps = json.loads(convert.stamp_path(target).read_text())["files"]
    assert set(stamps) == {"weights.bin", "config.json"}
    # a change below the file system (same bytes count, stat unchanged: simulated by re-stamping the new stat)
    _flip_byte(target / "weights.bin")
    st = os.stat(target / "weights.bin")
    stamps["weights.bin"].update(size=st.st_size, mtime_ns=st.st_mtime_ns, ctime_ns=st.st_ctime_ns, ino=st.st_ino)
    convert.stamp_path(target).write_text(json.dumps({"format": 1, "files": stamps}))
    assert convert.verify_folder(target) == []  # the cached hash is trusted: no re-read
    assert any("weights.bin" in p for p in convert.verify_folder(target, deep=True))
    convert.build_folder(target, _builder(calls), verbose=False, deep=True)
    assert len(calls) == 2 and convert.verify_folder(target, deep=True) == []


def test_a_write_after_stamping_is_detected(tmp_path):
    target = tmp_path / "thing"
    convert.build_folder(target, _builder([]), verbose=False)
    time.sleep(convert.STAMP_MIN_AGE_S + 0.1)
    assert convert.verify_folder(target) == []
    mtime = os.stat(target / "weights.bin").st_mtime_ns
    _flip_byte(target / "weights.bin")
    os.utime(target / "weights.bin", ns=(mtime, mtime))  # mtime restored; ctime cannot be
    assert any("weights.bin" in p for p in convert.verify_folder(target))


def test_stale_build_folders_are_removed_on_the_next_start(tmp_path, capsys):
    calls: list = []
    target = tmp_path / "thing"
    convert.build_folder(target, _builder(calls), verbose=False)
    stale = [tmp_path / ".thing.tmp-abc123", tmp_path / ".thing.old-def456"]
    for folder in stale:
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"x" * 1000)
    other = tmp_path / ".other.tmp-xyz"  # another folder's build: not ours to remove
    other.mkdir()
    capsys.readouterr()
    convert.build_folder(target, _builder(calls), verbose=True, what="thing")
    err = capsys.readouterr().err
    assert not any(f.exists() for f in stale) and other.exists()
    assert len(calls) == 1  # the intact folder itself is not rebuilt
    assert str(stale[0]) in err and "stale" in err


def test_live_build_folder_is_kept(tmp_path):
    target = tmp_path / "thing"
    convert.build_folder(target, _builder([]), verbose=False)
    live = tmp_path / ".thing.tmp-live"
    live.mkdir()
    with open(tmp_path / ".thing.lock", "a") as handle:  # another build in progress holds the lock
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            convert.build_folder(target, _builder([]), verbose=False)
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
    assert live.exists()


def test_setup_refuses_an_unwritable_cache_root_first(tmp_path, monkeypatch, capsys):
    from vlm_tools.cli import main

    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("VLM_TOOLS_HOME", str(blocker / "cache"))
    assert main(["setup"]) == 2
    out = capsys.readouterr()
    lines = [line for line in (out.out + out.err).splitlines() if line.strip()]
    assert len(lines) == 1 and str(blocker / "cache") in lines[0] and "vlm-tools setup" in lines[0]


def test_demo_refuses_an_unwritable_output_folder_first(tmp_path, monkeypatch, capsys):
    from vlm_tools.cli import main

    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("VLM_TOOLS_HOME", str(home))
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    start = time.perf_counter()
    assert main(["demo", "--model", "default", "--out", str(blocker / "demo")]) == 2
    assert time.perf_counter() - start < 30
    out = capsys.readouterr()
    lines = [line for line in (out.out + out.err).splitlines() if line.strip()]
    assert len(lines) == 1 and str(blocker / "demo") in lines[0] and "vlm-tools demo" in lines[0]
    assert list(home.iterdir()) == []  # checked before anything was built or computed
