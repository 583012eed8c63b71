"""Latency and size of rtfq-export's integer ONNX files against two references built from
the same ResNet-50 subnet in the same run: the fp32 graph, and onnxruntime's own
``quantize_static`` (QDQ, per-channel, U8S8) of that fp32 graph. Batch 1, onnxruntime
CPU.

Each measurement is one fresh process holding one session, as on a device: several
sessions with 2+ threads in one process keep their idle pools spinning and fight over
the cores (measured here: 2 threads slower than 1, by up to 3x). The variants of one
subnet are measured in alternation (A B C, A B C, ...) for ``--rounds`` rounds, so
machine drift hits all alike; ratios are medians of the per-round ratios.

    python bench/export_latency.py [--subnets r224-w1.00,r160-w0.73,r128-w0.60] [--bits 8,6,4]
                                   [--threads 1,2] [--rounds 5] [--runs 20]

Prints medians, ratios and the fraction of this machine's int8 GEMM rate (MatMulInteger
u8 x s8, 3136x576x256, measured here) that the full-width subnet reaches.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
from argparse import Namespace

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper
from tabulate import tabulate

from rtfq_deploy.export.reference_graphs import ort_quantize_static, random_supernet
from rtfq_deploy.bench.sessions import measure_in_child, median_ratio, median_run, ort_session
from rtfq_deploy.costs import subnet_costs
from rtfq_deploy.export.lower import lower
from rtfq_deploy.export.onnx_graph import to_float_onnx, to_onnx
from rtfq_deploy.scriptargs import Parser, int_list, name_list, positive
from rtfq_deploy.space import SubnetConfig


def int8_gemm_rate(threads: int, reps: int = 20) -> float:
    """MACs/s of MatMulInteger u8 x s8 (3136x576 @ 576x256) on this machine."""
    m, k, n = 3136, 576, 256
    graph = helper.make_graph([helper.make_node("MatMulInteger", ["a", "b"], ["y"])], "g",
                              [helper.make_tensor_value_info("a", TensorProto.UINT8, [m, k]),
                               helper.make_tensor_value_info("b", TensorProto.INT8, [k, n])],
                              [helper.make_tensor_value_info("y", TensorProto.INT32, [m, n])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    s = ort_session(model, threads)
    rng = np.random.default_rng(0)
    feed = {"a": rng.integers(0, 255, (m, k), dtype=np.uint8), "b": rng.integers(-128, 127, (k, n), dtype=np.int8)}
    return m * k * n / median_run(lambda: s.run(None, feed), reps, warmup=1)


def main() -> None:
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--subnets", type=name_list, default="r224-w1.00,r160-w0.73,r128-w0.60")
    parser.add_argument("--bits", type=int_list, default="8,6,4")
    parser.add_argument("--threads", type=int_list, default="1,2")
    parser.add_argument("--rounds", type=positive, default=5, help="alternations of the variants (one process each)")
    parser.add_argument("--runs", type=positive, default=20, help="timed runs per process, after 5 warm-up runs")
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="export_latency_")
    try:
        run(args, workdir)
    finally:
        shutil.rmtree(workdir)


def run(args: Namespace, workdir: str) -> None:
    model = random_supernet("resnet50")  # torch at one thread: no OpenMP pool spinning while children measure
    threads = args.threads
    rows, size_rows, todo = [], [], []
    for shape in args.subnets:
        for bits in args.bits:
            cfg = SubnetConfig.parse(f"{shape}-q{bits}")
            ir = lower(model, model.active(cfg), cfg.resolution)
            ours = to_onnx(ir, {}).SerializeToString()
            fp32_model = to_float_onnx(ir)
            fp32 = fp32_model.SerializeToString()
            theirs = ort_quantize_static(fp32_model, cfg.resolution)
            packed_bytes = to_onnx(ir, {}, pack_int4=True).SerializeToString() if bits <= 4 else None
            packed = len(packed_bytes) if packed_bytes else None
            size_rows.append([str(cfg), f"{len(fp32) / 1e6:.1f}", f"{len(ours) / 1e6:.1f}", f"{len(ours) / len(fp32):.3f}",
                              f"{packed / len(fp32):.3f}" if packed else "-"])
            files = {"ours": ours, "ort_qdq": theirs, "fp32": fp32}
            if packed_bytes:  # the INT4 file as it is, without the load-time expansion to int8
                files["int4_direct"] = packed_bytes
            paths = {name: os.path.join(workdir, f"{cfg}.{name}.onnx") for name in files}
            for name, data in files.items():
                with open(paths[name], "wb") as f:
                    f.write(data)
            todo.append((cfg, subnet_costs(model, cfg).macs, paths))
    rate = {t: int8_gemm_rate(t) for t in threads}
    for cfg, macs, paths in todo:
        for t in threads:
            times: dict[str, list[float]] = {k: [] for k in paths}
            for _ in range(args.rounds):
                for name, path in paths.items():
                    runs = args.runs if name != "int4_direct" else 3
                    times[name].append(measure_in_child("onnxruntime", path, t, runs)["median_s"])
            med = {k: statistics.median(v) for k, v in times.items()}
            ratio_q = median_ratio(times["ours"], times["ort_qdq"])
            ratio_f = median_ratio(times["fp32"], times["ours"])
            rows.append([str(cfg), t, f"{med['ours'] * 1e3:.2f}", f"{med['ort_qdq'] * 1e3:.2f}",
                         f"{med['fp32'] * 1e3:.2f}", f"{ratio_q:.3f}", f"{ratio_f:.2f}",
                         f"{macs / med['ours'] / rate[t]:.2f}",
                         f"{med['int4_direct'] * 1e3:.2f}" if "int4_direct" in med else "-"])
    print(f"onnxruntime {ort.__version__}, batch 1, one process per measurement, {args.rounds} alternating rounds of "
          f"{args.runs} runs, medians; "
          f"int8 GEMM rate: " + ", ".join(f"{t} thread(s) {r / 1e12:.2f} TMAC/s" for t, r in rate.items()))
    print(tabulate(rows, headers=["subnet", "threads", "ours ms", "ort qdq ms", "fp32 ms", "ours/ort_qdq",
                                  "fp32/ours", "of int8 GEMM rate", "int4 file unexpanded ms"]))
    print()
    print(tabulate(size_rows, headers=["subnet", "fp32 MB", "ours MB", "ours/fp32", "int4 pack/fp32"]))


if __name__ == "__main__":
    main()
