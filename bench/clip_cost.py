"""What the exact b-bit range costs: rtfq-export's file against the same file with its
integer-side Clips bypassed (8-bit range everywhere; not exact, a reference only) and
against onnxruntime's ``quantize_static`` of the same float subnet. One process, one
thread (no thread pools to contend), the three sessions interleaved run by run, so the
ratios are free of process-to-process and machine drift.

    python bench/clip_cost.py [--subnets r224-w1.00,r160-w0.73,r128-w0.60] [--bits 6,4] [--reps 300]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
import onnx
import torch
from tabulate import tabulate

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from export_latency import ort_quantize_static, session  # noqa: E402

from rtfq_deploy.export.lower import lower  # noqa: E402
from rtfq_deploy.export.onnx_graph import to_float_onnx, to_onnx  # noqa: E402
from rtfq_deploy.models import SupernetConfig, build_supernet  # noqa: E402
from rtfq_deploy.space import SubnetConfig  # noqa: E402


def without_clips(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same graph with every Clip's readers reading the Clip's input instead."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    bypass = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Clip"}
    kept = [n for n in graph.node if n.op_type != "Clip"]
    for n in kept:
        n.input[:] = [bypass.get(i, i) for i in n.input]
    del graph.node[:]
    graph.node.extend(kept)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subnets", default="r224-w1.00,r160-w0.73,r128-w0.60")
    parser.add_argument("--bits", default="6,4")
    parser.add_argument("--reps", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_supernet(SupernetConfig("resnet50")).eval()
    rows = []
    for shape in args.subnets.split(","):
        for bits in (int(b) for b in args.bits.split(",")):
            cfg = SubnetConfig.parse(f"{shape}-q{bits}")
            ir = lower(model, model.active(cfg), cfg.resolution)
            ours = to_onnx(ir, {})
            variants = {"ours": ours.SerializeToString(), "no_clip": without_clips(ours).SerializeToString(),
                        "ort_qdq": ort_quantize_static(to_float_onnx(ir), cfg.resolution)}
            sessions = {k: session(v, 1) for k, v in variants.items()}
            x = {"input": np.random.default_rng(1).standard_normal((1, 3, cfg.resolution, cfg.resolution)).astype(np.float32)}
            for s in sessions.values():
                for _ in range(5):
                    s.run(None, x)
            times: dict[str, list[float]] = {k: [] for k in sessions}
            for _ in range(args.reps):
                for name, s in sessions.items():
                    start = time.perf_counter()
                    s.run(None, x)
                    times[name].append(time.perf_counter() - start)
            med = {k: statistics.median(v) * 1e3 for k, v in times.items()}

            def ratio(a: str, b: str) -> float:
                return statistics.median(p / q for p, q in zip(times[a], times[b]))

            clips = sum(1 for n in ours.graph.node if n.op_type == "Clip")
            rows.append([str(cfg), clips, f"{med['ours']:.2f}", f"{med['no_clip']:.2f}", f"{med['ort_qdq']:.2f}",
                         f"{ratio('ours', 'no_clip'):.3f}", f"{ratio('no_clip', 'ort_qdq'):.3f}",
                         f"{ratio('ours', 'ort_qdq'):.3f}"])
    print(f"1 thread, batch 1, {args.reps} interleaved runs per session, medians")
    print(tabulate(rows, headers=["subnet", "Clips", "ours ms", "no-Clip ms", "ort qdq ms", "ours/no-Clip",
                                  "no-Clip/ort_qdq", "ours/ort_qdq"]))


if __name__ == "__main__":
    main()
