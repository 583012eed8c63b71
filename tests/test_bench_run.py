"""``rtfq-bench run`` on real exported tiny models, in real child processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch

from rtfq_deploy.bench.run import read_results
from rtfq_deploy.checkpoint import save_checkpoint
from rtfq_deploy.models import SupernetConfig, build_supernet
from rtfq_deploy.space import SearchSpace
from tests.test_cli import _one_line_error, _run

SPACE = SearchSpace(resolutions=(64, 32), widths=(1.0, 0.5), bits=(8, 4))
QUICK = ["--warmup", "2", "--min-runs", "20", "--max-runs", "200", "--min-time", "0", "--max-time", "0.3"]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """Every subnet of a tiny space exported (without verification, to keep it quick)."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("bench")
    save_checkpoint(root / "tiny.pt", build_supernet(SupernetConfig("tiny_resnet", num_classes=5, space=SPACE)))
    result = _run("rtfq-export", "--checkpoint", str(root / "tiny.pt"), "--all", "--no-verify", "-o", str(root / "models"))
    assert result.returncode == 0, result.stderr
    return root / "models"


def _meta(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(path).metadata_props}


def test_run_measures_models_and_reports_a_broken_one_as_a_failed_row(models, tmp_path):
    broken = tmp_path / "broken.onnx"
    broken.write_bytes((models / "r64-w1.00-q8.onnx").read_bytes()[:5000])  # a truncated file
    out = tmp_path / "results.json"
    chosen = [models / "r64-w1.00-q8.onnx", broken, models / "r32-w0.50-q4.onnx"]
    result = _run("rtfq-bench", "run", *map(str, chosen), "-o", str(out), *QUICK)
    assert result.returncode == 1, result.stderr  # one model failed; the others still ran
    assert "1 of 3 rows failed" in result.stderr
    assert "FAILED" in result.stdout and "Protobuf parsing failed" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr
    data = read_results(out)
    ok, bad, ok2 = data["models"]
    assert not bad["ok"] and "Protobuf parsing failed" in bad["error"] and bad["path"] == str(broken.resolve())
    for row, path in ((ok, chosen[0]), (ok2, chosen[2])):
        meta = _meta(path)
        assert row["ok"] and row["error"] is None and row["path"] == str(path.resolve())
        assert row["subnet"] == meta["rtfq.subnet"] == path.stem
        assert (row["macs"], row["bitops"]) == (int(meta["rtfq.macs"]), int(meta["rtfq.bitops"]))
        assert row["metadata"]["rtfq.arch"] == "tiny_resnet"
        assert row["size_bytes"] == path.stat().st_size
        assert row["sha256"] == __import__("hashlib").sha256(path.read_bytes()).hexdigest()
        assert 0 < row["latency_p50_ms"] <= row["latency_p90_ms"] <= row["latency_p99_ms"]
        assert row["latency_std_ms"] >= 0 and row["latency_mean_ms"] > 0
        assert 20 <= row["samples"] <= 200 and row["runs"] == row["samples"] * row["runs_per_sample"]
        assert row["session_create_s"] > 0 and row["runtime"] == "onnxruntime"
        assert isinstance(row["stable"], bool)
        # CPU time per wall time cannot exceed the cores (onnxruntime's own helper threads
        # can take it above 1 even at one intra-op thread on sub-millisecond models)
        cpu = row["cpu_per_wall"]
        if row["measure_time_s"] >= 0.25:
            assert 0 < cpu <= (os.cpu_count() or 1) + 0.25
        elif row["measure_time_s"] < 0.2:
            assert cpu is None  # too short a window for the CPU clock
        assert row["load_average"] >= 0
        # a session and its buffers take memory above the onnxruntime-loaded baseline, but not gigabytes
        assert 0 < row["peak_memory_bytes"] < 2e9 and 0 < row["peak_memory_no_arena_bytes"] < 2e9
        assert row["providers"] == ["CPUExecutionProvider"]
    fp = data["fingerprint"]
    assert fp["provider"] == "CPUExecutionProvider" and fp["threads"] == 1 and fp["batch_size"] == 1
    assert fp["cpu_model"] and fp["logical_cores"] >= 1 and fp["onnxruntime"] and fp["os"]
    assert fp["runtimes"] == {"onnxruntime": {"version": fp["onnxruntime"], "provider": "CPUExecutionProvider",
                                              "graph_optimization": "all"}}
    assert data["settings"]["min_runs"] == 20 and data["settings"]["max_time_s"] == 0.3


def test_batch_threads_and_optimisation_options(models, tmp_path):
    out = tmp_path / "r.json"
    result = _run("rtfq-bench", "run", str(models / "r32-w0.50-q8.onnx"), "-o", str(out), *QUICK, "--batch-size", "3",
                  "--threads", "2", "--graph-optimization", "basic", "--provider", "CPUExecutionProvider", "--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert rows[0]["ok"] and rows[0]["latency_p50_ms"] > 0
    fp = json.loads(out.read_text())["fingerprint"]
    assert (fp["batch_size"], fp["threads"], fp["graph_optimization"]) == (3, 2, "basic")


def test_a_directory_stands_for_its_models_and_the_stopping_caps_hold(models, tmp_path):
    folder = tmp_path / "some"
    folder.mkdir()
    for name in ("r64-w0.50-q4.onnx", "r32-w1.00-q8.onnx"):
        (folder / name).write_bytes((models / name).read_bytes())
    (folder / "notes.txt").write_text("not a model")
    out = tmp_path / "r.json"
    result = _run("rtfq-bench", "run", str(folder), "-o", str(out), "--warmup", "0", "--min-runs", "5",
                  "--max-runs", "7", "--min-time", "0", "--max-time", "5", "--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [r["subnet"] for r in rows] == ["r32-w1.00-q8", "r64-w0.50-q4"]  # sorted, .onnx only
    assert all(r["samples"] == 7 and r["stable"] is False and r["p50_cv"] is None for r in rows)  # too few to judge
    assert all(r["runs"] == 7 * r["runs_per_sample"] and r["runtime"] == "onnxruntime" for r in rows)


def test_run_errors_are_one_line(models, tmp_path):
    out = tmp_path / "r.json"
    m = str(models / "r32-w0.50-q8.onnx")
    _one_line_error(_run("rtfq-bench", "run", m, "-o", str(out), "--provider", "warp-drive"),
                    "execution provider 'warp-drive' is not available here (onnxruntime offers: ")
    _one_line_error(_run("rtfq-bench", "run", m, "-o", str(out), "--min-runs", "10", "--max-runs", "5"),
                    "--min-runs 10 is above --max-runs 5")
    _one_line_error(_run("rtfq-bench", "run", str(tmp_path), "-o", str(out)), "no .onnx files in this directory")
    out.write_text("keep")
    _one_line_error(_run("rtfq-bench", "run", m, "-o", str(out)), "exists (use --force")
    assert out.read_text() == "keep"


def test_missing_file_is_a_failed_row(tmp_path):
    out = tmp_path / "r.json"
    result = _run("rtfq-bench", "run", str(tmp_path / "absent.onnx"), "-o", str(out), *QUICK)
    assert result.returncode == 1
    row = json.loads(out.read_text())["models"][0]
    assert not row["ok"] and row["error"] == "cannot read: No such file or directory"


def test_bench_imports_no_torch_or_onnx():
    code = ("import sys, rtfq_deploy.cli.bench, rtfq_deploy.bench.run, rtfq_deploy.bench.measure, "
            "rtfq_deploy.bench.select, rtfq_deploy.bench.report, rtfq_deploy.bench.fingerprint, rtfq_deploy.accuracy, "
            "rtfq_deploy.bench.runtimes, rtfq_deploy.bench.images, rtfq_deploy.bench.onnxmeta; "
            "bad = [m for m in ('torch', 'onnx', 'matplotlib', 'openvino', 'onnxruntime', 'PIL') if m in sys.modules]; "
            "assert not bad, bad")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_processes_time_a_row_in_several_fresh_processes_and_keep_the_median(models, tmp_path):
    out = tmp_path / "results.json"
    result = _run("rtfq-bench", "run", str(models / "r32-w0.50-q4.onnx"), "-o", str(out), "--processes", "3", *QUICK)
    assert result.returncode == 0, result.stderr
    data = read_results(out)
    (row,) = data["models"]
    p50s = row["process_p50_ms"]
    assert len(p50s) == 3 and row["latency_p50_ms"] == sorted(p50s)[1]
    assert data["settings"]["processes"] == 3
    _one_line_error(_run("rtfq-bench", "run", str(models), "-o", str(tmp_path / "x.json"), "--processes", "0"),
                    "--processes")


@pytest.mark.parametrize("kind", ["fifo", "dev-zero"])
def test_a_fifo_or_a_device_named_onnx_is_refused_at_once(tmp_path, kind):
    model = tmp_path / "m.onnx"
    if kind == "fifo":
        os.mkfifo(model)
    else:
        model.symlink_to("/dev/zero")  # hashed without end before
    _one_line_error(_run("rtfq-bench", "run", str(model), "-o", str(tmp_path / "r.json"), *QUICK),
                    "not a regular file")
    assert not (tmp_path / "r.json").exists()


def test_an_output_fifo_is_refused_even_with_force(models, tmp_path):
    os.mkfifo(tmp_path / "r.json")
    _one_line_error(_run("rtfq-bench", "run", str(models / "r32-w0.50-q8.onnx"), "-o", str(tmp_path / "r.json"),
                         "--force", *QUICK), "a FIFO, not a regular file")
    assert (tmp_path / "r.json").is_fifo()


@pytest.mark.parametrize("mean,std,needle", [
    # NaN and Infinity never get past the bounded JSON reader; finite values out of range
    # are refused by the normalisation check
    ([0.5, 0.5, 0.5], [float("nan"), 0.2, 0.2], "metadata holds NaN, not a finite number"),
    ([float("inf"), 0.5, 0.5], [0.2, 0.2, 0.2], "metadata holds Infinity, not a finite number"),
    ([0.5, 0.5, 0.5], [1e-30, 0.2, 0.2], "the rtfq.input normalisation holds std 1e-30"),
    ([1e6, 0.5, 0.5], [0.2, 0.2, 0.2], "the rtfq.input normalisation holds mean 1000000.0"),
])
def test_metadata_normalisation_must_be_finite_and_in_range(mean, std, needle):
    from rtfq_deploy.bench.images import input_spec
    from rtfq_deploy.errors import RtfqError

    text = json.dumps({"shape": ["N", 3, 32, 32], "mean": mean, "std": std})  # NaN and Infinity as json writes them
    with pytest.raises(RtfqError, match=f"m.onnx: .*{needle}"):
        input_spec({"rtfq.input": text}, "m.onnx")
    assert input_spec({"rtfq.input": json.dumps({"shape": ["N", 3, 32, 32], "mean": [0.4] * 3, "std": [0.2] * 3})},
                      "m.onnx") == (32, [0.4] * 3, [0.2] * 3)


def test_images_on_a_model_with_nan_std_report_no_accuracy(models, tmp_path):
    """End to end: the file's metadata says std NaN; the row says why it has no top-1,
    instead of a top-1 computed on NaN inputs."""
    import numpy as np
    from PIL import Image

    model = onnx.load(models / "r32-w0.50-q8.onnx")
    meta = {p.key: p for p in model.metadata_props}
    meta["rtfq.input"].value = json.dumps({**json.loads(meta["rtfq.input"].value), "std": [float("nan")] * 3})
    if "rtfq.class_names" in meta:
        meta["rtfq.class_names"].value = json.dumps([f"c{i}" for i in range(5)])
    onnx.save(model, tmp_path / "nan.onnx")
    for i in range(5):
        (tmp_path / "images" / f"c{i}").mkdir(parents=True)
        Image.fromarray(np.full((40, 40, 3), 40 * i, np.uint8)).save(tmp_path / "images" / f"c{i}" / "x.png")
    result = _run("rtfq-bench", "run", str(tmp_path / "nan.onnx"), "-o", str(tmp_path / "r.json"), "--images",
                  str(tmp_path / "images"), *QUICK)
    row = json.loads((tmp_path / "r.json").read_text())["models"][0]
    assert row.get("top1") is None and "metadata holds NaN" in row["accuracy_error"], (row, result.stderr)
