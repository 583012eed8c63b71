"""rtfq_deploy.bench.sessions and .graphs, what the research benchmarks in bench/ share:
interleaved timing, runners on both runtimes, the Clip rewrites, one-line argument errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from rtfq_deploy.bench import sessions
from rtfq_deploy.export import reference_graphs as graphs
from rtfq_deploy.scriptargs import int_list, name_list

ROOT = Path(__file__).resolve().parents[1]


def _qdq_add() -> onnx.ModelProto:
    """x -> Q -> Clip(0..15) -> DQ -> Add(., Q -> DQ of x) -> y: one clipped and one unclipped
    Add input."""
    inits = [numpy_helper.from_array(np.array(0.1, np.float32), "s"),
             *(numpy_helper.from_array(np.array(v, np.uint8), name) for name, v in (("zp", 0), ("lo", 0), ("hi", 15)))]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["a_q"]),
             helper.make_node("Clip", ["a_q", "lo", "hi"], ["a_c"]),
             helper.make_node("DequantizeLinear", ["a_c", "s", "zp"], ["a"]),
             helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["b_q"]),
             helper.make_node("DequantizeLinear", ["b_q", "s", "zp"], ["b"]),
             helper.make_node("Add", ["a", "b"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_interleaved_runs_every_runner_each_turn_in_order():
    calls = []
    runners = {k: (lambda k=k: calls.append(k)) for k in ("a", "b")}
    times = sessions.interleaved(runners, 3, warmup=2)
    assert calls == ["a", "a", "b", "b"] + ["a", "b"] * 3  # warm-up, then one of each per turn
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}
    assert sessions.median_ratio([2.0, 4.0, 9.0], [1.0, 1.0, 3.0]) == 3.0  # the median of the per-turn ratios


def test_the_rewrites_keep_what_they_promise():
    model = _qdq_add()
    x = np.array([[0.0, 0.5, 2.0, 30.0]], np.float32)  # 2.0 and 30.0 are past the Clip's 15 codes
    run = lambda m: sessions.ort_session(m, 1).run(None, {"x": x})[0]  # noqa: E731
    exact = run(model)
    assert exact[0, 2] == pytest.approx(1.5 + 2.0)
    unclipped = graphs.without_clips(model)
    assert [n.op_type for n in unclipped.graph.node].count("Clip") == 0 and [n.op_type for n in model.graph.node].count("Clip") == 1
    assert run(unclipped)[0, 2] == pytest.approx(4.0)  # 8-bit everywhere
    clipped, count = graphs.add_input_clips(model)
    assert count == 1  # only the Add input that had no Clip
    np.testing.assert_array_equal(run(clipped), exact)  # a full-range Clip is an identity


def test_runner_runs_a_file_on_both_runtimes(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_qdq_add(), path)
    for runtime in ("onnxruntime", "openvino"):
        pytest.importorskip(runtime)
        run = sessions.runner(runtime, str(path), 1)
        run()
        assert sessions.median_run(run, 3, warmup=1) > 0
    got = sessions.measure_in_child("onnxruntime", str(path), 1, 3)
    assert got["median_s"] > 0 and got["compile_s"] > 0


def test_list_arguments():
    assert int_list("8,4") == [8, 4] and name_list(" r224-w1.00 ,r128-w0.60,") == ["r224-w1.00", "r128-w0.60"]
    for bad in ("", "8,x", "0", "-1"):
        with pytest.raises(Exception, match="expected"):
            int_list(bad)
    with pytest.raises(Exception, match="expected"):
        name_list(" , ")


@pytest.mark.parametrize("argv", [["bench/clip_cost.py", "--bits", "6,x"], ["bench/runtime_latency.py", "--rounds", "0"],
                                  ["bench/alignq_latency.py", "--subnets", ","], ["export/code_flips.py", "--limit", "0"]])
def test_bad_arguments_are_one_line_and_exit_2(argv):
    got = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True)
    lines = got.stderr.strip().splitlines()
    assert got.returncode == 2 and len(lines) == 1 and ": error: argument " in lines[0], got.stderr
