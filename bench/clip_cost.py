"""What the exact b-bit range costs: rtfq-export's file against the same file with its
integer-side Clips bypassed (8-bit range everywhere; not exact, a reference only) and
against onnxruntime's ``quantize_static`` of the same float subnet. One process, one
thread (no thread pools to contend), the three sessions interleaved run by run, so the
ratios are free of process-to-process and machine drift.

    python bench/clip_cost.py [--subnets r224-w1.00,r160-w0.73,r128-w0.60] [--bits 6,4] [--reps 300]
"""

from __future__ import annotations

import statistics

from tabulate import tabulate

from rtfq_deploy.export.reference_graphs import ort_quantize_static, random_supernet, subnet_graphs, without_clips
from rtfq_deploy.bench.sessions import interleaved, median_ratio, runner
from rtfq_deploy.scriptargs import Parser, int_list, name_list, positive
from rtfq_deploy.space import SubnetConfig


def main() -> None:
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--subnets", type=name_list, default="r224-w1.00,r160-w0.73,r128-w0.60")
    parser.add_argument("--bits", type=int_list, default="6,4")
    parser.add_argument("--reps", type=positive, default=300)
    args = parser.parse_args()
    model = random_supernet("resnet50")
    rows = []
    for shape in args.subnets:
        for bits in args.bits:
            cfg = SubnetConfig.parse(f"{shape}-q{bits}")
            ours, fp32 = subnet_graphs(model, cfg)
            variants = {"ours": ours.SerializeToString(), "no_clip": without_clips(ours).SerializeToString(),
                        "ort_qdq": ort_quantize_static(fp32, cfg.resolution)}
            times = interleaved({k: runner("onnxruntime", v, 1) for k, v in variants.items()}, args.reps)
            med = {k: statistics.median(v) * 1e3 for k, v in times.items()}

            def ratio(a: str, b: str) -> float:
                return median_ratio(times[a], times[b])

            clips = sum(1 for n in ours.graph.node if n.op_type == "Clip")
            rows.append([str(cfg), clips, f"{med['ours']:.2f}", f"{med['no_clip']:.2f}", f"{med['ort_qdq']:.2f}",
                         f"{ratio('ours', 'no_clip'):.3f}", f"{ratio('no_clip', 'ort_qdq'):.3f}",
                         f"{ratio('ours', 'ort_qdq'):.3f}"])
    print(f"1 thread, batch 1, {args.reps} interleaved runs per session, medians")
    print(tabulate(rows, headers=["subnet", "Clips", "ours ms", "no-Clip ms", "ort qdq ms", "ours/no-Clip",
                                  "no-Clip/ort_qdq", "ours/ort_qdq"]))


if __name__ == "__main__":
    main()
