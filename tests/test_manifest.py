from __future__ import annotations

import json

import pytest

from rtfq_deploy import manifest as mf
from rtfq_deploy.errors import RtfqError

SHA = "ab" * 32


def _entry(device="dev", name="r64-w1.00-q4", **kw):
    d = {"subnet": name, "path": f"{device}/{name}.onnx", "sha256": SHA, "size_bytes": 10, "latency_p50_ms": 1.5,
         "latency_p90_ms": 2.0, "peak_memory_bytes": 100, "macs": 5, "bitops": 80, "accuracy": 0.5,
         "budgets": ["latency=2ms"]}
    return d | kw


def test_schema_round_trip_and_keys(tmp_path):
    device = mf.Device({"cpu_model": "X"}, (mf.Entry.from_dict(_entry(), "dev"),), "2026-01-01T00:00:00Z")
    mf.write_manifest(tmp_path, mf.Manifest({"dev": device}))
    raw = json.loads((tmp_path / "manifest.json").read_text())
    assert raw["format"] == "rtfq-manifest" and raw["version"] == 1
    assert set(raw["devices"]["dev"]) == {"fingerprint", "updated", "files"}
    assert raw["devices"]["dev"]["files"][0] == _entry()
    assert mf.read_manifest(tmp_path).devices["dev"] == device
    assert mf.read_manifest(tmp_path / "nothing-yet").devices == {}


@pytest.mark.parametrize("change,needle", [
    ({"path": "../etc/passwd.onnx"}, "is not dev/<name>.onnx"),
    ({"path": "other/r64-w1.00-q4.onnx"}, "is not dev/<name>.onnx"),
    ({"path": "dev/x.txt"}, "is not dev/<name>.onnx"),
    ({"path": "dev/.hidden.onnx"}, "invalid file name"),
    ({"sha256": "xyz"}, "malformed sha256"),
    ({"latency_p50_ms": "fast"}, "malformed"),
])
def test_entries_that_could_leave_dist_dir_or_lie_are_refused(change, needle):
    with pytest.raises(RtfqError, match=needle):
        mf.Entry.from_dict(_entry(**change), "dev")


def test_foreign_and_future_manifests_are_refused(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "rtfq-manifest", "version": 3, "devices": {}}))
    with pytest.raises(RtfqError, match="version 3 is not supported"):
        mf.read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{")
    with pytest.raises(RtfqError, match="not JSON"):
        mf.read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"devices": {}}))
    with pytest.raises(RtfqError, match="not an rtfq manifest"):
        mf.read_manifest(tmp_path)


def test_replace_device_keeps_others_and_returns_the_previous_entry(tmp_path):
    one = mf.Device({"n": 1}, (mf.Entry.from_dict(_entry("a"), "a"),))
    two = mf.Device({"n": 2}, (mf.Entry.from_dict(_entry("b", "r32-w0.50-q8"), "b"),))
    assert mf.replace_device(tmp_path, "a", one)[1] is None
    mf.set_device(tmp_path, "b", two)
    newer = mf.Device({"n": 3}, ())
    manifest, previous = mf.replace_device(tmp_path, "a", newer)
    assert previous.fingerprint == {"n": 1} and previous.files == one.files
    assert manifest.devices["b"].files == two.files and manifest.devices["a"].files == ()
    assert mf.read_manifest(tmp_path) == manifest
    with pytest.raises(RtfqError, match="invalid device name"):
        mf.set_device(tmp_path, "a/b", newer)


def test_sha256_file(tmp_path):
    (tmp_path / "f").write_bytes(b"abc")
    assert mf.sha256_file(tmp_path / "f") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
