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

import importlib.metadata
import os
import shutil
import statistics
import sys
import tempfile

from rtfq_deploy.bench.fingerprint import cpu_info
from rtfq_deploy.formats import ONNXRUNTIME, OPENVINO, RUNTIMES
from rtfq_deploy.bench.sessions import interleaved, measure_in_child, median_ratio, runner
from rtfq_deploy.scriptargs import Parser, int_list, name_list, positive


def build(shape: str, bits: int, model, workdir: str) -> dict[str, str]:  # noqa: ANN001
    """The subnet's four graphs as files; returns {graph name: path}."""
    import onnx

    from rtfq_deploy.export.reference_graphs import add_input_clips, ort_quantize_static, subnet_graphs
    from rtfq_deploy.space import SubnetConfig

    cfg = SubnetConfig.parse(f"{shape}-q{bits}")
    ours, fp32 = subnet_graphs(model, cfg)
    graphs = {"ours": ours.SerializeToString(), "ours+addclip": add_input_clips(ours)[0].SerializeToString(),
              "ort_qdq": ort_quantize_static(fp32, cfg.resolution), "fp32": fp32.SerializeToString()}
    paths = {}
    for name, data in graphs.items():
        paths[name] = os.path.join(workdir, f"{cfg}.{name}.onnx")
        with open(paths[name], "wb") as f:
            f.write(data)
    onnx.checker.check_model(paths["ours+addclip"])
    return paths


def main() -> None:
    import logging

    from tabulate import tabulate

    from rtfq_deploy.models import ARCHS

    logging.getLogger().setLevel(logging.ERROR)  # quantize_static's pre-processing advice
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet50", choices=ARCHS, help="supernet architecture (random-init weights)")
    parser.add_argument("--subnets", type=name_list, default="r224-w1.00,r160-w0.73,r128-w0.60")
    parser.add_argument("--bits", type=int_list, default="8,4")
    parser.add_argument("--threads", type=int_list, default="1,2")
    parser.add_argument("--rounds", type=positive, default=3, help="alternations of the graph x runtime pairs")
    parser.add_argument("--runs", type=positive, default=15, help="timed runs per process, after 5 warm-up runs")
    parser.add_argument("--interleaved", type=positive, metavar="N",
                        help="instead: one process, one thread, the pairs run in turn N times")
    args = parser.parse_args()
    threads = [1] if args.interleaved else args.threads
    from rtfq_deploy.export.reference_graphs import random_supernet

    model = random_supernet(args.arch)
    workdir = tempfile.mkdtemp(prefix="runtime_latency_")
    rows = []
    try:
        for shape in args.subnets:
            for bits in args.bits:
                paths = build(shape, bits, model, workdir)
                pairs = [(g, r) for g in paths for r in RUNTIMES]
                if args.interleaved:
                    times = interleaved({(g, r): runner(r, p, 1) for g, p in paths.items() for r in RUNTIMES},
                                        args.interleaved)
                    ref = times["ort_qdq", ONNXRUNTIME]
                    ratios = {k: median_ratio(v, ref) for k, v in times.items()}
                    ref_s = statistics.median(ref)
                    rows.append([f"{shape}-q{bits}", 1, f"{ref_s * 1e3:.2f}",
                                 *(f"{ratios[g, r]:.3f}" for r in RUNTIMES for g in paths), "-", "-"])
                    print(" ".join(map(str, rows[-1])), file=sys.stderr, flush=True)
                    continue
                for t in threads:
                    times: dict[tuple[str, str], list[float]] = {p: [] for p in pairs}
                    compile_s: dict[tuple[str, str], list[float]] = {p: [] for p in pairs}
                    for _ in range(args.rounds):
                        for g, r in pairs:
                            m = measure_in_child(r, paths[g], t, args.runs)
                            times[g, r].append(m["median_s"])
                            compile_s[g, r].append(m["compile_s"])
                    ref = times["ort_qdq", ONNXRUNTIME]

                    def ratio(g: str, r: str) -> str:
                        return f"{median_ratio(times[g, r], ref):.2f}"

                    rows.append([f"{shape}-q{bits}", t, f"{statistics.median(ref) * 1e3:.2f}",
                                 *(ratio(g, r) for r in RUNTIMES for g in paths),
                                 f"{statistics.median(compile_s['ours', 'openvino']):.2f}",
                                 f"{statistics.median(compile_s['ours', ONNXRUNTIME]):.2f}"])
                    print(" ".join(map(str, rows[-1])), file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(workdir)
    print(f"{cpu_info()['cpu_model']}; onnxruntime {importlib.metadata.version('onnxruntime')}, openvino "
          f"{importlib.metadata.version('openvino')} (CPU plugin); batch 1, random-init {args.arch} subnets; "
          + (f"one process, one thread, the pairs run in turn {args.interleaved} times" if args.interleaved else
             f"one process per measurement, {args.rounds} alternating rounds of {args.runs} runs")
          + "; latency as a ratio to onnxruntime running ort_qdq (lower is faster)")
    heads = [f"{'ov' if r == OPENVINO else 'ort'} {g}" for r in RUNTIMES for g in ("ours", "ours+addclip", "ort_qdq", "fp32")]
    print(tabulate(rows, headers=["subnet", "threads", "ort ort_qdq ms", *heads, "ov compile s", "ort create s"],
                   disable_numparse=True))


if __name__ == "__main__":
    main()
