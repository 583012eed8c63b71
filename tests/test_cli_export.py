from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
import torch

from rtfq_deploy.checkpoint import save_checkpoint
from rtfq_deploy.models import SupernetConfig, build_supernet
from rtfq_deploy.space import SearchSpace
from tests.test_cli import _one_line_error, _run

SPACE = SearchSpace(resolutions=(64, 48), widths=(1.0, 0.6), bits=(8, 4))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ck") / "tiny.pt"
    save_checkpoint(path, build_supernet(SupernetConfig("tiny_resnet", num_classes=5, space=SPACE)))
    return path


def test_budget_export_says_why_and_writes_a_checked_file(ckpt, tmp_path):
    out = tmp_path / "m.onnx"
    result = _run("rtfq-export", "--checkpoint", str(ckpt), "--budget", "5M", "--bits", "4", "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert "chose r48-w1.00-q4: no accuracy table given, so the costliest subnet" in result.stdout
    assert "integer kernels only" in result.stdout
    assert "no calibrated BatchNorm statistics" in result.stderr  # a warning, not an error
    model = onnx.load(out)
    onnx.checker.check_model(model, full_check=True)
    assert {p.key: p.value for p in model.metadata_props}["rtfq.subnet"] == "r48-w1.00-q4"


def test_accuracy_all_and_buckets(ckpt, tmp_path):
    acc = tmp_path / "acc.json"
    acc.write_text(json.dumps({"subnets": [{"subnet": "r48-w0.60-q8", "top1": 0.9}, {"subnet": "r64-w1.00-q4", "top1": 0.5}]}))
    result = _run("rtfq-export", "--checkpoint", str(ckpt), "--budget", "1G", "--accuracy", str(acc), "--no-verify",
                  "-o", str(tmp_path / "best.onnx"), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)[0]["subnet"] == "r48-w0.60-q8" and "most accurate" in result.stderr
    result = _run("rtfq-export", "--checkpoint", str(ckpt), "--all", "--no-verify", "-o", str(tmp_path / "all"))
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "all").iterdir()) == sorted(f"{c}.onnx" for c in SPACE)
    result = _run("rtfq-export", "--checkpoint", str(ckpt), "--buckets", "2", "--bits", "4", "--no-verify",
                  "-o", str(tmp_path / "buckets"), "--json")
    rows = json.loads(result.stdout)
    assert [r["subnet"] for r in rows] == ["r64-w0.60-q4", "r64-w1.00-q4"]  # costliest under each edge


def test_export_errors_are_one_line_exit_2_and_write_nothing(ckpt, tmp_path):
    out = tmp_path / "x.onnx"
    base = ["rtfq-export", "--checkpoint", str(ckpt), "-o", str(out)]
    _one_line_error(_run(*base, "--budget", "0.1M"), "below the cheapest subnet (r48-w0.60-q4")
    _one_line_error(_run(*base, "--budget", "1G", "--bits", "6"), "bit-width 6 is not in the space (valid: 8, 4)")
    _one_line_error(_run(*base, "--budget", "lots"), "malformed budget 'lots'")
    _one_line_error(_run(*base, "--subnet", "r224-w1.00-q4"), "resolution 224 (valid: 64, 48)")
    _one_line_error(_run(*base, "--subnet", "r64-w1.00-q4", "--budget", "1G"), "exactly one of")
    _one_line_error(_run(*base), "exactly one of")
    _one_line_error(_run(*base, "--subnet", "r64-w1.00-q4", "--bits", "4"), "--bits goes with")
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "foreign.pt")
    _one_line_error(_run("rtfq-export", "--checkpoint", str(tmp_path / "foreign.pt"), "--subnet", "r64-w1.00-q4",
                         "-o", str(out)), "not an rtfq supernet checkpoint")
    assert not out.exists()
    out.write_bytes(b"keep me")
    _one_line_error(_run(*base, "--subnet", "r64-w1.00-q4"), "exists (use --force")
    assert out.read_bytes() == b"keep me"
    assert _run(*base, "--subnet", "r64-w1.00-q4", "--force", "--no-verify").returncode == 0
    assert out.read_bytes() != b"keep me"


def test_verification_on_an_image_folder(ckpt, tmp_path):
    from PIL import Image

    folder = tmp_path / "target" / "class_a"
    folder.mkdir(parents=True)
    rng = __import__("numpy").random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (40 + i, 50, 3), dtype="uint8")).save(folder / f"{i}.png")
    (folder / "broken.jpg").write_bytes(b"not an image")
    result = _run("rtfq-export", "--checkpoint", str(ckpt), "--subnet", "r48-w0.60-q8", "--verify-images",
                  str(tmp_path / "target"), "-o", str(tmp_path / "m.onnx"), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)[0]["verify"]["samples"] == 5
    assert "skipped 1 unreadable image file(s)" in result.stderr
    _one_line_error(_run("rtfq-export", "--checkpoint", str(ckpt), "--subnet", "r48-w0.60-q8", "--verify-images",
                         str(tmp_path / "nothing"), "-o", str(tmp_path / "n.onnx")), "does not exist")
