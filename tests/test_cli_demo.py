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


def test_arch_picks_the_supernet_and_its_recipe_and_never_mixes_two(tmp_path):
    from rtfq_deploy.cli.demo import FULL, QUICK, settings_for

    full = settings_for(False, "tiny_mobilenet")
    assert full.init[:2] == ("--arch", "tiny_mobilenet") and full.init[2:] == FULL.init[2:]
    assert full.train == ("--recipe", "synth_strong_cpu_mobilenet")
    assert settings_for(False, "tiny_resnet") == FULL and settings_for(True, "tiny_resnet") == QUICK
    assert settings_for(True, "tiny_mobilenet").train == QUICK.train
    out = tmp_path / "demo"
    out.mkdir()
    (out / "demo.json").write_text('{"arch": "tiny_resnet"}\n')
    result = _run("rtfq", "demo", "--quick", "--arch", "tiny_mobilenet", "--out", str(out))
    assert result.returncode == 2 and "holds a demo of tiny_resnet, not tiny_mobilenet" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and sorted(p.name for p in out.iterdir()) == ["demo.json"]
    # a record that is not what the demo writes is an unknown supernet: one line, never a hang
    import os

    for name, write in (("deep", lambda p: p.write_text("[" * 10_000 + "]" * 10_000)),
                        ("binary", lambda p: p.write_bytes(b"\xff\xfe\x00")),
                        ("wrong type", lambda p: p.write_text('{"arch": 5}')),
                        ("fifo", lambda p: os.mkfifo(p))):
        bad = tmp_path / name.replace(" ", "_")
        bad.mkdir()
        write(bad / "demo.json")
        result = _run("rtfq", "demo", "--quick", "--out", str(bad))
        assert result.returncode == 2 and "holds a demo of an unknown supernet" in result.stderr, (name, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1 and [p.name for p in bad.iterdir()] == ["demo.json"]
