"""Latency of one subnet's graphs on onnxruntime and on OpenVINO, side by side in one run
(ResNet-50 by default; ``--arch mobilenet_v2`` for the edge family).

Graphs of each subnet (random-init weights, batch 1), each run on both runtimes' CPU
backends:

- ``ours``: rtfq-export's integer QDQ file (what ``rtfq-bench run`` measures);
- ``ours+addclip``: the same with a full-range (identity) integer Clip on every residual
  Add input that has none, the rewrite that makes OpenVINO follow the QDQ semantics
  (``bench/openvino_semantics.py``); measured to see what it costs each runtime;
- ``ort_qdq``: onnxruntime's own ``quantize_static`` (QDQ, per-channel, U8S8) of the
  subnet's fp32 graph;
- ``fp32``: that fp32 graph.

Each measurement is one fresh process holding one session or compiled model (several
multi-threaded sessions in one process fight over the cores), and the graph x runtime
pairs of a subnet are measured in alternation for ``--rounds`` rounds, so machine
drift hits all alike. Every figure is reported as a ratio to onnxruntime running
``ort_qdq`` (the median of per-round ratios); the absolute median of that reference is
printed with the CPU model.

    python bench/runtime_latency.py [--subnets r224-w1.00,r160-w0.73,r128-w0.60] [--bits 8,4]
                                    [--threads 1,2] [--rounds 3] [--runs 15]
    python bench/runtime_latency.py --interleaved 200      # one process, one thread, run by run
    python bench/runtime_latency.py --arch mobilenet_v2 --interleaved 200 --subnets r224-w1.00,r128-w0.60

``--interleaved N``: all eight graph x runtime pairs of a subnet in one process at one
thread, run in turn N times (no thread pools to contend at one thread); each ratio is
the median of N per-turn ratios, free of process-to-process and machine drift: the
precise way to read small differences such as the cost of the add-input clips.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

RUNTIMES = ("onnxruntime", "openvino")


def child(runtime: str, path: str, threads: int, runs: int) -> None:
    """Print the median seconds of ``runs`` runs (after 5 warm-up runs) and the compile time."""
    start = time.perf_counter()
    if runtime == "onnxruntime":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        r = session.get_inputs()[0].shape[2]
        feed = {session.get_inputs()[0].name: np.random.default_rng(1).standard_normal((1, 3, r, r)).astype(np.float32)}

        def once() -> None:
            session.run(None, feed)
    else:
        import openvino as ov

        core = ov.Core()
        model = core.read_model(path)
        port = model.inputs[0]
        shape = [1, *[d.get_length() for d in list(port.get_partial_shape())[1:]]]
        model.reshape({port.get_any_name(): shape})
        compiled = core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1,
                                                     "PERFORMANCE_HINT": "LATENCY"})
        request = compiled.create_infer_request()
        request.set_input_tensor(ov.Tensor(np.random.default_rng(1).standard_normal(shape).astype(np.float32)))

        def once() -> None:
            request.infer()
    compile_s = time.perf_counter() - start
    for _ in range(5):
        once()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        once()
        times.append(time.perf_counter() - t0)
    print(json.dumps({"median_s": statistics.median(times), "compile_s": compile_s}))


def _runner(runtime: str, path: str, threads: int):  # noqa: ANN202
    """A zero-argument callable that runs the model once on ``runtime``."""
    if runtime == "onnxruntime":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        r = session.get_inputs()[0].shape[2]
        feed = {session.get_inputs()[0].name: np.random.default_rng(1).standard_normal((1, 3, r, r)).astype(np.float32)}
        return lambda: session.run(None, feed)
    import openvino as ov

    core = ov.Core()
    model = core.read_model(path)
    port = model.inputs[0]
    shape = [1, *[d.get_length() for d in list(port.get_partial_shape())[1:]]]
    model.reshape({port.get_any_name(): shape})
    compiled = core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1,
                                                 "PERFORMANCE_HINT": "LATENCY"})
    request = compiled.create_infer_request()
    request.set_input_tensor(ov.Tensor(np.random.default_rng(1).standard_normal(shape).astype(np.float32)))
    return request.infer


def interleaved(paths: dict[str, str], reps: int) -> tuple[dict[tuple[str, str], float], float]:
    """Per-turn ratios to onnxruntime's ort_qdq (medians) and that reference's median seconds."""
    runners = {(g, r): _runner(r, p, 1) for g, p in paths.items() for r in RUNTIMES}
    for run in runners.values():
        for _ in range(5):
            run()
    times: dict[tuple[str, str], list[float]] = {k: [] for k in runners}
    for _ in range(reps):
        for key, run in runners.items():
            t0 = time.perf_counter()
            run()
            times[key].append(time.perf_counter() - t0)
    ref = times["ort_qdq", "onnxruntime"]
    return ({k: statistics.median(a / b for a, b in zip(v, ref)) for k, v in times.items()}, statistics.median(ref))


def measure(runtime: str, path: str, threads: int, runs: int) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", runtime, path, str(threads), str(runs)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"measuring {path} on {runtime} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def build(shape: str, bits: int, model, workdir: str) -> dict[str, str]:  # noqa: ANN001
    """The subnet's four graphs as files; returns {graph name: path}."""
    import onnx

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from export_latency import ort_quantize_static
    from openvino_semantics import add_input_clips

    from rtfq_deploy.export.lower import lower
    from rtfq_deploy.export.onnx_graph import to_float_onnx, to_onnx
    from rtfq_deploy.space import SubnetConfig

    cfg = SubnetConfig.parse(f"{shape}-q{bits}")
    ir = lower(model, model.active(cfg), cfg.resolution)
    ours = to_onnx(ir, {})
    fp32 = to_float_onnx(ir)
    graphs = {"ours": ours.SerializeToString(), "ours+addclip": add_input_clips(ours)[0].SerializeToString(),
              "ort_qdq": ort_quantize_static(fp32, cfg.resolution), "fp32": fp32.SerializeToString()}
    paths = {}
    for name, data in graphs.items():
        paths[name] = os.path.join(workdir, f"{cfg}.{name}.onnx")
        with open(paths[name], "wb") as f:
            f.write(data)
    onnx.checker.check_model(paths["ours+addclip"])
    return paths


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown CPU"


def main() -> None:
    import logging

    from tabulate import tabulate

    logging.getLogger().setLevel(logging.ERROR)  # quantize_static's pre-processing advice
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet50", help="supernet architecture (random-init weights)")
    parser.add_argument("--subnets", default="r224-w1.00,r160-w0.73,r128-w0.60")
    parser.add_argument("--bits", default="8,4")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--rounds", type=int, default=3, help="alternations of the graph x runtime pairs")
    parser.add_argument("--runs", type=int, default=15, help="timed runs per process, after 5 warm-up runs")
    parser.add_argument("--interleaved", type=int, default=0, metavar="N",
                        help="instead: one process, one thread, the pairs run in turn N times")
    args = parser.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    if not (1 <= args.rounds <= 100 and 1 <= args.runs <= 10_000 and all(1 <= t <= 256 for t in threads)
            and 0 <= args.interleaved <= 100_000):
        raise SystemExit("--rounds 1-100, --runs 1-10000, --threads 1-256, --interleaved 0-100000")
    if args.interleaved:
        threads = [1]
    import torch

    from rtfq_deploy.models import ARCHS, SupernetConfig, build_supernet

    if args.arch not in ARCHS:
        raise SystemExit(f"--arch: one of {', '.join(ARCHS)}")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_supernet(SupernetConfig(args.arch)).eval()
    workdir = tempfile.mkdtemp(prefix="runtime_latency_")
    rows = []
    try:
        for shape in args.subnets.split(","):
            for bits in (int(b) for b in args.bits.split(",")):
                paths = build(shape, bits, model, workdir)
                pairs = [(g, r) for g in paths for r in RUNTIMES]
                if args.interleaved:
                    ratios, ref_s = interleaved(paths, args.interleaved)
                    rows.append([f"{shape}-q{bits}", 1, f"{ref_s * 1e3:.2f}",
                                 *(f"{ratios[g, r]:.3f}" for r in RUNTIMES for g in paths), "-", "-"])
                    print(" ".join(map(str, rows[-1])), file=sys.stderr, flush=True)
                    continue
                for t in threads:
                    times: dict[tuple[str, str], list[float]] = {p: [] for p in pairs}
                    compile_s: dict[tuple[str, str], list[float]] = {p: [] for p in pairs}
                    for _ in range(args.rounds):
                        for g, r in pairs:
                            m = measure(r, paths[g], t, args.runs)
                            times[g, r].append(m["median_s"])
                            compile_s[g, r].append(m["compile_s"])
                    ref = times["ort_qdq", "onnxruntime"]

                    def ratio(g: str, r: str) -> str:
                        return f"{statistics.median(a / b for a, b in zip(times[g, r], ref)):.2f}"

                    rows.append([f"{shape}-q{bits}", t, f"{statistics.median(ref) * 1e3:.2f}",
                                 *(ratio(g, r) for r in RUNTIMES for g in paths),
                                 f"{statistics.median(compile_s['ours', 'openvino']):.2f}",
                                 f"{statistics.median(compile_s['ours', 'onnxruntime']):.2f}"])
                    print(" ".join(map(str, rows[-1])), file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(workdir)
    print(f"{cpu_model()}; onnxruntime {importlib.metadata.version('onnxruntime')}, openvino "
          f"{importlib.metadata.version('openvino')} (CPU plugin); batch 1, random-init {args.arch} subnets; "
          + (f"one process, one thread, the pairs run in turn {args.interleaved} times" if args.interleaved else
             f"one process per measurement, {args.rounds} alternating rounds of {args.runs} runs")
          + "; latency as a ratio to onnxruntime running ort_qdq (lower is faster)")
    heads = [f"{'ov' if r == 'openvino' else 'ort'} {g}" for r in RUNTIMES for g in ("ours", "ours+addclip", "ort_qdq", "fp32")]
    print(tabulate(rows, headers=["subnet", "threads", "ort ort_qdq ms", *heads, "ov compile s", "ort create s"],
                   disable_numparse=True))


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
    else:
        main()
