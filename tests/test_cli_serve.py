"""``rtfq-serve`` and ``rtfq fetch`` as a user runs them: real processes, real ONNX exports."""

from __future__ import annotations

import contextlib
import hashlib
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
import onnxruntime as ort
import torch

from rtfq_deploy import manifest as mf
from rtfq_deploy.checkpoint import save_checkpoint
from rtfq_deploy.models import SupernetConfig, build_supernet
from rtfq_deploy.serve.runner import bind
from rtfq_deploy.space import SearchSpace
from tests.fixtures.dist import publish, request, wait_for_manifest
from tests.test_cli import _one_line_error, _run

SPACE = SearchSpace(resolutions=(64, 48), widths=(1.0, 0.6), bits=(8, 4))


@contextlib.contextmanager
def rtfq_serve(*args: str, **popen) -> Iterator[tuple[str, subprocess.Popen]]:
    """``rtfq-serve ... --port 0``; yields the URL it announces on its first line."""
    exe = str(Path(sys.executable).parent / "rtfq-serve")
    proc = subprocess.Popen([exe, *args, "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **popen)
    try:
        line = proc.stdout.readline()
        match = re.search(r" on (https?://127\.0\.0\.1:\d+) ", line)
        assert match, (line, proc.stderr.read() if proc.poll() is not None else "")
        yield match[1], proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def _export(ckpt: Path, subnet: str, dist: Path, device: str) -> mf.Entry:
    out = dist / device / f"{subnet}.onnx"
    result = _run("rtfq-export", "--checkpoint", str(ckpt), "--subnet", subnet, "--no-verify", "-o", str(out))
    assert result.returncode == 0, result.stderr
    data = out.read_bytes()
    latency, accuracy = {"r64-w1.00-q8": (9.0, 0.7), "r48-w0.60-q4": (2.0, 0.5)}[subnet]
    return mf.Entry(subnet, f"{device}/{subnet}.onnx", hashlib.sha256(data).hexdigest(), len(data), latency,
                    latency * 1.2, 8_000_000, 1_000_000, 10_000_000, accuracy)


def test_serve_and_fetch_real_onnx_models_with_a_hot_publish(tmp_path):
    torch.manual_seed(0)
    ckpt = tmp_path / "tiny.pt"
    save_checkpoint(ckpt, build_supernet(SupernetConfig("tiny_resnet", num_classes=5, space=SPACE)))
    dist = tmp_path / "dist"
    small = _export(ckpt, "r48-w0.60-q4", dist, "pi")
    publish(dist, "pi", [small])
    out = tmp_path / "device" / "model.onnx"
    fetch = ["rtfq", "fetch", "--device", "pi", "--budget", "latency=20ms,memory=64MB", "-o", str(out)]
    with rtfq_serve(str(dist)) as (url, proc):
        got = _run(*fetch, "--server", url)
        assert got.returncode == 0, got.stderr
        assert "r48-w0.60-q4" in got.stdout and out.read_bytes() == (dist / small.path).read_bytes()
        session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        logits = session.run(None, {session.get_inputs()[0].name: np.zeros((1, 3, 48, 48), np.float32)})[0]
        assert logits.shape == (1, 5)

        big = _export(ckpt, "r64-w1.00-q8", dist, "pi")  # published while the server runs
        wait_for_manifest(url, publish(dist, "pi", [small, big]))
        _one_line_error(_run(*fetch, "--server", url), "use --force")
        assert (dist / small.path).read_bytes() == out.read_bytes()  # untouched
        got = _run(*fetch, "--server", url, "--force")
        assert got.returncode == 0 and "r64-w1.00-q8" in got.stdout, got.stderr
        assert hashlib.sha256(out.read_bytes()).hexdigest() == big.sha256
        proc.send_signal(signal.SIGINT)
        assert proc.wait(15) == 130  # a clean stop: "Aborted.", exit 130
    assert not list(out.parent.glob("*.part"))


def test_serve_start_errors_are_one_line(tmp_path):
    _one_line_error(_run("rtfq-serve", str(tmp_path / "absent")), "not a directory")
    (tmp_path / "manifest.json").write_text('{"format": "rtfq-manifest", "version": 1, "devices": {"pi": {}}}')
    _one_line_error(_run("rtfq-serve", str(tmp_path)), "device 'pi' has no 'files' list")
    (tmp_path / "manifest.json").unlink()
    taken = bind("127.0.0.1", 0)
    try:
        port = str(taken.getsockname()[1])
        _one_line_error(_run("rtfq-serve", str(tmp_path), "--port", port), f"cannot listen on 127.0.0.1:{port}")
    finally:
        taken.close()
    _one_line_error(_run("rtfq-serve", str(tmp_path), "--port", "70000"), "70000")


def test_serve_reports_excluded_entries_and_an_empty_dist_dir(tmp_path):
    with rtfq_serve(str(tmp_path)) as (url, _):
        assert request(url, "/v1/devices").json() == {"devices": []}
    entry = mf.Entry("m", "pi/m.onnx", "0" * 64, 3, 1.0, 1.0, 1, 1, 1)
    publish(tmp_path, "pi", [entry])
    with rtfq_serve(str(tmp_path)) as (url, proc):
        assert request(url, "/v1/health").json()["excluded"][0]["reason"] == "file is missing"
        proc.send_signal(signal.SIGINT)
        proc.wait(15)
        assert "not serving pi/m.onnx (pi): file is missing" in proc.stderr.read()


def test_ctrl_c_exits_130_even_when_started_with_sigint_ignored(tmp_path):
    """As under ``nohup rtfq-serve ... &``: uvicorn's re-raised SIGINT is then lost (exit 0)."""
    with rtfq_serve(str(tmp_path), preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) as (url, proc):
        assert request(url, "/v1/health").status == 200
        proc.send_signal(signal.SIGINT)
        assert proc.wait(15) == 130
        assert proc.stderr.read().strip().endswith("Aborted.")
