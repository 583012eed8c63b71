"""`rtfq demo --quick`: every stage for real, then a second run reuses them all."""

from __future__ import annotations

import importlib.util
import json

from rtfq_deploy.manifest import read_manifest, sha256_file
from tests.test_cli import _run


def test_quick_demo_runs_every_stage_and_reuses_them(tmp_path):
    out = tmp_path / "demo"
    first = _run("rtfq", "demo", "--quick", "--out", str(out))
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    for stage in range(1, 10):
        assert f"[{stage}/9]" in first.stdout
    assert "reused" not in first.stdout
    assert "source-only" in first.stdout and "RTF-Q" in first.stdout and "gain" in first.stdout
    acc = json.loads((out / "acc.json").read_text())
    assert len(acc["subnets"]) == 8
    assert len(list((out / "models").glob("*.onnx"))) == 8
    # every model on onnxruntime and, where it is installed, OpenVINO, with top-1 on the held-out images
    rows = json.loads((out / "results.json").read_text())["models"]
    wanted = {"onnxruntime", "openvino"} if importlib.util.find_spec("openvino") else {"onnxruntime"}
    assert {r["runtime"] for r in rows} == wanted and len(rows) == 8 * len(wanted)
    assert all(0 <= r["top1"] <= 1 and 0 <= r["agreement"] <= 1 for r in rows if r["ok"])
    manifest = read_manifest(out / "dist")
    (device, entry), = manifest.devices.items()
    assert entry.files and all(sha256_file(out / "dist" / f.path) == f.sha256 for f in entry.files)
    assert all(f.budgets for f in entry.files)
    assert (out / "dist" / device / "report.html").exists()
    second = _run("rtfq", "demo", "--quick", "--out", str(out))
    assert second.returncode == 0, second.stderr
    assert second.stdout.count("reused") == 9
