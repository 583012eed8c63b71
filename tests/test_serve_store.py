from __future__ import annotations

import json
import os

import pytest

from rtfq_deploy import manifest as mf
from rtfq_deploy.errors import RtfqError
from rtfq_deploy.serve import store as store_mod
from rtfq_deploy.serve.store import Store, open_verified
from tests.fixtures.dist import entry_for, publish, random_bytes


def _reasons(store: Store) -> dict[str, str]:
    return {e.path: e.reason for e in store.snapshot.excluded}


def test_only_whole_files_inside_dist_dir_are_served(tmp_path):
    dist, outside = tmp_path / "dist", tmp_path / "outside"
    outside.mkdir()
    good = entry_for(dist, "pi", "good", b"good bytes", 5.0)
    missing = entry_for(dist, "pi", "missing", b"never written", 6.0, write=False)
    corrupt = entry_for(dist, "pi", "corrupt", b"the published bytes", 7.0)
    (dist / corrupt.path).write_bytes(b"the published bytez")  # same size, other bytes
    short = entry_for(dist, "pi", "short", b"0123456789", 8.0)
    (dist / short.path).write_bytes(b"01234")
    secret = b"not for devices"
    (outside / "secret.onnx").write_bytes(secret)
    escape = entry_for(dist, "pi", "escape", secret, 9.0, write=False)
    os.symlink(outside / "secret.onnx", dist / escape.path)
    (dist / "pi" / "dir.onnx").mkdir()
    directory = mf.Entry("dir", "pi/dir.onnx", "0" * 64, 0, 1.0, 1.0, 1, 1, 1)
    publish(dist, "pi", [good, missing, corrupt, short, escape, directory])

    store = Store(dist)
    snap = store.snapshot
    assert [e.subnet for e in snap.devices["pi"].files] == ["good"]
    assert set(snap.files) == {good.sha256}
    reasons = _reasons(store)
    assert reasons[missing.path] == "file is missing"
    assert reasons[corrupt.path].startswith("sha256 ") and "differs" in reasons[corrupt.path]
    assert reasons[short.path] == "size 5 differs from the manifest's 10"
    assert reasons[escape.path] == "resolves outside DIST_DIR"
    assert reasons[directory.path] in ("not a regular file", "cannot open: Is a directory")
    assert len(reasons) == 5


def test_symlinks_inside_dist_dir_are_followed(tmp_path):
    dist = tmp_path / "dist"
    data = b"shared between devices"
    real = entry_for(dist, "a", "m", data, 1.0)
    (dist / "b").mkdir()
    os.symlink("../a/m.onnx", dist / "b" / "m.onnx")
    publish(dist, "a", [real])
    publish(dist, "b", [entry_for(dist, "b", "m", data, 1.0, write=False)])
    snap = Store(dist).snapshot
    assert len(snap.devices["b"].files) == 1 and snap.files[real.sha256].real_path == str((dist / real.path).resolve())


def test_no_manifest_is_an_empty_store_and_a_malformed_one_is_refused_at_start(tmp_path):
    assert Store(tmp_path).snapshot.devices == {}
    (tmp_path / mf.MANIFEST).write_text("{not json")
    with pytest.raises(RtfqError, match="not JSON"):
        Store(tmp_path)
    with pytest.raises(RtfqError, match="not a directory"):
        Store(tmp_path / "absent")


def test_refresh_follows_publishes_and_keeps_serving_through_a_bad_one(tmp_path):
    first = entry_for(tmp_path, "pi", "a", b"first", 1.0)
    publish(tmp_path, "pi", [first])
    store = Store(tmp_path)
    assert store.refresh() is False and store.snapshot.generation == 1  # nothing changed
    second = entry_for(tmp_path, "pi", "b", b"second", 2.0)
    publish(tmp_path, "pi", [first, second])
    assert store.refresh() is True
    assert set(store.snapshot.files) == {first.sha256, second.sha256} and store.snapshot.generation == 2

    (tmp_path / mf.MANIFEST).write_text(json.dumps({"format": "rtfq-manifest", "version": 99, "devices": {}}))
    assert store.refresh() is False
    assert "version 99" in store.error and set(store.snapshot.files) == {first.sha256, second.sha256}
    publish_after_bad = mf.Manifest({"pi": mf.Device({}, (second,))})
    mf.write_manifest(tmp_path, publish_after_bad)
    assert store.refresh() is True and store.error is None and set(store.snapshot.files) == {second.sha256}


def test_a_file_that_appears_or_changes_later_is_rechecked_without_a_new_manifest(tmp_path):
    late = entry_for(tmp_path, "pi", "late", b"arrives after the manifest", 1.0, write=False)
    publish(tmp_path, "pi", [late])
    store = Store(tmp_path)
    assert store.snapshot.files == {}
    (tmp_path / "pi").mkdir()
    (tmp_path / late.path).write_bytes(b"arrives after the manifest")
    assert store.refresh() is True and set(store.snapshot.files) == {late.sha256}

    served = store.snapshot.files[late.sha256]
    (tmp_path / "pi" / "new.tmp").write_bytes(b"arrives AFTER the manifest")
    os.replace(tmp_path / "pi" / "new.tmp", tmp_path / late.path)  # replaced behind the manifest's back
    assert open_verified(served) is None  # the download route refuses the unverified inode
    assert store.refresh() is True and store.snapshot.files == {}


def test_hashes_are_cached_by_file_identity(tmp_path, monkeypatch):
    big = entry_for(tmp_path, "pi", "big", random_bytes(1 << 20, 0), 1.0)
    publish(tmp_path, "pi", [big])
    hashed = []
    real = store_mod.sha256_fd
    monkeypatch.setattr(store_mod, "sha256_fd", lambda fd: hashed.append(fd) or real(fd))
    store = Store(tmp_path)
    assert len(hashed) == 1
    other = entry_for(tmp_path, "pi", "other", b"small", 2.0)
    publish(tmp_path, "pi", [big, other])
    assert store.refresh() is True
    assert len(hashed) == 2  # only the new file was read
    assert set(store.snapshot.files) == {big.sha256, other.sha256}


def test_open_verified_gives_the_hashed_inode(tmp_path):
    data = b"x" * 1000
    e = entry_for(tmp_path, "pi", "m", data, 1.0)
    publish(tmp_path, "pi", [e])
    fd = open_verified(Store(tmp_path).snapshot.files[e.sha256])
    assert fd is not None
    try:
        assert os.pread(fd, 2000, 0) == data
    finally:
        os.close(fd)
