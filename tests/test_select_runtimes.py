"""Choosing, publishing, serving and fetching per device *and runtime*: real files, a real
DIST_DIR, a real server on loopback and the real client and CLIs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from rtfq_deploy import manifest as mf
from rtfq_deploy.bench.run import FORMAT, read_results
from rtfq_deploy.errors import RtfqError
from rtfq_deploy.fetch import FetchConfig, fetch
from tests.fixtures.dist import request, serving
from tests.test_cli import _one_line_error, _run

# subnet: file size, MACs; then per runtime: (p50 ms, memory, measured top-1 or None, stable)
SUBNETS = {"r64-w0.50-q4": (1_000, 10_000_000), "r64-w1.00-q8": (3_000, 30_000_000)}
FIGURES = {
    ("r64-w0.50-q4", "onnxruntime"): (2.0, 30e6, None, True),
    ("r64-w0.50-q4", "openvino"): (1.5, 60e6, 0.55, True),
    ("r64-w1.00-q8", "onnxruntime"): (5.0, 40e6, None, True),
    ("r64-w1.00-q8", "openvino"): (3.0, 70e6, 0.78, False),
}
ACCURACY = {"r64-w0.50-q4": 0.60, "r64-w1.00-q8": 0.80}


def make_results(tmp_path: Path, runtimes=("onnxruntime", "openvino"), threads: int = 1, name: str = "r.json") -> Path:
    models = tmp_path / "models"
    models.mkdir(exist_ok=True)
    rows = []
    for subnet, (size, macs) in SUBNETS.items():
        path = models / f"{subnet}.onnx"
        path.write_bytes((subnet.encode() * size)[:size])
        for runtime in runtimes:
            p50, mem, top1, stable = FIGURES[subnet, runtime]
            row = {"path": str(path), "runtime": runtime, "ok": True, "error": None, "subnet": subnet, "macs": macs,
                   "bitops": macs * 16, "size_bytes": size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                   "latency_p50_ms": p50, "latency_p90_ms": p50 * 1.1, "peak_memory_bytes": int(mem),
                   "peak_memory_no_arena_bytes": int(mem * 0.8) if runtime == "onnxruntime" else None,
                   "stable": stable, "p50_cv": 0.001 if stable else 0.05, "p50_drift": 0.0, "samples": 300}
            if top1 is not None:
                row |= {"top1": top1, "images": 100, "agreement": 0.93, "max_logit_diff": 0.4,
                        "agreement_reference": "onnxruntime"}
            rows.append(row)
    described = {"onnxruntime": {"version": "1.32.0", "provider": "CPUExecutionProvider", "graph_optimization": "all"},
                 "openvino": {"version": "2026.4.0", "device": "CPU"}}
    results = {"format": FORMAT, "version": 2, "settings": {"images": {"images": 100}}, "models": rows,
               "fingerprint": {"cpu_model": "Test CPU", "provider": "CPUExecutionProvider", "threads": threads,
                               "batch_size": 1, "runtimes": {r: described[r] for r in runtimes}}}
    out = tmp_path / name
    out.write_text(json.dumps(results))
    (tmp_path / "acc.json").write_text(json.dumps({"subnets": [{"subnet": s, "top1": a} for s, a in ACCURACY.items()]}))
    return out


def _select(results: Path, dist: Path, *budgets: str, extra=()):
    args = ["rtfq-bench", "select", "--results", str(results), "--accuracy", str(results.parent / "acc.json"),
            "-o", str(dist), "--device", "box", "--no-report", *extra]
    for b in budgets:
        args += ["--budget", b]
    return _run(*args)


def test_select_chooses_per_runtime_shares_the_file_and_names_unstable_choices(tmp_path):
    results, dist = make_results(tmp_path), tmp_path / "dist"
    result = _select(results, dist, "latency=4ms")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    # OpenVINO's measured top-1 is used for its rows and said so; onnxruntime's comes from the table
    assert "top-1 measured on the device's own runtime (openvino) for 2 row(s), on 100 images" in out
    assert "on openvino, top-1 agrees with onnxruntime's exact integer results on 93.0% (r64-w0.50-q4) to 93.0%" in out
    assert "budget latency=4ms on openvino: the choice r64-w1.00-q8 rests on an unstable latency figure" in out
    assert "1 of 4 measured rows have an unstable latency p50" in out
    raw = json.loads((dist / "manifest.json").read_text())
    assert raw["version"] == 2  # an OpenVINO entry: older toolkits refuse rather than misserve it
    device = mf.read_manifest(dist).devices["box"]
    got = {(e.runtime, e.subnet): e for e in device.files}
    assert set(got) == {("onnxruntime", "r64-w0.50-q4"), ("openvino", "r64-w1.00-q8")}
    ort, ov = got["onnxruntime", "r64-w0.50-q4"], got["openvino", "r64-w1.00-q8"]
    assert (ort.accuracy, ort.accuracy_source, ort.stable) == (0.60, "table", True)
    assert (ov.accuracy, ov.accuracy_source, ov.stable, ov.agreement) == (0.78, "measured", False, 0.93)
    assert ov.peak_memory_bytes == 70_000_000 and ov.path == "box/r64-w1.00-q8.onnx"
    assert set(device.fingerprint["runtimes"]) == {"onnxruntime", "openvino"}
    # a subnet chosen for both runtimes is one file
    both = _select(results, tmp_path / "dist2", "latency=10ms")
    assert both.returncode == 0, both.stderr
    files = mf.read_manifest(tmp_path / "dist2").devices["box"].files
    assert {(e.runtime, e.path) for e in files} == {("onnxruntime", "box/r64-w1.00-q8.onnx"),
                                                   ("openvino", "box/r64-w1.00-q8.onnx")}
    assert sorted(p.name for p in (tmp_path / "dist2" / "box").iterdir()) == ["r64-w1.00-q8.onnx"]


def test_selecting_one_runtime_keeps_the_devices_other_runtime(tmp_path):
    dist = tmp_path / "dist"
    assert _select(make_results(tmp_path, name="both.json"), dist, "latency=10ms").returncode == 0
    only_ort = make_results(tmp_path, runtimes=("onnxruntime",), name="ort.json")
    result = _select(only_ort, dist, "latency=2.5ms")
    assert result.returncode == 0, result.stderr
    files = mf.read_manifest(dist).devices["box"].files
    assert {(e.runtime, e.subnet) for e in files} == {("openvino", "r64-w1.00-q8"), ("onnxruntime", "r64-w0.50-q4")}
    assert (dist / "box" / "r64-w1.00-q8.onnx").exists()  # still OpenVINO's file
    # measured with other settings than the runtime it would sit beside: one line, nothing changed
    before = (dist / "manifest.json").read_bytes()
    other = make_results(tmp_path, runtimes=("onnxruntime",), threads=4, name="t4.json")
    _one_line_error(_select(other, dist, "latency=10ms"), "also serves openvino, measured with another threads")
    assert (dist / "manifest.json").read_bytes() == before


@pytest.mark.parametrize("change,needle", [
    (lambda d: d["models"][1].update(runtime="tensorrt"), "runtime 'tensorrt', which the fingerprint does not describe"),
    (lambda d: d["fingerprint"]["runtimes"].pop("openvino"), "runtime 'openvino', which the fingerprint does not"),
    (lambda d: d["models"].append(dict(d["models"][1])), "was measured twice on openvino"),
    (lambda d: d["fingerprint"].pop("runtimes"), "fingerprint's 'runtimes' is missing"),
    (lambda d: d.update(version=1), "names a runtime in a version 1 results file"),
    (lambda d: d["models"][1].update(agreement=1.5), "malformed agreement"),
    (lambda d: d["models"][0].update(peak_memory_no_arena_bytes=None), "no valid peak_memory_no_arena_bytes"),
])
def test_results_that_mix_runtimes_inconsistently_are_one_line(tmp_path, change, needle):
    results = make_results(tmp_path)
    data = json.loads(results.read_text())
    change(data)
    results.write_text(json.dumps(data))
    with pytest.raises(RtfqError, match=needle):
        read_results(results)
    _one_line_error(_select(results, tmp_path / "dist", "10ms"), needle.split(",")[0])
    assert not (tmp_path / "dist").exists()


def test_select_without_a_table_needs_every_row_measured(tmp_path):
    results = make_results(tmp_path)
    _one_line_error(_run("rtfq-bench", "select", "--results", str(results), "-o", str(tmp_path / "d"), "--budget",
                         "10ms"), "give --accuracy")
    data = json.loads(results.read_text())
    data["models"] = [r for r in data["models"] if r["runtime"] == "openvino"]
    data["fingerprint"]["runtimes"].pop("onnxruntime")
    results.write_text(json.dumps(data))
    result = _run("rtfq-bench", "select", "--results", str(results), "-o", str(tmp_path / "d"), "--budget", "10ms",
                  "--device", "box", "--no-report")
    assert result.returncode == 0, result.stderr
    assert "no row uses the accuracy table" in result.stdout


def test_manifests_from_before_runtimes_still_load_and_mean_onnxruntime(tmp_path):
    entry = {"subnet": "r64-w0.50-q4", "path": "old/r64-w0.50-q4.onnx", "sha256": "ab" * 32, "size_bytes": 10,
             "latency_p50_ms": 1.0, "latency_p90_ms": 1.2, "peak_memory_bytes": 5, "macs": 1, "bitops": 2,
             "accuracy": 0.5, "budgets": ["1ms"]}
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "rtfq-manifest", "version": 1, "devices": {
        "old": {"fingerprint": {}, "updated": "", "files": [entry]}}}))
    device = mf.read_manifest(tmp_path).devices["old"]
    assert device.files[0].runtime == "onnxruntime" and device.files[0].stable is None and device.runtimes == ["onnxruntime"]
    mf.write_manifest(tmp_path, mf.read_manifest(tmp_path))
    assert json.loads((tmp_path / "manifest.json").read_text())["devices"]["old"]["files"] == [entry]  # byte-compatible
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "rtfq-manifest", "version": 1, "devices": {
        "old": {"fingerprint": {}, "updated": "", "files": [entry | {"runtime": "openvino"}]}}}))
    with pytest.raises(RtfqError, match="openvino entries in a version 1 manifest"):
        mf.read_manifest(tmp_path)


def test_server_resolves_per_runtime_or_over_all_and_fetch_gets_it(tmp_path):
    results, dist = make_results(tmp_path), tmp_path / "dist"
    assert _select(results, dist, "latency=4ms", "latency=10ms").returncode == 0
    with serving(dist) as url:
        devices = request(url, "/v1/devices").json()["devices"]
        assert devices[0]["runtimes"] == ["onnxruntime", "openvino"]
        ov = request(url, "/v1/devices/box/resolve?budget=latency%3D4ms&runtime=openvino").json()
        assert ov["entry"]["runtime"] == "openvino" and ov["entry"]["subnet"] == "r64-w1.00-q8"
        assert "on openvino" in ov["reason"] and "latency figure is unstable" in ov["reason"]
        ort = request(url, "/v1/devices/box/resolve?budget=latency%3D4ms&runtime=onnxruntime").json()
        assert ort["entry"]["runtime"] == "onnxruntime" and ort["entry"]["subnet"] == "r64-w0.50-q4"
        # no runtime: the best entry over the device's runtimes (OpenVINO's 0.78 beats onnxruntime's 0.60)
        best = request(url, "/v1/devices/box/resolve?budget=latency%3D4ms").json()
        assert (best["entry"]["runtime"], best["entry"]["subnet"]) == ("openvino", "r64-w1.00-q8")
        bad = request(url, "/v1/devices/box/resolve?budget=4ms&runtime=tensorrt")
        assert bad.status == 400 and "one of onnxruntime, openvino" in bad.json()["error"]
        twice = request(url, "/v1/devices/box/resolve?budget=4ms&runtime=openvino&runtime=onnxruntime")
        assert twice.status == 400
        out = tmp_path / "model.onnx"
        got = fetch(FetchConfig(server=url, device="box", budget="latency=4ms", out=out, runtime="onnxruntime"))
        assert got.entry["runtime"] == "onnxruntime" and out.read_bytes() == (tmp_path / "models" / "r64-w0.50-q4.onnx").read_bytes()
        cli = _run("rtfq", "fetch", "--server", url, "--device", "box", "--budget", "latency=4ms", "--runtime", "openvino",
                   "-o", str(tmp_path / "ov.onnx"))
        assert cli.returncode == 0, cli.stderr
        assert "for openvino" in cli.stdout and "latency figure is unstable" in cli.stdout
        _one_line_error(_run("rtfq", "fetch", "--server", url, "--device", "box", "--budget", "4ms", "--runtime", "tvm",
                             "-o", str(tmp_path / "x.onnx")), "Invalid value for '--runtime'")
    # a device with only onnxruntime entries: asking for OpenVINO is a 404 naming what it has
    only = tmp_path / "only"
    assert _select(make_results(tmp_path, runtimes=("onnxruntime",), name="o.json"), only, "10ms").returncode == 0
    with serving(only) as url:
        missing = request(url, "/v1/devices/box/resolve?budget=10ms&runtime=openvino")
        assert missing.status == 404 and missing.json()["runtimes"] == ["onnxruntime"]


def test_help_of_select_and_fetch_names_runtimes():
    select = _run("rtfq-bench", "select", "--help").stdout
    assert "each measured runtime" in select and "--accuracy" in select
    fetch_help = _run("rtfq", "fetch", "--help").stdout
    assert "--runtime [onnxruntime|openvino]" in fetch_help
