"""``rtfq-bench run`` on onnxruntime and OpenVINO: real exports, real sessions, real images."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from rtfq_deploy.bench.run import read_results
from rtfq_deploy.checkpoint import save_checkpoint
from rtfq_deploy.models import SupernetConfig, build_supernet
from rtfq_deploy.space import SearchSpace
from tests.test_cli import _one_line_error, _run

ov = pytest.importorskip("openvino")  # the test extra installs it; CI runs these

SPACE = SearchSpace(resolutions=(32,), widths=(1.0, 0.5), bits=(8, 4))
QUICK = ["--warmup", "2", "--min-runs", "10", "--max-runs", "100", "--min-time", "0", "--max-time", "0.2"]
CLASSES = 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path]:
    """Two exported subnets of a random tiny supernet and a labeled image folder."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("runtimes")
    save_checkpoint(root / "tiny.pt", build_supernet(SupernetConfig("tiny_resnet", num_classes=CLASSES, space=SPACE)))
    models = root / "models"
    for subnet in ("r32-w0.50-q8", "r32-w1.00-q4"):
        result = _run("rtfq-export", "--checkpoint", str(root / "tiny.pt"), "--subnet", subnet, "--no-verify",
                      "-o", str(models / f"{subnet}.onnx"))
        assert result.returncode == 0, result.stderr
    rng = np.random.default_rng(0)
    images = root / "images"
    for c in range(CLASSES):
        (images / str(c)).mkdir(parents=True)
        for i in range(6):
            size = (int(rng.integers(30, 60)), int(rng.integers(30, 60)))
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(images / str(c) / f"{i}.png")
    return models, images


def _reference_outputs(model: Path, images: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Logits of onnxruntime and OpenVINO image by image (batch 1), preprocessed by the
    toolkit's torch-side rule, and the labels: an independent check of the bench's figures."""
    import onnxruntime as ort

    from rtfq_deploy.images import load_folder

    meta = {p.key: p.value for p in onnx.load(model).metadata_props}
    spec = json.loads(meta["rtfq.input"])
    x = load_folder(images, spec["shape"][2], spec["mean"], spec["std"]).numpy()
    labels = np.repeat(np.arange(CLASSES), 6)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # as the bench runs it: thread counts can break rounding ties differently
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    ort_logits = np.concatenate([session.run(None, {spec["name"]: x[i:i + 1]})[0] for i in range(len(x))])
    # OpenVINO at the static batch the bench's accuracy pass compiles: on CPUs without VNNI
    # (or with ONEDNN_MAX_CPU_ISA=AVX2) another batch takes other int8 kernels, other results
    from rtfq_deploy.bench.measure import ACCURACY_BATCH

    core = ov.Core()
    static = core.read_model(str(model))
    static.reshape({static.inputs[0].get_any_name(): [ACCURACY_BATCH, *x.shape[1:]]})
    compiled = core.compile_model(static, "CPU", {"INFERENCE_NUM_THREADS": 1, "NUM_STREAMS": 1,
                                                  "PERFORMANCE_HINT": "LATENCY"})
    chunks = []
    for i in range(0, len(x), ACCURACY_BATCH):
        chunk = x[i:i + ACCURACY_BATCH]
        padded = np.concatenate([chunk, np.zeros((ACCURACY_BATCH - len(chunk), *x.shape[1:]), x.dtype)])
        chunks.append(compiled({0: padded})[0][:len(chunk)])
    return ort_logits, np.concatenate(chunks), labels


def test_both_runtimes_measured_with_accuracy_and_agreement(setup, tmp_path):
    models, images = setup
    out = tmp_path / "r.json"
    result = _run("rtfq-bench", "run", str(models), "-o", str(out), "--runtime", "onnxruntime", "--runtime", "openvino",
                  "--images", str(images), *QUICK)
    assert result.returncode == 0, result.stderr
    assert "openvino" in result.stdout and "agrees" in result.stdout
    data = read_results(out)
    assert data["version"] == 2
    fp = data["fingerprint"]
    assert fp["runtimes"]["openvino"] == {"version": __import__("importlib.metadata").metadata.version("openvino"),
                                          "device": "CPU"}
    assert fp["runtimes"]["onnxruntime"]["provider"] == "CPUExecutionProvider"
    assert data["settings"]["runtimes"] == ["onnxruntime", "openvino"]
    assert data["settings"]["images"]["images"] == 6 * CLASSES
    rows = data["models"]
    # interleaved: each model on onnxruntime, then on OpenVINO
    assert [(Path(r["path"]).stem, r["runtime"]) for r in rows] == [
        ("r32-w0.50-q8", "onnxruntime"), ("r32-w0.50-q8", "openvino"),
        ("r32-w1.00-q4", "onnxruntime"), ("r32-w1.00-q4", "openvino")]
    for row in rows:
        assert row["ok"] and row["latency_p50_ms"] > 0 and row["session_create_s"] > 0
        assert row["subnet"] == Path(row["path"]).stem and row["macs"] > 0  # metadata read without onnx on OpenVINO
        assert row["metadata"]["rtfq.arch"] == "tiny_resnet"
        assert 0 < row["peak_memory_bytes"] < 2e9
        ort_logits, ov_logits, labels = _reference_outputs(Path(row["path"]), images)
        logits = ort_logits if row["runtime"] == "onnxruntime" else ov_logits
        assert row["images"] == len(labels)
        assert row["top1"] == pytest.approx(float((logits.argmax(1) == labels).mean()))
        assert row["agreement_reference"] == "onnxruntime"
        assert row["agreement"] == pytest.approx(float((logits.argmax(1) == ort_logits.argmax(1)).mean()))
        assert row["max_logit_diff"] == pytest.approx(float(np.abs(logits - ort_logits).max()), abs=1e-5)
        if row["runtime"] == "openvino":
            assert row["peak_memory_no_arena_bytes"] is None  # no arena switch: one memory figure
            assert row["openvino_device"] == "CPU" and row["inference_threads"] == 1
        else:
            assert row["agreement"] == 1.0 and row["max_logit_diff"] == 0.0 and row["peak_memory_no_arena_bytes"] > 0


def test_preprocessing_without_torch_equals_the_toolkits(setup):
    from rtfq_deploy.bench.images import load_image as device_load
    from rtfq_deploy.images import load_image

    _, images = setup
    for path in sorted(images.rglob("*.png"))[:6]:
        for resolution in (32, 40, 17):
            assert np.array_equal(device_load(path, resolution), load_image(path, resolution))


def test_a_model_a_runtime_cannot_compile_is_a_failed_row_and_the_rest_still_run(setup, tmp_path):
    models, _ = setup
    broken = tmp_path / "broken.onnx"
    broken.write_bytes((models / "r32-w0.50-q8.onnx").read_bytes()[:4000])
    out = tmp_path / "r.json"
    result = _run("rtfq-bench", "run", str(broken), str(models / "r32-w0.50-q8.onnx"), "-o", str(out),
                  "--runtime", "openvino", *QUICK)
    assert result.returncode == 1 and "1 of 2 rows failed" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    bad, good = read_results(out)["models"]
    assert not bad["ok"] and bad["runtime"] == "openvino" and bad["error"]
    assert good["ok"] and good["runtime"] == "openvino"
    assert list(read_results(out)["fingerprint"]["runtimes"]) == ["openvino"]


def test_a_runtime_that_is_not_installed_is_one_line(setup, tmp_path):
    models, _ = setup
    shim = tmp_path / "shim" / "openvino"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('No module named openvino (blocked by the test)')\n")
    env = dict(os.environ, PYTHONPATH=f"{shim.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    exe = Path(sys.executable).parent / "rtfq-bench"
    result = subprocess.run([str(exe), "run", str(models), "-o", str(tmp_path / "r.json"), "--runtime", "openvino"],
                            capture_output=True, text=True, env=env, timeout=120)
    _one_line_error(result, "runtime openvino is not installed here")
    assert "rtfq_deploy[openvino]" in result.stderr and not (tmp_path / "r.json").exists()


def test_images_whose_classes_differ_from_the_models_are_one_line(setup, tmp_path):
    models, images = setup
    other = tmp_path / "other"
    for name in ("cat", "dog"):
        (other / name).mkdir(parents=True)
        (other / name / "a.png").write_bytes((images / "0" / "0.png").read_bytes())
    _one_line_error(_run("rtfq-bench", "run", str(models), "-o", str(tmp_path / "r.json"), "--images", str(other)),
                    "its classes differ from the image folder's")
    _one_line_error(_run("rtfq-bench", "run", str(models), "-o", str(tmp_path / "r.json"), "--images",
                         str(tmp_path / "absent")), "does not exist")
    _one_line_error(_run("rtfq-bench", "run", str(models), "-o", str(tmp_path / "r.json"), "--runtime", "tensorrt"),
                    "Invalid value for '--runtime'")
    _one_line_error(_run("rtfq-bench", "run", str(models), "-o", str(tmp_path / "r.json"), "--openvino-device",
                         "CPU; rm -rf /"), "is not an OpenVINO device name")
    _one_line_error(_run("rtfq-bench", "run", str(models), "-o", str(tmp_path / "r.json"), "--sample-time", "nan"),
                    "--sample-time")
    _one_line_error(_run("rtfq-bench", "run", str(models), "-o", str(tmp_path / "r.json"), "--runtime", "openvino",
                         "--openvino-device", "NPU7"), "OpenVINO device 'NPU7' is not available here (OpenVINO offers: CPU")


def test_help_names_the_runtime_options():
    result = _run("rtfq-bench", "run", "--help")
    assert result.returncode == 0
    for option in ("--runtime", "--openvino-device", "--images", "--sample-time"):
        assert option in result.stdout
    assert "--runtime" in _run("rtfq", "fetch", "--help").stdout


def test_metadata_reader_matches_onnx_and_refuses_garbage(setup, tmp_path):
    from rtfq_deploy.bench.onnxmeta import MetadataError, read_metadata

    models, _ = setup
    for path in models.glob("*.onnx"):
        assert dict(read_metadata(path)) == {p.key: p.value for p in onnx.load(path).metadata_props}
    for i, junk in enumerate((b"", b"\xff" * 50, (models / "r32-w0.50-q8.onnx").read_bytes()[:3000])):
        (tmp_path / f"{i}.onnx").write_bytes(junk)
        with pytest.raises(MetadataError):
            read_metadata(tmp_path / f"{i}.onnx")


def test_a_device_with_openvino_only_benchmarks_without_torch_onnx_or_onnxruntime(setup, tmp_path):
    """torch, onnx and onnxruntime made unimportable (as on a device that installed only
    OpenVINO): latency, memory and top-1 still measured; no agreement without onnxruntime."""
    models, images = setup
    shim = tmp_path / "shim"
    for name in ("torch", "onnx", "onnxruntime"):
        (shim / name).mkdir(parents=True)
        (shim / name / "__init__.py").write_text(f"raise ImportError('No module named {name} (blocked by the test)')\n")
    env = dict(os.environ, PYTHONPATH=str(shim))
    exe = Path(sys.executable).parent / "rtfq-bench"
    out = tmp_path / "r.json"
    result = subprocess.run([str(exe), "run", str(models / "r32-w0.50-q8.onnx"), "-o", str(out), "--runtime", "openvino",
                             "--images", str(images), *QUICK], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    (row,) = read_results(out)["models"]
    assert row["ok"] and row["runtime"] == "openvino" and row["subnet"] == "r32-w0.50-q8" and row["macs"] > 0
    assert 0 <= row["top1"] <= 1 and row["images"] == 6 * CLASSES
    assert "agreement" not in row  # nothing to compare with: onnxruntime is not there
    blocked = subprocess.run([str(exe), "run", str(models), "-o", str(tmp_path / "o.json")], capture_output=True,
                             text=True, env=env, timeout=120)
    _one_line_error(blocked, "runtime onnxruntime is not installed here")
