"""The measuring child: stopping rule, inputs, and what the parent makes of children that misbehave."""

from __future__ import annotations

import json
import math
import os
import stat
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from rtfq_deploy.bench.measure import MeasureConfig, make_inputs, p50_cv, run_until_stable
from rtfq_deploy.bench.run import BenchSettings, run_child


class Steps:
    """A deterministic stand-in for session.run: returns the given durations in turn and
    advances a clock by them, so the stopping rule is tested without timing noise."""

    def __init__(self, durations_ns):
        self.durations = list(durations_ns)
        self.now = 0
        self.calls = 0

    def run_batch(self, k: int) -> int:
        total = 0
        for _ in range(k):
            d = self.durations[self.calls % len(self.durations)]
            self.calls += 1
            self.now += d
            total += d
        return total

    def clock(self) -> int:
        return self.now


def test_steady_latency_stops_at_min_runs_with_exact_statistics():
    steps = Steps([2_000_000])  # 2 ms every run
    config = MeasureConfig(model="", warmup=3, min_runs=40, max_runs=1000, min_time_s=0, max_time_s=100,
                           sample_time_s=0)
    lat = run_until_stable(steps.run_batch, config, clock=steps.clock)
    assert lat.runs == 40 and steps.calls == 43 and lat.stable and lat.p50_cv == lat.p50_drift == 0.0
    assert lat.p50_ms == lat.p90_ms == lat.p99_ms == lat.mean_ms == 2.0 and lat.std_ms == 0.0


def test_noisy_latency_runs_longer_until_the_p50_settles():
    rng = np.random.default_rng(0)
    noisy = (1e6 * (1 + 0.3 * rng.standard_normal(5000) ** 2)).astype(int).tolist()
    config = MeasureConfig(model="", warmup=0, min_runs=20, max_runs=5000, min_time_s=0, max_time_s=1e9,
                           cv_target=0.005, sample_time_s=0)
    lat = run_until_stable(Steps(noisy).run_batch, config, clock=Steps(noisy).clock)
    assert 20 < lat.runs < 5000 and lat.stable and lat.p50_cv <= 0.005 and lat.p50_drift <= 0.01
    # a looser target stops sooner
    loose = run_until_stable(Steps(noisy).run_batch, replace(config, cv_target=0.05), clock=Steps(noisy).clock)
    assert loose.runs < lat.runs
    assert lat.p50_ms == pytest.approx(np.percentile(np.asarray(noisy[: lat.runs]) / 1e6, 50))


def test_drift_never_looks_stable_and_caps_hold():
    drifting = [1_000_000 + 5_000 * i for i in range(3000)]  # the machine heats up: +0.5% per run
    steps = Steps(drifting)
    config = MeasureConfig(model="", warmup=0, min_runs=20, max_runs=300, min_time_s=0, max_time_s=1e9,
                           sample_time_s=0)
    lat = run_until_stable(steps.run_batch, config, clock=steps.clock)
    assert lat.runs == 300 and not lat.stable and lat.p50_drift > 2 * config.cv_target
    steps = Steps(drifting)
    timed = run_until_stable(steps.run_batch, replace(config, max_runs=10_000, max_time_s=0.05), clock=steps.clock)
    assert not timed.stable and timed.time_s == pytest.approx(0.05, rel=0.1)  # the (simulated) time cap


def test_min_time_keeps_running_after_the_p50_is_stable():
    steps = Steps([1_000_000])
    config = MeasureConfig(model="", warmup=0, min_runs=20, max_runs=10_000, min_time_s=0.5, max_time_s=100,
                           sample_time_s=0)
    lat = run_until_stable(steps.run_batch, config, clock=steps.clock)
    assert lat.stable and lat.runs == 500


def test_sub_millisecond_runs_are_timed_in_batches_that_last_the_sample_time():
    # 0.1 ms runs with heavy single-run jitter (every fifth run 5x slower): one run per
    # sample never settles within 2000 samples; 2 ms batches (20 runs) are all alike
    jitter = [100_000, 100_000, 100_000, 100_000, 500_000]
    single = MeasureConfig(model="", warmup=5, min_runs=30, max_runs=2000, min_time_s=0.3, max_time_s=100,
                           sample_time_s=0)
    alone = run_until_stable(Steps(jitter).run_batch, single, clock=Steps(jitter).clock)
    assert alone.runs_per_sample == 1 and alone.samples == alone.runs == 2000  # the 0.3 s were never reached
    steps = Steps(jitter)
    batched = run_until_stable(steps.run_batch, replace(single, sample_time_s=0.002), clock=steps.clock)
    assert batched.runs_per_sample == 20  # 2 ms / the median warm-up run (0.1 ms)
    assert batched.runs == 20 * batched.samples and batched.stable and batched.p50_cv == 0.0
    assert batched.p50_ms == pytest.approx(0.18)  # the true mean per run: (4 x 0.1 + 0.5) / 5 ms
    assert batched.time_s >= 0.3 and batched.samples < 2000


def test_runs_per_sample_follows_the_warm_up():
    from rtfq_deploy.bench.measure import runs_per_sample

    assert runs_per_sample([50_000_000, 1_000_000, 1_000_000], 0.002) == 2  # the slow first run is left out
    assert runs_per_sample([3_000_000] * 3, 0.002) == 1  # slower than a sample: one run each
    assert runs_per_sample([10_000] * 3, 0.002) == 200
    assert runs_per_sample([10_000] * 3, 0) == 1 and runs_per_sample([], 0.002) == 1


def test_p50_cv_needs_two_runs_per_block():
    assert math.isnan(p50_cv([1, 2, 3], 10))
    assert p50_cv([5] * 20, 10) == 0.0
    assert p50_cv([1, 1, 3, 3] * 5, 10) > 0


def _session(shape, tmp_path: Path, elem=TensorProto.FLOAT):
    import onnxruntime as ort

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", elem, shape)],
                              [helper.make_tensor_value_info("y", elem, shape)])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), path)
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]), path


def test_inputs_follow_the_model_and_the_batch_size(tmp_path):
    session, _ = _session(["N", 3, 8, 8], tmp_path)
    feeds = make_inputs(session, 4, seed=0)
    assert feeds["x"].shape == (4, 3, 8, 8) and feeds["x"].dtype == np.float32
    assert np.array_equal(feeds["x"], make_inputs(session, 4, seed=0)["x"])  # seeded
    session, _ = _session([1, 3, 8, 8], tmp_path, TensorProto.UINT8)
    assert make_inputs(session, 1, seed=0)["x"].dtype == np.uint8
    with pytest.raises(ValueError, match="fixed batch dimension 1; --batch-size 2 is not possible"):
        make_inputs(session, 2, seed=0)
    session, _ = _session(["N", 3, "H", "W"], tmp_path)
    with pytest.raises(ValueError, match="symbolic dimension 'H' beyond the batch"):
        make_inputs(session, 1, seed=0)


def test_child_prints_one_json_line(tmp_path):
    _, path = _session(["N", 3, 8, 8], tmp_path)
    config = MeasureConfig(model=str(path), warmup=1, min_runs=10, max_runs=20, min_time_s=0, max_time_s=1)
    out = subprocess.run([sys.executable, "-m", "rtfq_deploy.bench.measure", config.to_json()], capture_output=True,
                         text=True, check=True).stdout
    assert len(out.splitlines()) == 1
    result = json.loads(out)
    lat = result["latency"]
    assert result["ok"] and result["metadata"] == {} and 10 <= lat["samples"] <= 20
    assert lat["runs"] == lat["samples"] * lat["runs_per_sample"] >= lat["samples"]
    assert result["peak_memory_bytes"] >= 0 and result["memory_method"]
    fixed = MeasureConfig.from_json(json.dumps({"model": str(path), "batch_size": 2, "unknown_key": 1}))
    assert fixed.batch_size == 2


def _fake_python(tmp_path: Path, body: str) -> str:
    script = tmp_path / "python"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


@pytest.mark.parametrize("body,needle", [
    ("kill -SEGV $$", "crashed (SIGSEGV)"),
    ("echo 'not json'; echo 'model exploded' >&2; exit 3", "exited with status 3 and no result: model exploded"),
    ("echo '{\"ok\": false, \"error\": \"bad model\"}'", "bad model"),
    ("sleep 30", "timed out after 1 s"),
])
def test_parent_turns_any_child_failure_into_a_reason(tmp_path, body, needle):
    settings = BenchSettings(measure=MeasureConfig(model="m.onnx"), timeout_s=1, python=_fake_python(tmp_path, body))
    result = run_child(settings.measure, settings)
    assert result["ok"] is False and needle in result["error"]


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="Linux /proc memory counters")
def test_memory_above_baseline_grows_with_the_model(tmp_path):
    """A model holding a 64 MB constant shows at least that much more peak memory than
    one holding nothing (real sessions, real processes)."""
    big = np.ones((16, 1024, 1024), dtype=np.float32)
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1024, 1024])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [16, 1024, 1024])],
                              [onnx.numpy_helper.from_array(big, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), tmp_path / "big.onnx")
    _, small = _session(["N", 3, 8, 8], tmp_path)
    settings = BenchSettings(measure=MeasureConfig(model="", warmup=1, latency=False, memory_runs=1))
    peaks = {name: run_child(replace(settings.measure, model=str(p)), settings)["peak_memory_bytes"]
             for name, p in (("big", tmp_path / "big.onnx"), ("small", small))}
    assert peaks["big"] - peaks["small"] > 64e6
